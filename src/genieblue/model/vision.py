"""The eyes: a vision encoder from transformers, a token downsampler and an MLP projector that maps
image tiles to embeddings in the LLM's input space (LLaVA / InternVL style).

The encoder is a ViT (SigLIP or CLIP: its patch tokens) or any convolutional backbone that
`transformers.AutoBackbone` builds (ResNet, ConvNeXt, Swin, DINOv2, timm, ...: the cells of its last
feature map, row by row). The downsampler concatenates each 2x2 neighbourhood of tokens (or
`downsample` x `downsample`); `mix_tokens` adds a learned linear map across the token axis (a
residual MLP-Mixer token-mixing layer, zero at initialisation), so every image token can carry
information from the whole tile rather than only its own cell.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers import PreTrainedModel

from .sources import VISION_MODELS


def pixel_unshuffle_tokens(tokens: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """(N, h*w, C) patch tokens on a square grid -> (N, h*w/factor^2, C*factor^2): each output token
    concatenates a factor x factor neighbourhood."""
    n, length, channels = tokens.shape
    side = math.isqrt(int(length))  # int(): a plain number also while tracing for export
    if side * side != length or side % factor:
        raise ValueError(f"{length} patch tokens do not form a square grid divisible by {factor}")
    grid = tokens.reshape(n, side // factor, factor, side // factor, factor, channels)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(n, (side // factor) ** 2, channels * factor * factor)


class TokenMixer(nn.Module):
    """tokens + W @ tokens over the token axis (N, T, C) -> (N, T, C); W starts at zero."""

    def __init__(self, tokens: int):
        super().__init__()
        self.mix = nn.Linear(tokens, tokens)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.mix(tokens.transpose(1, 2)).transpose(1, 2)


TOWER_OPTIONS = ("downsample", "mix_tokens")
"""Keys of a vision spec dict that configure the tower around the encoder, not the encoder."""


def split_tower_options(spec):
    """(encoder spec, VisionTower keyword options) from a vision spec; only a dict carries options."""
    if not isinstance(spec, dict):
        return spec, {}
    return {k: v for k, v in spec.items() if k not in TOWER_OPTIONS}, {k: spec[k] for k in TOWER_OPTIONS if k in spec}


class VisionTower(nn.Module):
    """Encoder -> downsampler (-> token mixer) -> MLP projector. `forward(pixel_values)` returns
    (tiles, T, D). The encoder keeps the attribute name `vit` whatever its kind (checkpoint keys)."""

    def __init__(self, vit: PreTrainedModel, llm_hidden_size: int, downsample: int = 2, mix_tokens: bool = False):
        super().__init__()
        self.vit = vit
        self.downsample = downsample
        cfg = vit.config
        self.is_vit = cfg.model_type in VISION_MODELS  # patch tokens; else a feature-map backbone
        self.drop_cls = cfg.model_type == "clip_vision_model"
        if self.drop_cls:  # CLIP's post-layernorm only feeds the pooled output, which is unused
            vit.post_layernorm = nn.Identity()
        if self.is_vit:
            self.image_size = cfg.image_size
            channels, side = cfg.hidden_size, cfg.image_size // cfg.patch_size
        else:  # a backbone: its output grid and width, read off one forward pass
            self.image_size = getattr(cfg, "image_size", 224)
            was_training = vit.training
            # a structure without weights (parameters on the meta device, buffers real) is probed by a copy
            # wholly on the meta device: shapes only
            probe = vit if vit.device.type != "meta" else copy.deepcopy(vit).to("meta")
            size = (1, cfg.num_channels, self.image_size, self.image_size)
            with torch.no_grad():
                grid = probe.eval()(torch.zeros(size, dtype=vit.dtype, device=vit.device))
            vit.train(was_training)
            channels, side = grid.feature_maps[-1].shape[1], grid.feature_maps[-1].shape[-1]
        if side % downsample:
            raise ValueError(
                f"the tower's {side}x{side} token grid cannot be downsampled by {downsample}: pass a downsample that "
                f"divides {side} (from_base(downsample=...), `vision_downsample:` in a training config; 1: none)"
            )
        self.tokens_per_tile = (side // downsample) ** 2
        width = channels * downsample * downsample
        self.mixer = TokenMixer(self.tokens_per_tile).to(vit.dtype) if mix_tokens else None
        self.projector = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, llm_hidden_size),
            nn.GELU(),
            nn.Linear(llm_hidden_size, llm_hidden_size),
        ).to(vit.dtype)
        self.settle_layout()

    def settle_layout(self) -> None:
        """A convolutional encoder's weights in channels-last layout (2x faster convolutions on CPUs,
        oneDNN); called again after weights are assigned from a file (they come contiguous)."""
        if not self.is_vit:
            self.vit.to(memory_format=torch.channels_last)

    def connector_parameters(self) -> list[nn.Parameter]:
        """The parameters between encoder and LLM (token mixer, projector): what stage 1 trains."""
        return [*(self.mixer.parameters() if self.mixer is not None else ()), *self.projector.parameters()]

    def settings(self) -> dict:
        """What `VisionTower(...)` needs besides the encoder (saved in the manifest)."""
        return {"downsample": self.downsample, "mix_tokens": self.mixer is not None}

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, S, S) -> (tiles, cells, C): the encoder's tokens, row by row."""
        pixel_values = pixel_values.to(self.vit.dtype)
        if self.is_vit:
            feats = self.vit(pixel_values=pixel_values).last_hidden_state
            return feats[:, 1:] if self.drop_cls else feats
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.vit(pixel_values).feature_maps[-1].flatten(2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = pixel_unshuffle_tokens(self.encode(pixel_values), self.downsample)
        if self.mixer is not None:
            tokens = self.mixer(tokens)
        return self.projector(tokens)
