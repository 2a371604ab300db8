"""Weight-only quantisation for on-device deployment: W4A16 for the LLM (base and block copies; the
copies at 8 bits with `copy_bits=8`; the embedding and LM head at 8 bits) and W8A16 for LoRA and the
vision tower's linear layers (encoder, token mixer, projector). Weights are
stored as blocks of `block_size` 4- or 8-bit integers q along the input dimension, each block with a
float scale s and a zero point z: w = (q - z) * s; activations stay float. z is the implicit
2^(bits-1) (symmetric), or one per block (asymmetric, packed like q), and a block may add a float
offset o: w = (q - z) * s + o, the form of a GGUF Q4_1 block (d * q + m, see `gguf_weights`).

The packing is onnxruntime's `MatMulNBits` layout ((out, blocks, block bytes) uint8, (out * blocks)
scales, (out, packed blocks) uint8 zero points), computed by onnxruntime's own round-to-nearest
quantiser, so the exported ONNX graphs read the very bytes the PyTorch modules here use. onnxruntime
also takes float zero points, but its CPU kernel then runs many times slower (1.32; measured in
docs/results/2026-12-02-deployment.md), so offsets are exported as one small extra product instead:
o . (x summed per block), with the block sums of x (ReduceSum) times the (blocks, out) offsets.
Quantising is deterministic: the text path of a quantised GenieBlue model is bit-identical to its
base quantised on its own.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model import GenieBlueForConditionalGeneration
from ..model.routing import LoRALinear, Router, base_name, swap_modules

BLOCK_SIZE = 32
"""Inputs per quantisation block (one scale each)."""
LLM_BITS = 4
"""Base LLM weights and block copies (W4A16)."""
DELTA_BITS = 8
"""LoRA, ViT and projector (W8A16)."""
SYMMETRIC = True
"""LLM weights without zero points (implicit 2^(bits-1)); False: one zero point per block. Symmetric
measured better (docs/results/2026-12-01-deployment.md)."""
TABLE_BITS = 8
"""The embedding table and LM head (tied or not): 8-bit, as two 4-bit planes (`PlanarLinear`); at 4
bits they cost most of W4A16's perplexity (docs/results/2026-12-01-deployment.md)."""


