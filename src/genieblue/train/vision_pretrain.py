"""Stage 0 for a ViT trained from scratch: the vision tower (ViT + projector) learns to see and to
speak the LLM's input language before stage 1, through SigLIP's pairwise sigmoid loss (Zhai et al.,
2023) between each image and the reply it comes with.

The paper starts from a pretrained ViT. A from-scratch ViT frozen in stage 1 hands the projector
features that barely depend on the image, and end-to-end training through a frozen LLM teaches a
random ViT far too slowly for a small budget. Here the image side is the mean of the tower's image
tokens and the text side the mean of the frozen LLM's input embeddings of the reply's words (tokens
that end most replies, like the end-of-turn marker, carry nothing and are left out), with no heads in
between: the image tokens land in the LLM's embedding space next to the words that describe
the image, which the LLM already knows how to read. A second term pulls the image tokens' RMS to the
embeddings' RMS. Samples with the same reply count as positives of each other.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from ..data.processor import Sample
from ..model import IMAGE_TOKEN_INDEX, GenieBlueForConditionalGeneration
from .loss import IGNORE_INDEX


def sigmoid_loss(image: torch.Tensor, text: torch.Tensor, positive: torch.Tensor, log_scale, bias) -> torch.Tensor:
    """SigLIP loss for (N, D) image and text embeddings; `positive` (N, N) marks matching pairs."""
    logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T * log_scale.exp() + bias
    signs = positive.float() * 2 - 1
    return -F.logsigmoid(signs * logits).sum() / len(image)


def _pairs(samples: list[Sample]) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """The last tile (the thumbnail when tiled) of every sample with an image, and its reply ids."""
    tiles, replies = [], []
    for s in samples:
        if s.pixel_values is None or not bool((s.input_ids == IMAGE_TOKEN_INDEX).any()):
            continue
        reply = s.labels[s.labels != IGNORE_INDEX]
        if len(reply):
            tiles.append(s.pixel_values[-1])
            replies.append(tuple(int(t) for t in reply))
    return (torch.stack(tiles) if tiles else torch.empty(0)), replies


def reply_embeddings(embed: torch.nn.Embedding, replies: list[tuple[int, ...]], corpus: list[tuple[int, ...]]) -> torch.Tensor:
    """(len(replies), D): the mean input embedding of each reply's tokens, leaving out the tokens found
    in more than half of the `corpus` replies (end-of-turn markers, newlines)."""
    counts: dict[int, int] = {}
    for reply in corpus:
        for t in set(reply):
            counts[t] = counts.get(t, 0) + 1
    common = {t for t, n in counts.items() if n > len(corpus) / 2}
    with torch.no_grad():
        return torch.stack([embed(torch.tensor([t for t in r if t not in common] or list(r))).float().mean(0)
                            for r in replies])


def pretrain_vision(
    model: GenieBlueForConditionalGeneration,
    samples: list[Sample],
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    on_step=None,
) -> list[float]:
    """Train `model.vision` (ViT and projector) for `steps` steps; returns the losses.
    `on_step(step, loss)` is called after each step (progress bars)."""
    tiles, replies = _pairs(samples)
    if len(replies) < 2:
        raise ValueError("stage 0 needs at least 2 samples with an image and a reply")
    tower, embed = model.vision, model.llm.get_input_embeddings()
    unique = {t: i for i, t in enumerate(dict.fromkeys(replies))}
    reply_index = torch.tensor([unique[t] for t in replies])
    text = reply_embeddings(embed, list(unique), replies)
    with torch.no_grad():
        target_rms = embed.weight.float().pow(2).mean().sqrt()
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    bias = torch.nn.Parameter(torch.tensor(-10.0))
    params = list(tower.parameters()) + [log_scale, bias]
    trainable = [p.requires_grad for p in tower.parameters()]
    tower.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 100), steps)
    rng, order, losses = random.Random(seed), [], []
    for step in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(replies)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[:batch_size], order[batch_size:]
        tokens = tower(tiles[batch]).float()
        ids = reply_index[batch]
        rms = tokens.pow(2).mean(-1).sqrt()
        loss = sigmoid_loss(tokens.mean(1), text[ids], ids[:, None] == ids[None, :], log_scale, bias)
        loss = loss + (rms.log() - target_rms.log()).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step:
            on_step(step + 1, losses[-1])
    for p, flag in zip(tower.parameters(), trainable):
        p.requires_grad_(flag)
    return losses
