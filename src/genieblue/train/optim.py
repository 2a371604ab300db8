"""Optimiser and schedule of the paper: AdamW (0.9/0.98, eps 1e-6, wd 0.05), cosine decay after a 1%
warm-up, and layer-wise learning-rate decay (0.9) over the vision encoder's blocks (a ViT's layers,
a backbone's stages or layers, counted from its parameter names)."""

from __future__ import annotations

import math
import re

import torch
from transformers import get_cosine_schedule_with_warmup

from ..model import GenieBlueForConditionalGeneration
from .config import TrainConfig

_VIT_LAYER = re.compile(r"\.(?:layers?|stages)\.(\d+)\.")  # SigLIP / CLIP / Swin, DINOv2, ResNet / ConvNeXt


def _vit_depth(name: str, num_layers: int) -> int:
    """0 for the patch embeddings (a backbone's stem), i+1 for encoder block (stage) i,
    num_layers+1 for what follows."""
    match = _VIT_LAYER.search(name)
    if match:
        return int(match.group(1)) + 1
    return 0 if "embeddings" in name or "embedder" in name else num_layers + 1


def _encoder_blocks(names) -> int:
    """How many blocks (a ViT's layers, a backbone's stages) the encoder's parameter names number."""
    return 1 + max((int(m.group(1)) for n in names if (m := _VIT_LAYER.search(n))), default=-1)


def param_groups(model: GenieBlueForConditionalGeneration, cfg: TrainConfig) -> list[dict]:
    """Trainable parameters grouped by learning rate and weight decay (none for biases and norms)."""
    num_vit = _encoder_blocks(n for n, _ in model.named_parameters() if n.startswith("vision.vit."))
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("vision.vit."):
            lr = (cfg.vit_lr or cfg.lr) * cfg.vit_layer_decay ** (num_vit + 1 - _vit_depth(name, num_vit))
        elif name.startswith(("vision.projector.", "vision.mixer.")):
            lr = cfg.projector_lr or cfg.lr
        else:
            lr = cfg.lr
        decay = cfg.weight_decay if p.ndim >= 2 else 0.0
        groups.setdefault((lr, decay), []).append(p)
    return [
        {"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in sorted(groups.items(), key=lambda kv: kv[0])
    ]


def build_optimizer(model: GenieBlueForConditionalGeneration, cfg: TrainConfig, total_steps: int, fused: bool = True):
    """AdamW and its schedule. `fused`: one fused kernel per step for all parameters (torch's
    `fused=True`) where every parameter lives on a CPU or CUDA device; else torch's default (foreach)."""
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("nothing to train: no parameter requires a gradient")
    fused = fused and all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
    warmup = max(1, math.ceil(cfg.warmup_ratio * total_steps))
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