def quantize_weight(
    weight: torch.Tensor, bits: int, block_size: int = BLOCK_SIZE, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(out, in) float weight -> packed (out, blocks, block_size * bits / 8) uint8, (out * blocks,)
    float32 scales and, unless `symmetric`, (out, ceil(blocks * bits / 8)) packed uint8 zero points,
    by onnxruntime's MatMulNBits quantiser (inputs zero-padded to whole blocks)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    quantizer = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    out_features, in_features = weight.shape
    blocks = -(-in_features // block_size)
    transposed = weight.detach().float().T.numpy()
    padded = np.zeros((blocks * block_size, out_features), np.float32)
    padded[:in_features] = transposed
    packed = np.zeros((out_features, blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros((out_features, blocks), np.float32)
    zero_points = np.zeros((out_features, -(-blocks * bits // 8)), np.uint8)
    quantizer(packed, padded, scales, zero_points, block_size, out_features, in_features, symmetric)
    return (
        torch.from_numpy(packed),
        torch.from_numpy(scales.reshape(-1)),
        None if symmetric else torch.from_numpy(zero_points),
    )


def _values(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed bytes (..., blocks, bytes) -> unsigned integers (..., blocks, block_size), in order."""
    if bits == 8:
        return packed
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def _blocks(values: torch.Tensor, scales, zero_points, offsets, bits: int, dtype) -> torch.Tensor:
    """Unsigned values (..., blocks, block_size) -> float (q - z) * s [+ o], with scales, offsets
    (..., blocks) and packed zero points (..., zero bytes) or None (z = 2^(bits-1), no offset)."""
    blocks = values.shape[-2]
    zero = 2 ** (bits - 1) if zero_points is None else _values(zero_points, bits)[..., :blocks, None]
    weight = (values.to(dtype) - zero) * scales.unsqueeze(-1).to(dtype)
    return weight if offsets is None else weight + offsets.unsqueeze(-1).to(dtype)


def dequantize_rows(
    packed: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    columns: int,
    dtype: torch.dtype,
    zero_points: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed rows (..., blocks, bytes) and their scales, offsets (..., blocks) and zero points
    (..., zero bytes) -> float rows (..., columns)."""
    return _blocks(_values(packed, bits), scales, zero_points, offsets, bits, dtype).flatten(-2)[..., :columns]


def dequantize_matrix(
    packed: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    shape: tuple[int, int],
    block_size: int,
    dtype: torch.dtype,
    zero_points: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float (out, in) = `shape` weight of MatMulNBits-layout `packed`, flat `scales` and
    optional zero points and (out, blocks) offsets. Shapes come from Python ints, so an exported
    graph holds a few constant-shape ops that onnxruntime folds into the float weight when it loads
    the graph."""
    rows, columns = shape
    blocks = -(-columns // block_size)
    values = _values(packed, bits).reshape(rows, blocks, block_size) if bits == 4 else packed
    weight = _blocks(values, scales.reshape(rows, blocks), zero_points, offsets, bits, dtype)
    weight = weight.reshape(rows, blocks * block_size)
    return weight if columns == blocks * block_size else weight[:, :columns]


class _MatMulNBits(torch.autograd.Function):
    """x @ W.T for a packed W; exported as onnxruntime's com.microsoft::MatMulNBits (plus, for
    offsets, x's block sums times the offsets: see the module docstring)."""

    @staticmethod
    def forward(ctx, x, packed, scales, zero_points, offsets, in_features: int, bits: int, block_size: int):
        shape = (packed.shape[0], in_features)
        return F.linear(x, dequantize_matrix(packed, scales, bits, shape, block_size, x.dtype, zero_points, offsets))

    @staticmethod
    def symbolic(g, x, packed, scales, zero_points, offsets, in_features, bits, block_size):
        n = packed.type().sizes()[0]
        inputs = (x, packed, scales) if zero_points is None else (x, packed, scales, zero_points)
        y = g.op("com.microsoft::MatMulNBits", *inputs, K_i=in_features, N_i=n, bits_i=bits, block_size_i=block_size)
        sizes = x.type().varyingSizes()
        if sizes is not None:  # tell the exporter's shape inference what comes out: (..., N), x's dtype
            y.setType(x.type().with_sizes(sizes[:-1] + [n]))
        if offsets is None:
            return y
        blocks = offsets.type().sizes()[1]  # (..., K) -> (..., blocks, block_size); 0 keeps a dimension
        shape = g.op("Constant", value_t=torch.tensor([0] * (x.type().dim() - 2) + [-1, blocks, block_size]))
        sums = g.op("ReduceSum", g.op("Reshape", x, shape), g.op("Constant", value_t=torch.tensor([-1])), keepdims_i=0)
        return g.op("Add", y, g.op("MatMul", sums, g.op("Transpose", offsets, perm_i=[1, 0])))


def block_size_for(in_features: int, block_size: int = BLOCK_SIZE) -> int:
    """`block_size`, or for narrower inputs (LoRA B: the rank) the smallest power of two >= 16
    (MatMulNBits' minimum) that covers them, so padding stays small."""
    return block_size if in_features >= block_size else max(16, 1 << (in_features - 1).bit_length())


class WeightOnlyLinear(nn.Module):
    """A linear layer whose weight is held quantised (`bits` per value, one scale, and optionally
    one zero point and one offset, per block of `block_size` inputs) and dequantised on the fly;
    activations and bias stay float.

    `keep_packed` exports it as MatMulNBits (the weight stays packed in memory); otherwise as plain
    ops that onnxruntime folds into a float weight when it loads the graph - for the rank-r LoRA
    slivers, where a MatMulNBits call costs more than the float weight's memory."""

    def __init__(
        self,
        packed,
        scales,
        in_features: int,
        bits: int,
        block_size: int,
        bias=None,
        keep_packed: bool = True,
        zero_points=None,
        offsets=None,
    ):
        super().__init__()
        if offsets is not None and in_features % block_size:
            raise ValueError(f"offsets need whole blocks: {in_features} inputs, blocks of {block_size}")
        self.in_features, self.out_features = in_features, packed.shape[0]
        self.bits, self.block_size, self.keep_packed = bits, block_size, keep_packed
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zero_points)
        self.register_buffer("offsets", offsets)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bits: int,
        block_size: int = BLOCK_SIZE,
        bias=None,
        keep_packed: bool = True,
        symmetric: bool = True,
    ) -> WeightOnlyLinear:
        block = block_size_for(weight.shape[1], block_size)
        packed, scales, zero_points = quantize_weight(weight, bits, block, symmetric)
        return cls(packed, scales, weight.shape[1], bits, block, bias, keep_packed, zero_points)

    def planes(self) -> list[WeightOnlyLinear]:
        """The 4- or 8-bit layers whose weights add up to this one's: itself (see `PlanarLinear`)."""
        return [self]

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The float (out, in) weight."""
        shape = (self.out_features, self.in_features)
        return dequantize_matrix(
            self.packed, self.scales, self.bits, shape, self.block_size, dtype, self.zero_points, self.offsets
        )

    def forward(self, x):
        if self.keep_packed:
            y = _MatMulNBits.apply(
                x,
                self.packed,
                self.scales,
                self.zero_points,
                self.offsets,
                self.in_features,
                self.bits,
                self.block_size,
            )
        else:
            y = F.linear(x, self.dequantized(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, block_size={self.block_size}, "
            f"zero_points={self.zero_points is not None}, offsets={self.offsets is not None}, "
            f"keep_packed={self.keep_packed}"
        )


class PlanarLinear(nn.Module):
    """An 8-bit weight (MatMulNBits layout, implicit zero point 128) held as two 4-bit planes of its
    values q = 16 h + l: `high` (h, scale 16 s, implicit zero point 8) and `low` (l, scale s, zero
    point 0), whose weights add up to s (q - 128) exactly when s has at most 20 significant bits (a
    GGUF's float16 scales; `quantize_llm` rounds its tables' scales to float16). Exported as two 4-bit
    MatMulNBits and an Add: with float activations onnxruntime's 8-bit MatMulNBits runs tens of times
    slower than the two 4-bit ones on the CPU (1.32; docs/results/2026-12-02-deployment.md); with int8
    activations, where the 8-bit op is fast, the built decoder graph runs one (`merge_planes`).
    Eagerly it computes with the summed (exact) weight."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, in_features: int, block_size: int, bias=None):
        super().__init__()
        rows, blocks = packed.shape[:2]
        self.in_features, self.out_features, self.bits = in_features, rows, 8

        def nibbles(values):
            return values[..., 0::2] | (values[..., 1::2] << 4)

        self.high = WeightOnlyLinear(nibbles(packed >> 4), scales * 16, in_features, 4, block_size, bias)
        zero = torch.zeros(rows, -(-blocks // 2), dtype=torch.uint8)
        self.low = WeightOnlyLinear(nibbles(packed & 15), scales, in_features, 4, block_size, zero_points=zero)

    def planes(self) -> list[WeightOnlyLinear]:
        return [self.high, self.low]

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.high.dequantized(dtype) + self.low.dequantized(dtype)

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            return self.high(x) + self.low(x)
        y = F.linear(x, self.dequantized(x.dtype))
        return y if self.high.bias is None else y + self.high.bias


def merge_planes(high: WeightOnlyLinear, low: WeightOnlyLinear) -> WeightOnlyLinear:
    """The one 8-bit layer (values q = 16 h + l, scales s, implicit zero point 128) whose weight the
    planes of a `PlanarLinear` add up to: for onnxruntime's 8-bit MatMulNBits with int8 activations,
    which runs as fast per byte as its 4-bit one (with float activations it does not: see above)."""
    values = 16 * _values(high.packed, 4) + _values(low.packed, 4)
    return WeightOnlyLinear(values, low.scales, low.in_features, 8, low.block_size, high.bias)


class WeightOnlyEmbedding(nn.Module):
    """An embedding table held quantised like `WeightOnlyLinear` or `PlanarLinear` (for a tied LM
    head: the same modules and buffers); looked-up rows are dequantised (planes summed). Keeps a
    scaled embedding's factor (Gemma)."""

    def __init__(self, table: WeightOnlyLinear | PlanarLinear, embed_scale: float | None = None):
        super().__init__()
        self.embedding_dim = table.in_features
        self.planes = nn.ModuleList(table.planes())
        self.embed_scale = embed_scale

    def forward(self, input_ids):
        rows = 0
        for plane in self.planes:
            blocks = plane.packed.shape[1]  # gather the rows' scales from the flat (MatMulNBits) layout
            scales = plane.scales[input_ids.unsqueeze(-1) * blocks + torch.arange(blocks, device=input_ids.device)]
            zero_points, offsets = (None if t is None else t[input_ids] for t in (plane.zero_points, plane.offsets))
            rows = rows + dequantize_rows(
                plane.packed[input_ids],
                scales,
                plane.bits,
                self.embedding_dim,
                plane.scales.dtype,
                zero_points,
                offsets,
            )
        return rows if self.embed_scale is None else rows * self.embed_scale


class QuantizedLoRALinear(LoRALinear):
    """`LoRALinear` with a quantised original and 8-bit A and B (B pre-multiplied by alpha / r,
    both dequantised at load by onnxruntime: see `WeightOnlyLinear.keep_packed`)."""

    def __init__(self, lora: LoRALinear, original: WeightOnlyLinear, router: Router, delta_bits: int, block_size: int):
        super().__init__(original, router)
        self.lora_A = WeightOnlyLinear.from_weight(lora.lora_A, delta_bits, block_size, keep_packed=False)
        self.lora_B = WeightOnlyLinear.from_weight(
            lora.lora_B * lora.scaling, delta_bits, block_size, keep_packed=False
        )

    def low_rank(self, x):
        return self.lora_B(self.lora_A(x))


def _replace(root: nn.Module, make, kind: type) -> None:
    """Swap every submodule that is a `kind` for `make(name, module)`."""
    swap_modules(root, make, lambda _, module: isinstance(module, kind))


def _llm_quantizer(
    bits: int, block_size: int, symmetric: bool, kept: dict[str, nn.Module] | None, copy_bits: int | None = None
):
    """(name, linear or embedding, table bits or None) -> its `kept` layer (by base name), else the
    weight quantised: an embedding table / LM head at its table bits, a layer of the delta (block
    copies) at `copy_bits` (default `bits`), any other at `bits`; 8-bit LLM layers as `PlanarLinear`."""
    kept = kept or {}

    def make(name: str, module: nn.Module, table_bits: int | None = None) -> WeightOnlyLinear | PlanarLinear:
        base, bias = base_name(name), getattr(module, "bias", None)
        if base in kept:
            return kept[base]
        width = table_bits or (copy_bits if base is None and copy_bits else bits)
        if width == 8:
            packed, scales, _ = quantize_weight(module.weight, 8, block_size)
            return PlanarLinear(packed, scales.half().float(), module.weight.shape[1], block_size, bias)
        return WeightOnlyLinear.from_weight(module.weight, width, block_size, bias, symmetric=symmetric)

    return make


@torch.no_grad()
def quantize_llm(
    llm: nn.Module,
    bits: int = LLM_BITS,
    block_size: int = BLOCK_SIZE,
    symmetric: bool = SYMMETRIC,
    kept: dict[str, nn.Module] | None = None,
    table_bits: int = TABLE_BITS,
    copy_bits: int | None = None,
) -> nn.Module:
    """In place: every linear layer of a causal LM to `bits`-bit weight-only blocks (a GenieBlue
    LLM's block copies to `copy_bits`, default `bits`), its input embedding and LM head to
    `table_bits`, or, for the base module names in `kept`, to those layers (a GGUF's own blocks: see
    `gguf_weights`). A tied LM head and embedding keep sharing one table."""
    if {bits, table_bits, copy_bits or bits} - {4, 8}:
        raise ValueError(
            f"LLM weights quantise to 4 or 8 bits, not {sorted({bits, table_bits, copy_bits or bits} - {4, 8})}"
        )
    make = _llm_quantizer(bits, block_size, symmetric, kept, copy_bits)
    embed, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    names = {id(m): n for n, m in llm.named_modules()}
    tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
    table = make(names[id(embed)], embed, table_bits)
    if tied:
        llm.set_output_embeddings(table)
    elif isinstance(head, nn.Linear):
        llm.set_output_embeddings(make(names[id(head)], head, table_bits))
    llm.set_input_embeddings(WeightOnlyEmbedding(table, getattr(embed, "scalar_embed_scale", None)))
    _replace(llm, make, nn.Linear)
    return llm


@torch.no_grad()
def quantize_model(
    model: GenieBlueForConditionalGeneration,
    bits: int = LLM_BITS,
    delta_bits: int = DELTA_BITS,
    block_size: int = BLOCK_SIZE,
    symmetric: bool = SYMMETRIC,
    kept: dict[str, nn.Module] | None = None,
    table_bits: int = TABLE_BITS,
    copy_bits: int | None = None,
) -> GenieBlueForConditionalGeneration:
    """Quantise a GenieBlue model in place, weight-only (W4A16 for the LLM, W8A16 for the delta).
    The encoder's patch convolution, position embeddings and norms stay float.

    Args:
        model: the model to quantise (float, not quantised before).
        bits: the base LLM's and the block copies' weights, 4 or 8.
        delta_bits: LoRA and the vision tower's linear layers (symmetric).
        block_size: inputs per quantisation block (one scale each).
        symmetric: no zero points (implicit 2^(bits-1)); False: one zero point per block.
        kept: base module names -> ready quantised layers (a GGUF's own blocks, `gguf_weights`),
            used as they are.
        table_bits: the embedding table and LM head.
        copy_bits: the block copies, if not `bits`.

    Returns:
        `model`, quantised.

    Raises:
        ValueError: the model is already quantised, or a bit width other than 4 or 8.
    """
    if any(isinstance(m, (WeightOnlyLinear, PlanarLinear)) for m in model.modules()):
        raise ValueError("the model is already quantised")
    make = _llm_quantizer(bits, block_size, symmetric, kept, copy_bits)
    _replace(
        model.llm,
        lambda name, m: QuantizedLoRALinear(
            m, make(f"{name}.original", m.original), model.router, delta_bits, block_size
        ),
        LoRALinear,
    )
    quantize_llm(model.llm, bits, block_size, symmetric, kept, table_bits, copy_bits)
    _replace(
        model.vision, lambda name, m: WeightOnlyLinear.from_weight(m.weight, delta_bits, block_size, m.bias), nn.Linear
    )
    return model
