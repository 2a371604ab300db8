"""The training loss: next-token cross-entropy summed over assistant tokens and divided by the token
count of the whole global batch. Logits are computed only where a label exists, which skips most of
the vocabulary projection on image and prompt tokens, and only `chunk` positions at a time: float32
logits of the whole vocabulary for every labelled position (2.5 GB for 4096 positions of a
152k vocabulary, more for their gradient) never exist at once."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..data.processor import IGNORE_INDEX

CHUNK = 1024
"""Positions whose logits exist at once (0.6 GB of float32 logits for a 152k vocabulary)."""


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions t whose next token t+1 carries a label in any row."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)


def causal_lm_loss(model, batch: dict, num_tokens: float, chunk: int | None = CHUNK) -> torch.Tensor:
    """sum of token losses / num_tokens. `chunk`: positions per chunk of `chunked_cross_entropy`;
    None: the logits of every labelled position at once (`model(**inputs, logits_to_keep=positions)`)."""
    labels = batch["labels"]
    positions = label_positions(labels)
    targets = labels[:, positions + 1]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if not chunk:
        logits = model(**inputs, shared_base=True, logits_to_keep=positions).logits
        return _summed_cross_entropy(logits.flatten(0, 1), targets.flatten()) / num_tokens

    def head(hidden, logits):
        return chunked_cross_entropy(hidden[:, positions].flatten(0, 1), targets.flatten(), logits, chunk)

    return model(**inputs, shared_base=True, head=head) / num_tokens


def _summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, logits: Callable[[torch.Tensor], torch.Tensor], chunk: int = CHUNK
) -> torch.Tensor:
    """Summed float32 cross-entropy of `logits(hidden)` (N, V) against `targets` (N), `chunk` rows at a
    time. `logits` must hold no trainable weight (the LM head is frozen): only `hidden` gets a gradient."""
    return _ChunkedCrossEntropy.apply(hidden, targets, logits, chunk)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Each chunk's logits live only while its loss and, when a gradient is wanted, its gradient for
    the hidden states are computed, in the forward; the backward scales that stored (N, H) gradient.
    No logits are kept for the backward and none are computed twice (as checkpointing would)."""

    @staticmethod
    def forward(ctx, hidden, targets, logits, chunk):
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows, t = hidden[start : start + chunk], targets[start : start + chunk]
            if want_grad:
                rows = rows.detach().requires_grad_()
                with torch.enable_grad():
                    loss = _summed_cross_entropy(logits(rows), t)
                grad[start : start + chunk] = torch.autograd.grad(loss, rows)[0]
            else:
                loss = _summed_cross_entropy(logits(rows), t)
            total += loss.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None
