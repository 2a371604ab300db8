"""Per-request routing between the untouched base and the multimodal delta.

A `Router` holds the mode of the forward in flight (text or image) and, for CogVLM-style experts,
which token positions are visual. The wrappers below sit where the original modules sat and, in text
mode, call the original module and nothing else, so the text path runs exactly the base's ops:

  * `Switch`     - a copied module (GenieBlue block copies; for `full`, every block and the norm)
  * `LoRALinear` - a frozen linear plus a rank-r update that only image mode adds
  * `Expert`     - CogVLM visual expert: image-token positions use the expert, text positions the
                   original; dense `torch.where`, so the graph stays static (no routing ops)

Each wrapper names its trainable children (`TRAINABLE`) and the part of the delta they are (`PART`);
`delta_members` walks them, so what counts as the delta is written here once. `swap_modules` is the
one way modules are replaced in a model (installing the delta here, quantising it in `deploy`).

This is the piece of GenieBlue that no library provides (peft adapters cannot be switched per
request together with block copies), so it is written here, kept small.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator

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
    """A module standing in for `original`; unknown attributes are read from the original.
    `TRAINABLE`: the names of its trainable children, which make up part `PART` of the delta."""

    TRAINABLE: tuple[str, ...] = ()
    PART = ""

    def __init__(self, original: nn.Module, router: Router):
        super().__init__()
        self.original = original
        self._router = router  # plain attribute: not a submodule, not in the state dict

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original"], name)


def trainable_copy(module: nn.Module, empty: bool = False) -> nn.Module:
    """A trainable deep copy of `module`; `empty`: its parameters on the meta device, without data, for
    weights about to be loaded in their place (`load_state_dict(..., assign=True)`)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta")) for p in module.parameters()} if empty else {}
    return copy.deepcopy(module, memo).requires_grad_(True)


class Switch(_Wrapper):
    """Runs a trainable copy of `original` in image mode, the original in text mode (`empty`: see
    `trainable_copy`)."""

    TRAINABLE, PART = ("copy",), "copies"

    def __init__(self, original: nn.Module, router: Router, empty: bool = False):
        super().__init__(original, router)
        self.copy = trainable_copy(original, empty)

    def forward(self, *args, **kwargs):
        return (self.copy if self._router.image else self.original)(*args, **kwargs)


class LoRALinear(_Wrapper):
    """`original(x)` in text mode; `original(x) + B(A(x)) * alpha / r` in image mode. `rank` and
    `alpha` make a fresh update; a subclass may set its own `lora_A` / `lora_B` instead."""

    TRAINABLE, PART = ("lora_A", "lora_B"), "lora"

    def __init__(
        self, original: nn.Module, router: Router, rank: int | None = None, alpha: float = 1.0, empty: bool = False
    ):
        super().__init__(original, router)
        if rank is not None:
            weight = original.weight
            like = {"dtype": weight.dtype, "device": "meta" if empty else weight.device}
            self.lora_A = nn.Parameter(torch.empty(rank, original.in_features, **like))
            self.lora_B = nn.Parameter(torch.zeros(original.out_features, rank, **like))
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

    TRAINABLE, PART = ("expert",), "experts"

    def __init__(self, original: nn.Module, router: Router, empty: bool = False):
        super().__init__(original, router)
        self.expert = trainable_copy(original, empty)

    def forward(self, x):
        y = self.original(x)
        mask = self._router.visual_mask
        if not self._router.image or mask is None:
            return y
        return torch.where(mask.unsqueeze(-1), self.expert(x), y)


def delta_members(root: nn.Module) -> Iterator[tuple[str, str, nn.Module | nn.Parameter]]:
    """(name below `root`, part, child) for every trainable child of every module under `root` that
    names its own (`TRAINABLE`, `PART`: the routing wrappers, and deploy's fused projections)."""
    for name, module in root.named_modules():
        for child in getattr(module, "TRAINABLE", ()):
            value = getattr(module, child)
            if value is not None:
                yield (f"{name}.{child}" if name else child), module.PART, value


def base_name(path: str) -> str | None:
    """The base model's name for the module at `path`: the wrappers' `original` levels dropped; None
    inside a module that is all delta (block copies, visual experts)."""
    parts = path.split(".")
    whole = {child for kind in (Switch, Expert) for child in kind.TRAINABLE}
    return None if whole & set(parts) else ".".join(p for p in parts if p != "original")


def swap_modules(
    root: nn.Module, make: Callable[[str, nn.Module], nn.Module], where: Callable[[str, nn.Module], bool]
) -> None:
    """Replace every submodule of `root` for which `where(name, module)` holds by `make(name, module)`."""
    for name, module in list(root.named_modules()):
        if name and where(name, module):
            parent, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent), attr, make(name, module))
