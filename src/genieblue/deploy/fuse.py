"""Export-time fusion of the projections that read one input: q/k/v of every attention and gate/up
of every MLP (base blocks, block copies and the ViT) become one MatMulNBits over the members'
weights concatenated by output, then a Split; on the image path the members' LoRA updates become
one low-rank update (A stacked, B block-diagonal) added before the Split. onnxruntime spends a
fixed few microseconds on every op however small, and LoRA's rank-8 slivers are nearly all such
overhead: fusing them is what brings image-mode decode close to text-mode decode (Table 9).

The fused tensors are what the files store: the concatenated base weights are the same bytes in
one tensor, which the text graph and the image graph both read from base.onnx.data; the fused LoRA
(8-bit, dequantised by onnxruntime when it loads the image graph) goes to delta.onnx.data. The
PyTorch model is only rerouted while the graphs are traced: outside `fused_projections` its text
path runs the quantised base op for op.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from ..model.routing import SIBLINGS
from .quant import QuantizedLoRALinear, WeightOnlyLinear


def _base(member: nn.Module) -> WeightOnlyLinear:
    return member.original if isinstance(member, QuantizedLoRALinear) else member


def _fusable(members: list[nn.Module | None]) -> bool:
    """All members MatMulNBits projections of one input width, bit width, block size and form
    (zero points or not, offsets or not)."""
    bases = [_base(m) for m in members if m is not None]
    return (
        len(bases) == len(members)
        and all(isinstance(b, WeightOnlyLinear) and b.keep_packed for b in bases)
        and len({(b.in_features, b.bits, b.block_size, b.zero_points is None, b.offsets is None) for b in bases}) == 1
    )


class FusedProjections(WeightOnlyLinear):
    """Sibling projections as one: their packed weights, scales, zero points, offsets and biases
    concatenated by output (a member without a bias adds zeros) and, where members have LoRA, one
    low-rank update with the A matrices stacked (`lora_A`, their bytes concatenated) and the B matrices block-diagonal
    (`lora_B`, requantised: bit-exact while each member's rank fits one quantisation block, as any
    power-of-two rank does). `output(i, x)` is member i's output: the first member called on an input
    computes the whole group, the others take their slice of that result. Its LoRA is delta (`TRAINABLE`,
    as the routing wrappers name theirs)."""

    TRAINABLE, PART = ("lora_A", "lora_B"), "lora"

    def __init__(self, members: list[nn.Module], router):
        bases = [_base(m) for m in members]
        bias = None
        if any(b.bias is not None for b in bases):
            bias = torch.cat([b.scales.new_zeros(b.out_features) if b.bias is None else b.bias for b in bases])
        first = bases[0]
        zero_points, offsets = (
            None if getattr(first, name) is None else torch.cat([getattr(b, name) for b in bases])
            for name in ("zero_points", "offsets")
        )
        super().__init__(
            torch.cat([b.packed for b in bases]),
            torch.cat([b.scales for b in bases]),
            first.in_features,
            first.bits,
            first.block_size,
            bias,
            zero_points=zero_points,
            offsets=offsets,
        )
        self.members, self.router = members, router  # plain attributes: not submodules
        self.sizes = [b.out_features for b in bases]
        self._last = None  # (input, image mode, outputs)
        loras = [m for m in members if isinstance(m, QuantizedLoRALinear)]
        self.lora_A = self.lora_B = None
        if loras:
            a = [m.lora_A for m in loras]
            self.lora_A = WeightOnlyLinear(
                torch.cat([x.packed for x in a]),
                torch.cat([x.scales for x in a]),
                a[0].in_features,
                a[0].bits,
                a[0].block_size,
                keep_packed=False,
            )
            self.lora_B = WeightOnlyLinear.from_weight(self._block_diagonal(), loras[0].lora_B.bits, keep_packed=False)

    def _block_diagonal(self) -> torch.Tensor:
        """The members' LoRA B side by side, (outputs, total rank): member i's B in its own rows and
        its own rank's columns (zero rows for a member without LoRA)."""
        blocks = [
            m.lora_B.dequantized(torch.float32) if isinstance(m, QuantizedLoRALinear) else None for m in self.members
        ]
        weight = torch.zeros(self.out_features, self.lora_A.out_features)
        row = column = 0
        for block, size in zip(blocks, self.sizes):
            if block is not None:
                weight[row : row + size, column : column + block.shape[1]] = block
                column += block.shape[1]
            row += size
        return weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = super().forward(x)
        if self.router.image and self.lora_A is not None:
            y = y + self.lora_B(self.lora_A(x))
        return y.split(self.sizes, -1)

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not x or self._last[1] != self.router.image:
            self._last = (x, self.router.image, self(x))
        return self._last[2][index]


@contextlib.contextmanager
def fused_projections(model) -> Iterator[list[FusedProjections]]:
    """Within the block, every fusable sibling group of the quantised `model` (see SIBLINGS) is a
    `FusedProjections` child of its module, named after its members ("q_proj+k_proj+v_proj"), and
    the members hand their calls to it; yields the groups. A float model has none."""
    found = [
        (parent, names)
        for parent in model.modules()
        for names in SIBLINGS
        if _fusable([parent._modules.get(name) for name in names])
    ]
    groups = []
    try:
        for parent, names in found:
            group = FusedProjections([parent._modules[name] for name in names], model.router)
            parent.add_module("+".join(names), group)
            groups.append(group)
            for index, member in enumerate(group.members):
                member.forward = functools.partial(group.output, index)
        yield groups
    finally:
        for (parent, names), group in zip(found, groups):
            delattr(parent, "+".join(names))
            for member in group.members:
                vars(member).pop("forward", None)
