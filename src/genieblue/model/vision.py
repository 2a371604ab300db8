"""The eyes: a transformers ViT (SigLIP or CLIP), a 2x2 token downsampler and an MLP projector
that maps image tiles to embeddings in the LLM's input space (LLaVA / InternVL style)."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedModel


def pixel_unshuffle_tokens(tokens: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """(N, h*w, C) patch tokens on a square grid -> (N, h*w/factor^2, C*factor^2): each output token
    concatenates a factor x factor neighbourhood."""
    n, length, channels = tokens.shape
    side = math.isqrt(int(length))  # int(): a plain number also while tracing for export
    if side * side != length or side % factor:
        raise ValueError(f"{length} patch tokens do not form a square grid divisible by {factor}")
    grid = tokens.reshape(n, side // factor, factor, side // factor, factor, channels)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(n, (side // factor) ** 2, channels * factor * factor)


class VisionTower(nn.Module):
    """ViT -> 2x2 downsampler -> MLP projector. `forward(pixel_values)` returns (tiles, T, D)."""

    def __init__(self, vit: PreTrainedModel, llm_hidden_size: int, downsample: int = 2):
        super().__init__()
        self.vit = vit
        self.downsample = downsample
        cfg = vit.config
        self.drop_cls = cfg.model_type == "clip_vision_model"
        if self.drop_cls:  # CLIP's post-layernorm only feeds the pooled output, which is unused
            vit.post_layernorm = nn.Identity()
        width = cfg.hidden_size * downsample * downsample
        self.projector = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, llm_hidden_size),
            nn.GELU(),
            nn.Linear(llm_hidden_size, llm_hidden_size),
        ).to(vit.dtype)

    @property
    def image_size(self) -> int:
        return self.vit.config.image_size

    @property
    def tokens_per_tile(self) -> int:
        side = self.vit.config.image_size // self.vit.config.patch_size
        return (side // self.downsample) ** 2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.vit(pixel_values=pixel_values.to(self.vit.dtype)).last_hidden_state
        if self.drop_cls:
            feats = feats[:, 1:]
        return self.projector(pixel_unshuffle_tokens(feats, self.downsample))
