"""Stage 0 for a ViT trained from scratch: before stage 1, the vision tower (ViT + projector) learns
to put the words of each image's reply into its image tokens, in the frozen LLM's own input-embedding
space (the words the LLM already knows how to read).

The paper starts from a pretrained ViT. A from-scratch ViT frozen in stage 1 hands the projector
features that barely depend on the image, and end-to-end training through a frozen LLM teaches a
random ViT far too slowly for a small budget. Stage 0 is a classification of reply tokens in the
spirit of SuperClass (Huang et al., 2024), with the LLM's input embeddings as the classifier's
weights and no head: every image token scores the vocabulary by its dot product with each token's
input embedding, an image's distribution is the mean of its tokens' softmaxes, and the loss is the
cross-entropy of the reply's informative tokens under that mixture. The mixture lets different image
tokens carry different words: a VQA image is asked about its colour in one record and its shape in
another. Tokens ending most replies (the end-of-turn marker) carry nothing and are left out. The
softmax runs over every token seen in a reply plus random negatives drawn from the whole vocabulary
each step, so the image tokens must come near the right word and not only nearer than the other
answers. A second term pulls the image tokens' RMS to the embeddings' RMS.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import torch
from transformers import get_cosine_schedule_with_warmup

from ..data.processor import Sample
from ..model import IMAGE_TOKEN_INDEX, GenieBlueForConditionalGeneration
from .loss import IGNORE_INDEX


def mixture_nll(tokens: torch.Tensor, weight: torch.Tensor, log_scale: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over images of -sum_v targets[i, v] * log p_i(v), where p_i is the mean over image i's
    tokens of softmax(exp(log_scale) * token @ weight.T). tokens (N, K, D), weight (V, D), targets
    (N, V) with rows summing to 1."""
    log_p = (tokens @ weight.T * log_scale.exp()).log_softmax(-1)
    mixture = torch.logsumexp(log_p, dim=1) - math.log(tokens.shape[1])
    return -(mixture * targets).sum() / len(tokens)


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


def informative_tokens(replies: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Each reply without the tokens found in more than half of all replies (end-of-turn markers,
    newlines); a reply made only of such tokens is kept whole."""
    counts = Counter(t for reply in replies for t in set(reply))
    common = {t for t, n in counts.items() if n > len(replies) / 2}
    return [tuple(t for t in r if t not in common) or r for r in replies]


def target_matrix(replies: list[tuple[int, ...]], vocab: list[int]) -> torch.Tensor:
    """(len(replies), len(vocab)): each reply's token frequencies over `vocab`, rows summing to 1."""
    column = {t: i for i, t in enumerate(vocab)}
    targets = torch.zeros(len(replies), len(vocab))
    for row, reply in enumerate(replies):
        for t in reply:
            targets[row, column[t]] += 1 / len(reply)
    return targets


def pretrain_vision(
    model: GenieBlueForConditionalGeneration,
    samples: list[Sample],
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    on_step=None,
    negatives: int = 2048,
) -> list[float]:
    """Train `model.vision` (ViT and projector) for `steps` steps; returns the losses.
    `on_step(step, loss)` is called after each step (progress bars)."""
    tiles, replies = _pairs(samples)
    if len(replies) < 2:
        raise ValueError("stage 0 needs at least 2 samples with an image and a reply")
    replies = informative_tokens(replies)
    vocab = sorted({t for r in replies for t in r})
    targets = target_matrix(replies, vocab)
    tower, embed = model.vision, model.llm.get_input_embeddings()
    weight = embed.weight.detach().float()
    target_rms = weight.pow(2).mean().sqrt()
    log_scale = torch.nn.Parameter(torch.zeros(()))
    params = list(tower.parameters()) + [log_scale]
    trainable = [p.requires_grad for p in tower.parameters()]
    tower.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 100), steps)
    rng, order, losses = random.Random(seed), [], []
    sampler = torch.Generator().manual_seed(seed)
    known = torch.tensor(vocab)
    for step in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(replies)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[:batch_size], order[batch_size:]
        rows = torch.cat([known, torch.randint(len(weight), (negatives,), generator=sampler)])
        tokens = tower(tiles[batch]).float()
        batch_targets = torch.cat([targets[batch], torch.zeros(len(batch), negatives)], dim=1)
        rms = tokens.pow(2).mean(-1).sqrt()
        loss = mixture_nll(tokens, weight[rows], log_scale, batch_targets)
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
