"""Per-request routing between the untouched base and the multimodal delta.

A `Router` holds the mode of the forward in flight (text or image) and, for CogVLM-style experts,
which token positions are visual. The wrappers below sit where the original modules sat and, in text
mode, call the original module and nothing else, so the text path runs exactly the base's ops:

  * `Switch`     - a copied module (GenieBlue block copies; for `full`, every block and the norm)
  * `LoRALinear` - a frozen linear plus a rank-r update that only image mode adds
  * `Expert`     - CogVLM visual expert: image-token positions use the expert, text positions the
                   original; dense `torch.where`, so the graph stays static (no routing ops)

This is the piece of GenieBlue that no library provides (peft adapters cannot be switched per
request together with block copies), so it is written here, kept small.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class Router:
    """Mode of the current forward. `visual_mask` (B, T) is set for the next decoder forward only
    (a prefill), so decode steps after an image prompt see text tokens."""

    def __init__(self):
        self.image = False
        self.pending_mask: torch.Tensor | None = None
        self.visual_mask: torch.Tensor | None = None

    @contextlib.contextmanager
    def route(self, image: bool, visual_mask: torch.Tensor | None = None):
        saved = (self.image, self.pending_mask, self.visual_mask)
        self.image, self.pending_mask, self.visual_mask = image, visual_mask, None
        try:
            yield self
        finally:
            self.image, self.pending_mask, self.visual_mask = saved

    def begin_forward(self, *_):
        """Forward pre-hook on the decoder: the pending visual mask applies to this forward only."""
        self.visual_mask, self.pending_mask = self.pending_mask, None

    def checkpoint_context_fn(self):
        """`context_fn` for torch.utils.checkpoint: recompute a block in the mode it first ran in."""
        state = (self.image, self.visual_mask)

        @contextlib.contextmanager
        def replay():
            saved = (self.image, self.visual_mask)
            self.image, self.visual_mask = state
            try:
                yield
            finally:
                self.image, self.visual_mask = saved

        return contextlib.nullcontext(), replay()


class _Wrapper(nn.Module):
    """A module standing in for `original`; unknown attributes are read from the original."""

    def __init__(self, original: nn.Module, router: Router):
        super().__init__()
        self.original = original
        self._router = router  # plain attribute: not a submodule, not in the state dict

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original"], name)


class Switch(_Wrapper):
    """Runs a trainable copy of `original` in image mode, the original in text mode."""

    def __init__(self, original: nn.Module, router: Router):
        super().__init__(original, router)
        self.copy = copy.deepcopy(original).requires_grad_(True)

    def forward(self, *args, **kwargs):
        return (self.copy if self._router.image else self.original)(*args, **kwargs)


class LoRALinear(_Wrapper):
    """`original(x)` in text mode; `original(x) + B(A(x)) * alpha / r` in image mode."""

    def __init__(self, original: nn.Linear, router: Router, rank: int, alpha: float):
        super().__init__(original, router)
        weight = original.weight
        self.lora_A = nn.Parameter(torch.empty(rank, original.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(original.out_features, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x):
        y = self.original(x)
        if self._router.image:
            y = y + self.low_rank(x)
        return y

    def low_rank(self, x):
        """The image-mode update B(A(x)) * alpha / r."""
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


class Expert(_Wrapper):
    """CogVLM visual expert: visual positions go through `expert`, the rest through `original`."""

    def __init__(self, original: nn.Module, router: Router):
        super().__init__(original, router)
        self.expert = copy.deepcopy(original).requires_grad_(True)

    def forward(self, x):
        y = self.original(x)
        mask = self._router.visual_mask
        if not self._router.image or mask is None:
            return y
        return torch.where(mask.unsqueeze(-1), self.expert(x), y)
