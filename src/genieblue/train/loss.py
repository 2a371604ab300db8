"""The training loss: next-token cross-entropy summed over assistant tokens and divided by the token
count of the whole global batch. Logits are computed only where a label exists (transformers'
`logits_to_keep` with positions), which skips most of the vocabulary projection on image and prompt
tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.processor import IGNORE_INDEX


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions t whose next token t+1 carries a label in any row."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)


def causal_lm_loss(model, batch: dict, num_tokens: float) -> torch.Tensor:
    """sum of token losses / num_tokens, for `model(**inputs, logits_to_keep=positions)`."""
    labels = batch["labels"]
    positions = label_positions(labels)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, shared_base=True, logits_to_keep=positions).logits
    targets = labels[:, positions + 1]
    return (
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        / num_tokens
    )
