"""Weight-only quantisation for on-device deployment: W4A16 for the LLM (base and block copies) and
W8A16 for LoRA, the ViT and the projector. Weights are stored as blocks of `block_size` 4- or 8-bit
integers along the input dimension with one float scale per block (symmetric, implicit zero point
2^(bits-1)); activations stay float.

The packing is onnxruntime's `MatMulNBits` layout ((out, blocks, block bytes) uint8 + (out * blocks)
scales), computed by onnxruntime's own round-to-nearest quantiser, so the exported ONNX graphs read
the very bytes the PyTorch modules here use. Quantising is deterministic: the text path of a
quantised GenieBlue model is bit-identical to its base quantised on its own.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model import GenieBlueForConditionalGeneration
from ..model.routing import LoRALinear, _Wrapper

BLOCK_SIZE = 32
"""Inputs per quantisation block (one scale each)."""
LLM_BITS = 4
"""Base LLM weights and block copies (W4A16)."""
DELTA_BITS = 8
"""LoRA, ViT and projector (W8A16)."""


def quantize_weight(weight: torch.Tensor, bits: int, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> packed (out, blocks, block_size * bits / 8) uint8 and (out * blocks,)
    float32 scales, by onnxruntime's MatMulNBits quantiser (inputs zero-padded to whole blocks)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    quantizer = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    out_features, in_features = weight.shape
    blocks = -(-in_features // block_size)
    transposed = weight.detach().float().T.numpy()
    padded = np.zeros((blocks * block_size, out_features), np.float32)
    padded[:in_features] = transposed
    packed = np.zeros((out_features, blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros((out_features, blocks), np.float32)
    zero_points = np.zeros((out_features, -(-blocks * bits // 8)), np.uint8)  # unused when symmetric
    quantizer(packed, padded, scales, zero_points, block_size, out_features, in_features, True)
    return torch.from_numpy(packed), torch.from_numpy(scales.reshape(-1))


def _values(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed bytes (..., blocks, bytes) -> unsigned integers (..., blocks, block_size), in order."""
    if bits == 8:
        return packed
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def dequantize_rows(packed: torch.Tensor, scales: torch.Tensor, bits: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed rows (..., blocks, bytes) and their scales (..., blocks) -> float rows (..., columns)."""
    centred = _values(packed, bits).to(dtype) - 2 ** (bits - 1)
    return (centred * scales.unsqueeze(-1).to(dtype)).flatten(-2)[..., :columns]


def dequantize_matrix(packed: torch.Tensor, scales: torch.Tensor, bits: int, shape: tuple[int, int], block_size: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """The float (out, in) = `shape` weight of MatMulNBits-layout `packed` and flat `scales`. Shapes
    come from Python ints, so an exported graph holds a few constant-shape ops that onnxruntime
    folds into the float weight when it loads the graph."""
    rows, columns = shape
    blocks = -(-columns // block_size)
    values = _values(packed, bits).reshape(rows, blocks, block_size) if bits == 4 else packed
    weight = (values.to(dtype) - 2 ** (bits - 1)) * scales.reshape(rows, blocks, 1).to(dtype)
    weight = weight.reshape(rows, blocks * block_size)
    return weight if columns == blocks * block_size else weight[:, :columns]


class _MatMulNBits(torch.autograd.Function):
    """x @ W.T for a packed W; exported as onnxruntime's com.microsoft::MatMulNBits."""

    @staticmethod
    def forward(ctx, x, packed, scales, in_features: int, bits: int, block_size: int):
        shape = (packed.shape[0], in_features)
        return F.linear(x, dequantize_matrix(packed, scales, bits, shape, block_size, x.dtype))

    @staticmethod
    def symbolic(g, x, packed, scales, in_features, bits, block_size):
        n = packed.type().sizes()[0]
        y = g.op("com.microsoft::MatMulNBits", x, packed, scales, K_i=in_features, N_i=n, bits_i=bits, block_size_i=block_size)
        sizes = x.type().varyingSizes()
        if sizes is not None:  # tell the exporter's shape inference what comes out: (..., N), x's dtype
            y.setType(x.type().with_sizes(sizes[:-1] + [n]))
        return y


def block_size_for(in_features: int, block_size: int = BLOCK_SIZE) -> int:
    """`block_size`, or for narrower inputs (LoRA B: the rank) the smallest power of two >= 16
    (MatMulNBits' minimum) that covers them, so padding stays small."""
    return block_size if in_features >= block_size else max(16, 1 << (in_features - 1).bit_length())


class WeightOnlyLinear(nn.Module):
    """A linear layer whose weight is held quantised (`bits` per value, one scale per block of
    `block_size` inputs) and dequantised on the fly; activations and bias stay float.

    `keep_packed` exports it as MatMulNBits (the weight stays packed in memory); otherwise as plain
    ops that onnxruntime folds into a float weight when it loads the graph - for the rank-r LoRA
    slivers, where a MatMulNBits call costs more than the float weight's memory."""

    def __init__(self, packed, scales, in_features: int, bits: int, block_size: int, bias=None, keep_packed: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, packed.shape[0]
        self.bits, self.block_size, self.keep_packed = bits, block_size, keep_packed
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int, block_size: int = BLOCK_SIZE, bias=None,
                    keep_packed: bool = True) -> "WeightOnlyLinear":
        block = block_size_for(weight.shape[1], block_size)
        return cls(*quantize_weight(weight, bits, block), weight.shape[1], bits, block, bias, keep_packed)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The float (out, in) weight."""
        shape = (self.out_features, self.in_features)
        return dequantize_matrix(self.packed, self.scales, self.bits, shape, self.block_size, dtype)

    def forward(self, x):
        if self.keep_packed:
            y = _MatMulNBits.apply(x, self.packed, self.scales, self.in_features, self.bits, self.block_size)
        else:
            y = F.linear(x, self.dequantized(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, block_size={self.block_size}, "
                f"keep_packed={self.keep_packed}")


class WeightOnlyEmbedding(nn.Module):
    """An embedding table held quantised like `WeightOnlyLinear` (for a tied LM head: the same
    buffers); looked-up rows are dequantised. Keeps a scaled embedding's factor (Gemma)."""

    def __init__(self, linear: WeightOnlyLinear, embed_scale: float | None = None):
        super().__init__()
        self.embedding_dim, self.bits = linear.in_features, linear.bits
        self.register_buffer("packed", linear.packed)
        self.register_buffer("scales", linear.scales)
        self.embed_scale = embed_scale

    def forward(self, input_ids):
        blocks = self.packed.shape[1]  # gather the rows' scales from the flat (MatMulNBits) layout
        scales = self.scales[input_ids.unsqueeze(-1) * blocks + torch.arange(blocks, device=input_ids.device)]
        rows = dequantize_rows(self.packed[input_ids], scales, self.bits, self.embedding_dim, self.scales.dtype)
        return rows if self.embed_scale is None else rows * self.embed_scale


class QuantizedLoRALinear(LoRALinear):
    """`LoRALinear` with a quantised original and 8-bit A and B (B pre-multiplied by alpha / r,
    both dequantised at load by onnxruntime: see `WeightOnlyLinear.keep_packed`)."""

    def __init__(self, lora: LoRALinear, bits: int, delta_bits: int, block_size: int):
        _Wrapper.__init__(self, _quantize_linear(lora.original, bits, block_size), lora._router)
        self.lora_A = WeightOnlyLinear.from_weight(lora.lora_A, delta_bits, block_size, keep_packed=False)
        self.lora_B = WeightOnlyLinear.from_weight(lora.lora_B * lora.scaling, delta_bits, block_size, keep_packed=False)

    def low_rank(self, x):
        return self.lora_B(self.lora_A(x))


def _quantize_linear(linear: nn.Linear, bits: int, block_size: int) -> WeightOnlyLinear:
    return WeightOnlyLinear.from_weight(linear.weight, bits, block_size, linear.bias)


def _replace(root: nn.Module, make, kind: type) -> None:
    """Swap every submodule that is a `kind` for `make(module)`."""
    for name, module in list(root.named_modules()):
        if name and isinstance(module, kind):
            parent, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent), attr, make(module))


