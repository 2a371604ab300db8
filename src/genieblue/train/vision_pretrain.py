"""Stage 0 for a vision tower trained from scratch: before stage 1, the tower (encoder, token mixer,
projector) learns to write each image's reply as text, in the frozen LLM's own input-embedding
space: image token k is pulled towards the input embedding of the reply's token k (the reply
repeated to fill every image token), so the LLM is handed something close to words it already reads.

The paper starts from a pretrained ViT. A from-scratch tower frozen in stage 1 hands the projector
features that barely depend on the image, and end-to-end training through a frozen LLM teaches a
random tower far too slowly for a small budget. Stage 0 is parallel captioning in the spirit of
CapPa (Tschannen et al., 2023, which predicts all caption tokens at once) with the LLM's input
embeddings as the classifier's weights and no head: image token k scores the vocabulary by its dot
product with each token's input embedding and is trained with the cross-entropy of the reply's
token k. A reply that names everything in the image (a caption) therefore becomes a sequence of
image tokens that spell it. The softmax runs over every token of the batch's replies plus random
negatives drawn from the whole vocabulary each step, so an image token must come near the right
word and not only nearer than the other answers. A cosine term (`match`) pulls each token onto its
word's embedding itself: tokens ranked right but off by a structured residual (cosine 0.5-0.8) are not
read by the LLM, tokens at cosine ~0.9 are. A last term pulls the tokens' RMS to the embeddings' RMS.
Tokens ending most replies (the end-of-turn marker) carry nothing and are left out.

`pretrain_vision` takes any stream of (pixels, replies) batches: the trainer's comes from the stage-1
records; the demo's draws freshly generated images every step.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from ..data.images import image_to_tensor
from ..data.processor import Sample
from ..model import IMAGE_TOKEN_INDEX, GenieBlueForConditionalGeneration
from .loss import IGNORE_INDEX

Batch = tuple[torch.Tensor, list[tuple[int, ...]]]
"""(pixels (N, 3, S, S), N token-id replies)."""


def _pair(sample: Sample | None) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    """The last tile (the thumbnail when tiled) of a sample with an image, and its reply ids; None for
    a sample without an image or a reply (or one that failed to encode)."""
    if sample is None or sample.pixel_values is None or not bool((sample.input_ids == IMAGE_TOKEN_INDEX).any()):
        return None
    reply = sample.labels[sample.labels != IGNORE_INDEX]
    return (sample.pixel_values[-1], tuple(int(t) for t in reply)) if len(reply) else None


def common_tokens(replies: list[tuple[int, ...]]) -> set[int]:
    """The tokens found in more than half of the replies (end-of-turn markers, newlines)."""
    counts = Counter(t for reply in replies for t in set(reply))
    return {t for t, n in counts.items() if n > len(replies) / 2}


def informative_tokens(replies: list[tuple[int, ...]], common: set[int] | None = None) -> list[tuple[int, ...]]:
    """Each reply without the `common` tokens (default: `common_tokens(replies)`); a reply made only of
    such tokens is kept whole."""
    common = common_tokens(replies) if common is None else common
    return [tuple(t for t in r if t not in common) or r for r in replies]


def cyclic_targets(replies: list[tuple[int, ...]], tokens: int) -> torch.Tensor:
    """(len(replies), tokens): row i is reply i repeated (and cut) to `tokens` ids."""
    return torch.tensor([[reply[k % len(reply)] for k in range(tokens)] for reply in replies])


def sample_batches(samples: Sequence, batch_size: int, seed: int = 0, probe: int = 1024) -> Iterator[Batch]:
    """Endless shuffled batches of the samples' images and informative reply tokens. `samples` is a
    sequence of `Sample`s (or of None for one that fails to encode, as `MixtureSamples.sample` gives),
    encoded batch by batch, so a large data set never sits decoded in memory; the common tokens are
    found on the first `probe` samples."""
    get = samples.sample if hasattr(samples, "sample") else samples.__getitem__
    probed = [p for p in map(_pair, map(get, range(min(probe, len(samples))))) if p is not None]
    if len(probed) < 2:
        raise ValueError(f"stage 0 needs at least 2 samples with an image and a reply among the first {probe}")
    common = common_tokens([reply for _, reply in probed])
    rng, order = random.Random(seed), []
    while True:
        tiles, replies = [], []
        while len(tiles) < batch_size:
            if not order:
                order = list(range(len(samples)))
                rng.shuffle(order)
            pair = _pair(get(order.pop()))
            if pair is not None:
                tiles.append(pair[0])
                replies.append(pair[1])
        yield torch.stack(tiles), informative_tokens(replies, common)


def stream_batches(pairs: Iterator, processor, batch_size: int) -> Iterator[Batch]:
    """Batches from an endless iterator of (PIL image, reply text), encoded as `processor` would
    (one tile per image; the reply's tokens without special tokens)."""
    while True:
        chunk = [next(pairs) for _ in range(batch_size)]
        pixels = torch.cat(
            [image_to_tensor(image, processor.image_size, 1, processor.vision_type) for image, _ in chunk]
        )
        replies = [tuple(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) for _, text in chunk]
        yield pixels, replies


def caption_loss(
    tokens: torch.Tensor, weight: torch.Tensor, log_scale: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of targets (N, K) for image tokens (N, K, D), each scored against the
    embedding rows `weight` (V, D) of the batch's target ids plus `negatives` (random ids)."""
    rows, column = torch.unique(torch.cat([targets.flatten(), negatives]), return_inverse=True)
    logits = tokens @ weight[rows].T * log_scale.exp()
    return F.cross_entropy(logits.flatten(0, 1), column[: targets.numel()])


def pretrain_vision(
    model: GenieBlueForConditionalGeneration,
    batches: Iterator[Batch],
    steps: int,
    *,
    lr: float = 1e-3,
    seed: int = 0,
    on_step=None,
    negatives: int = 2048,
    match: float = 1.0,
    autocast=contextlib.nullcontext,
) -> list[float]:
    """Train `model.vision` (encoder, mixer, projector) on `steps` batches; returns the losses.
    `on_step(step, loss)` is called after each step (progress bars); the tower's forward runs inside
    `autocast()` (the trainer's mixed precision). It runs where the model is (batches and the random
    negatives are drawn on the CPU, alike on every device, and moved there)."""
    tower, embed = model.vision, model.llm.get_input_embeddings()
    weight = embed.weight.detach().float()
    device = weight.device
    target_rms = weight.pow(2).mean().sqrt()
    log_scale = torch.nn.Parameter(torch.zeros((), device=device))
    params = list(tower.parameters()) + [log_scale]
    trainable = [p.requires_grad for p in tower.parameters()]
    tower.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 100), steps)
    sampler, losses = torch.Generator().manual_seed(seed), []
    for step in range(steps):
        pixels, replies = next(batches)
        with autocast():
            tokens = tower(pixels.to(device)).float()
        targets = cyclic_targets(replies, tokens.shape[1]).to(device)
        drawn = torch.randint(len(weight), (negatives,), generator=sampler).to(device)
        loss = caption_loss(tokens, weight, log_scale, targets, drawn)
        loss = loss + (tokens.pow(2).mean(-1).sqrt().log() - target_rms.log()).pow(2).mean()
        if match:
            loss = loss + match * (1 - F.cosine_similarity(tokens, weight[targets], dim=-1)).mean()
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
