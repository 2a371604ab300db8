"""A GGUF base's own quantisation, kept for deployment: every Q4_0, Q4_1 and Q8_0 tensor of the file
becomes a `WeightOnlyLinear` with the same 32-weight blocks and the same values, so the deployed
text mode is the user's own model, not the base re-quantised by us.

  * Q4_0 block  w = d * (q - 8)  -> 4-bit q, scale d, implicit zero point 8;
  * Q8_0 block  w = d * q (int8) -> 8-bit q + 128, scale d, implicit zero point 128, held and
                                    exported as two exact 4-bit planes (`quant.PlanarLinear`);
  * Q4_1 block  w = d * q + m    -> 4-bit q, scale d, implicit zero point 8, offset m + 8d.

d and m are float16 in the file and exact in float32, and so is every dequantised value: (q - 8) * d
and q * d are exact products, so each weight is the float32 rounding of the same real number gguf's
own dequantisation rounds (m + 8d is checked to be exact). The nibbles are reordered from ggml's
(byte j holds elements j and j + 16) to MatMulNBits' (byte j holds 2j and 2j + 1).

Names and row order come from transformers' GGUF loader (`get_gguf_hf_weights_map` and the
architecture's tensor processor, e.g. llama's q/k un-permutation, applied to row indices), and every
kept layer is checked against the loaded base: its dequantised weight must equal the base's weight
exactly, or the export stops. Tensors of other types (F16, K-quants, ...) are left to our quantiser.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
    read_field,
)

from ..model.routing import base_name
from .quant import PlanarLinear, WeightOnlyLinear

KEPT = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)
"""GGUF tensor types kept as they are."""


def _half(blocks: np.ndarray, start: int) -> torch.Tensor:
    """The float16 at bytes start:start+2 of every block -> float32 (rows, blocks)."""
    return torch.from_numpy(
        np.ascontiguousarray(blocks[..., start : start + 2]).view(np.float16)[..., 0].astype(np.float32)
    )


def _nibbles(blocks: np.ndarray, start: int) -> np.ndarray:
    """ggml 4-bit quants (16 bytes from `start`: elements j, j + 16 in byte j) -> (rows, blocks, 32)."""
    qs = blocks[..., start : start + 16]
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _layer(kind: GGMLQuantizationType, data: np.ndarray, rows: np.ndarray, bias) -> WeightOnlyLinear | PlanarLinear:
    """The (out, bytes) blocks of one tensor, its rows taken in `rows` order, as a layer."""
    block_size, block_bytes = GGML_QUANT_SIZES[kind]
    blocks = data[rows].reshape(len(rows), -1, block_bytes)
    scales, offsets = _half(blocks, 0), None
    if kind == GGMLQuantizationType.Q8_0:
        packed = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return PlanarLinear(
            torch.from_numpy(packed), scales.reshape(-1), blocks.shape[1] * block_size, block_size, bias
        )
    values = _nibbles(blocks, 2 if kind == GGMLQuantizationType.Q4_0 else 4)
    packed = values[..., 0::2] | (values[..., 1::2] << 4)
    if kind == GGMLQuantizationType.Q4_1:
        minimum = _half(blocks, 2)
        offsets = minimum + 8 * scales
        if not torch.equal(offsets.double(), minimum.double() + 8 * scales.double()):
            raise ValueError("a Q4_1 block's m + 8d is not exact in float32")
    return WeightOnlyLinear(
        torch.from_numpy(np.ascontiguousarray(packed)),
        scales.reshape(-1),
        blocks.shape[1] * block_size,
        4,
        block_size,
        bias,
        offsets=offsets,
    )


@torch.no_grad()
def gguf_layers(path: str | Path, llm: nn.Module) -> tuple[dict[str, nn.Module], dict[str, int]]:
    """The GGUF file's Q4_0 / Q4_1 / Q8_0 weights as layers by base module name (see
    `routing.base_name`) for `llm`, the base loaded from that file (plain or inside a GenieBlue model),
    and the count of the file's tensor types (kept or not). ValueError if a layer's values are not
    exactly the loaded base's weight."""
    reader = GGUFReader(path)
    processor = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)(
        llm.config.to_dict()
    )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(llm.config)
    hf_names = get_gguf_hf_weights_map(skeleton, processor)
    modules = {base_name(n): m for n, m in llm.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    kept, types = {}, {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
        name = hf_names.get(tensor.name, "").removesuffix(".weight")
        module = modules.get(name)
        if tensor.tensor_type not in KEPT or module is None:
            continue
        rows = np.arange(tensor.data.shape[0])  # transformers' reordering of the rows, e.g. llama's q/k
        rows = np.asarray(processor.process(weights=rows[:, None], name=tensor.name).weights)[:, 0]
        layer = _layer(tensor.tensor_type, tensor.data, rows, getattr(module, "bias", None))
        if not torch.equal(layer.dequantized(module.weight.dtype), module.weight):
            raise ValueError(
                f"{path}: tensor {tensor.name} is not the base's {name}.weight; "
                f"export with the base the model was trained on, or with --requantize"
            )
        kept[name] = layer
    return kept, types