@torch.no_grad()
def quantize_llm(llm: nn.Module, bits: int = LLM_BITS, block_size: int = BLOCK_SIZE) -> nn.Module:
    """In place: every linear layer of a causal LM and its input embedding to `bits`-bit weight-only
    blocks. A tied LM head and embedding keep sharing one quantised table."""
    embed, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
    table = _quantize_linear(head, bits, block_size) if tied else WeightOnlyLinear.from_weight(embed.weight, bits, block_size)
    scale = getattr(embed, "scalar_embed_scale", None)
    if tied:
        llm.set_output_embeddings(table)
    llm.set_input_embeddings(WeightOnlyEmbedding(table, scale))
    _replace(llm, lambda m: _quantize_linear(m, bits, block_size), nn.Linear)
    return llm


@torch.no_grad()
def quantize_model(
    model: GenieBlueForConditionalGeneration,
    bits: int = LLM_BITS,
    delta_bits: int = DELTA_BITS,
    block_size: int = BLOCK_SIZE,
) -> GenieBlueForConditionalGeneration:
    """In place: base LLM and block copies at `bits` (W4A16), LoRA, ViT linears and projector at
    `delta_bits` (W8A16). The ViT's patch convolution, position embeddings and norms stay float."""
    if any(isinstance(m, WeightOnlyLinear) for m in model.modules()):
        raise ValueError("the model is already quantised")
    _replace(model.llm, lambda m: QuantizedLoRALinear(m, bits, delta_bits, block_size), LoRALinear)
    quantize_llm(model.llm, bits, block_size)
    _replace(model.vision, lambda m: _quantize_linear(m, delta_bits, block_size), nn.Linear)
    return model
