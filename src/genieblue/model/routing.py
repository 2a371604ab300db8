"""Per-request routing between the untouched base and the multimodal delta.

A `Router` holds the mode of the forward in flight (text or image) and, for CogVLM-style experts,
which token positions are visual. The wrappers below sit where the original modules sat and, in text
mode, call the original module and nothing else, so the text path runs exactly the base's ops:

  * `Switch`     - a copied module (GenieBlue block copies; for `full`, every block and the norm)
  * `LoRALinear` - a frozen linear plus a rank-r update that only image mode adds; sibling projections
                   that read one input (q/k/v, gate/up: `SIBLINGS`) share one product for their A
                   (`LoRAGroup`)
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
from transformers import PretrainedConfig

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Children of one attention / MLP module that read the same input (every supported LLM family;
SigLIP and CLIP have q/k/v)."""


class Router:
    """Mode of the current forward. `visual_mask` (B, T) is set for the next decoder forward only
    (a prefill), so decode steps after an image prompt see text tokens. `fused_lora`: image mode adds
    LoRA the fast way (`LoRALinear.fused`); off, as the plain `B(A(x)) * alpha / r` per
    projection (the same update, for comparisons)."""

    def __init__(self):
        self.image = False
        self.fused_lora = True
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
    """A trainable deep copy of `module` that shares the model's config objects (a change the model
    makes to its config, such as `set_attn_implementation`, reaches the copy too); `empty`: its
    parameters on the meta device, without data, for weights about to be loaded in their place
    (`load_state_dict(..., assign=True)`)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta")) for p in module.parameters()} if empty else {}
    memo.update(
        {id(m.config): m.config for m in module.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)}
    )
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
    group: LoRAGroup | None = None  # set by `group_siblings`: a plain attribute, not in the state dict

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
        if not self._router.image:
            return self.original(x)
        if self._router.fused_lora and self.group is not None:
            return self.fused(x)
        return self.original(x) + self.low_rank(x)

    def low_rank(self, x):
        """The image-mode update B(A(x)) * alpha / r."""
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    @property
    def fusable(self) -> bool:
        """A float linear with trainable A and B (not deploy's quantised form): `fused` applies, once
        `group_siblings` has given it a group."""
        return isinstance(self.lora_A, nn.Parameter) and isinstance(self.original, nn.Linear)

    def fused(self, x):
        """`original(x) + low_rank(x)` in two products and no op of its own on activations: x A'^T with
        A' = A * alpha / r (the scale folded into the small A; one product with the siblings in `group`),
        then the B product added to the original's fresh output in place (addmm_: y += z B^T). During a
        decode on a shared base, the group's one product for all siblings (`LoRAGroup.output`)."""
        if self.group.outputs_whole:
            return self.group.output(self, x)
        z = self.group.project(self, x)
        y = self.original(x.reshape(-1, x.shape[-1]))  # 2-D: a new tensor, not a view (in place is cheap)
        b = self.lora_B
        if z.dtype != y.dtype or b.dtype != y.dtype:  # under autocast: the update in the output's dtype
            z, b = z.to(y.dtype), b.to(y.dtype)
        y.addmm_(z.reshape(-1, z.shape[-1]), b.t())
        return y.view(*x.shape[:-1], y.shape[-1])


def _scaled(weight: torch.Tensor, scale: float) -> torch.Tensor:
    return weight if scale == 1 else weight * scale


class LoRAGroup:
    """The LoRA of sibling projections that read one input (`SIBLINGS`), or of one projection alone:
    the first member called on an input computes x A^T for all of them in one product (their A stacked,
    scale folded in), each member takes its slice and applies its own B (the group's B is
    block-diagonal). A fused A's product reads x once, and its backward reads x once and writes one input
    gradient, where separate ones do it per member. The input and the slices not yet taken are held only
    until every member has taken its own. During a decode (`held_lora`) the stacked, scaled A is made
    once, not at every step; and where `share_base` has laid the members' frozen weights out in one
    buffer with rows for that A below them, the first member computes every member's whole output in
    two products: x times the buffer (every member's base output and x A'^T at once, the biases added),
    then the B product (block-diagonal B) added in place, as the deployed graphs do."""

    def __init__(self, members: list[LoRALinear]):
        self.members = members
        self._input: torch.Tensor | None = None
        self._left: dict[int, torch.Tensor] = {}
        self._held: torch.Tensor | None = None  # the weight `hold` made (kept for the next hold)
        self._holding = False
        self._base: torch.Tensor | None = None  # the members' frozen weights, then `_held`: one buffer
        self._held_b: torch.Tensor | None = None  # during a hold on a shared base: B block-diagonal
        self._held_bias: torch.Tensor | None = None  # and the members' biases concatenated (or None)
        self._sharing = False

    def weight(self) -> torch.Tensor:
        """The members' A stacked, their scale folded in."""
        if self._holding:
            return self._held
        a = [m.lora_A for m in self.members]
        return _scaled(a[0] if len(a) == 1 else torch.cat(a), self.members[0].scaling)

    def share_base(self) -> bool:
        """Lay the members' frozen weights out in one buffer, each original's weight a view of its rows
        (the same values, and the same ops in text mode), followed by rows for the stacked A that a hold
        writes; returns whether they share one. Only plain float linears of one input width and dtype
        whose views start 256-byte aligned (what a fresh tensor gives the matrix kernels) are laid out;
        a model moved since is noticed at the next hold, which then leaves the base unshared."""
        originals = [m.original for m in self.members]
        if self._shares():
            return True
        if any(type(o) is not nn.Linear or o.weight.requires_grad for o in originals):
            return False
        if len({o.bias is None for o in originals}) != 1:
            return False
        weights = [o.weight for o in originals]
        if len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1:
            return False
        rows = [w.shape[0] for w in weights]
        if any(sum(rows[:i]) * weights[0][0].nbytes % 256 for i in range(1, len(rows))):
            return False
        rank = sum(m.lora_A.shape[0] for m in self.members)
        self._base = weights[0].new_zeros(sum(rows) + rank, weights[0].shape[1])
        torch._dynamo.mark_static_address(self._base)  # compiled graphs read it in place, as a parameter
        with torch.no_grad():
            for o, view in zip(originals, self._base[: sum(rows)].split(rows)):
                o.weight = nn.Parameter(view.copy_(o.weight), requires_grad=False)
        self._held = self._base[sum(rows) :]  # the stacked, scaled A: written there by each hold
        return True

    def _shares(self) -> bool:
        """Whether the members' weights are still the views `share_base` made."""
        if self._base is None:
            return False
        rows = [m.original.weight.shape[0] for m in self.members]
        views = self._base[: sum(rows)].split(rows)
        return all(
            m.original.weight.data_ptr() == v.data_ptr() and m.original.weight.shape == v.shape
            for m, v in zip(self.members, views)
        )

    def hold(self) -> None:
        """Make the weights once and use them until `release` (the weights must not change meanwhile):
        the stacked, scaled A, and on a shared base the block-diagonal B and the biases (zeros for the A
        rows). Each is written into the previous hold's tensor (on a shared base, A into the buffer's
        own rows), so a CUDA graph captured in one decode reads the next's (marked a static address for
        torch.compile's graphs too, as transformers' StaticCache is)."""
        with torch.no_grad():
            weight, self._sharing = self.weight(), self._shares()
            if not self._sharing:
                if self._base is not None:  # weights moved since `share_base`: let the old buffer go
                    self._base = self._held = None
            else:
                dtype = self._base.dtype
                weight = weight.to(dtype)
                self._held_b = _into(self._held_b, torch.block_diag(*(m.lora_B.to(dtype) for m in self.members)))
                biases = [m.original.bias for m in self.members]
                if biases[0] is not None:  # zeros for the A rows
                    biases = torch.cat([*biases, biases[0].new_zeros(weight.shape[0])]).to(dtype)
                    self._held_bias = _into(self._held_bias, biases)
            self._held = _into(self._held, weight)
        self._holding = True

    def release(self) -> None:
        self._holding = self._sharing = False

    def _share(self, member: LoRALinear, x: torch.Tensor, compute) -> torch.Tensor:
        """`member`'s part of `compute(x)` (a tuple, one per member), computed by the first member
        called on `x` and kept until every member has taken its own."""
        index = self.members.index(member)
        if x is not self._input or index not in self._left:
            self._input, self._left = x, dict(enumerate(compute(x)))
        out = self._left.pop(index)
        if not self._left:
            self._input = None
        return out

    def project(self, member: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """`member`'s slice of x A'^T."""
        return self._share(member, x, self._products)

    def _products(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = F.linear(x, self.weight())
        return z.split([m.lora_A.shape[0] for m in self.members], -1) if len(self.members) > 1 else (z,)

    @property
    def outputs_whole(self) -> bool:
        """Held on a shared base: `output` gives each member's whole output."""
        return self._holding and self._sharing

    def output(self, member: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """`member`'s whole output, original(x) + its update (see the class; during a hold on a shared base)."""
        return self._share(member, x, self._outputs)

    def _outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = x.reshape(-1, x.shape[-1])
        y = F.linear(flat, self._base, self._held_bias)  # every member's base output, then x A'^T
        width = y.shape[-1] - self._held.shape[0]
        out = y[:, :width]
        out.addmm_(y[:, width:], self._held_b.t())
        return tuple(part.view(*x.shape[:-1], -1) for part in out.split([m.out_features for m in self.members], -1))


def _into(held: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """`value` written into `held` where shape, dtype and device agree, else a new tensor marked a
    static address (a decode's graphs read it in place)."""
    if held is not None and (held.shape, held.dtype, held.device) == (value.shape, value.dtype, value.device):
        return held.copy_(value)
    held = value.clone()
    torch._dynamo.mark_static_address(held)
    return held


def group_siblings(root: nn.Module) -> list[LoRAGroup]:
    """Join the LoRA of every sibling set (`SIBLINGS`) under `root` whose members are all fusable
    `LoRALinear`s of one input width, scale and dtype into a `LoRAGroup`, and every other fusable
    `LoRALinear` into a group of its own; returns the groups."""
    groups = []
    for parent in root.modules():
        for names in SIBLINGS:
            members = [parent._modules.get(name) for name in names]
            if not all(isinstance(m, LoRALinear) and m.fusable for m in members):
                continue
            if len({(m.lora_A.shape[1], m.scaling, m.lora_A.dtype) for m in members}) != 1:
                continue
            groups.append(LoRAGroup(members))
    grouped = {id(m) for group in groups for m in group.members}
    groups += [
        LoRAGroup([m]) for m in root.modules() if isinstance(m, LoRALinear) and m.fusable and id(m) not in grouped
    ]
    for group in groups:
        for member in group.members:
            member.group = group
    return groups


def lora_groups(root: nn.Module) -> list[LoRAGroup]:
    """The LoRA groups under `root` (each once), as `group_siblings` formed them."""
    return list({id(m.group): m.group for m in root.modules() if isinstance(m, LoRALinear) and m.group}.values())


def share_sibling_bases(root: nn.Module) -> int:
    """`LoRAGroup.share_base` for every LoRA group under `root` (a decoder's, before it captures or
    compiles anything: graphs read the weights where they are); returns how many groups share one."""
    return sum(group.share_base() for group in lora_groups(root))


@contextlib.contextmanager
def held_lora(root: nn.Module):
    """Within it (a decode: no weight changes between its steps), each LoRA group's stacked, scaled A
    under `root` (and, on a shared base, its block-diagonal B and biases) is made once, on entry
    (`LoRAGroup.hold`), instead of at every step."""
    groups = lora_groups(root)
    for group in groups:
        group.hold()
    try:
        yield
    finally:
        for group in groups:
            group.release()


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


def base_state_dict(root: nn.Module) -> dict[str, torch.Tensor]:
    """The base's own tensors of a model the wrappers may be installed in, by the base's names (the
    wrappers' `original` levels dropped), without any tensor of the delta."""
    delta = tuple(f"{name}." if isinstance(child, nn.Module) else name for name, _, child in delta_members(root))
    return {base_name(k): v for k, v in root.state_dict().items() if not k.startswith(delta)}


def swap_modules(
    root: nn.Module, make: Callable[[str, nn.Module], nn.Module], where: Callable[[str, nn.Module], bool]
) -> None:
    """Replace every submodule of `root` for which `where(name, module)` holds by `make(name, module)`."""
    for name, module in list(root.named_modules()):
        if name and where(name, module):
            parent, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent), attr, make(name, module))
