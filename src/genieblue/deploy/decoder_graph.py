"""The decoder step built directly as an ONNX graph from the model's modules, with onnxruntime's fused
LLM operators, for the Llama-shaped families (llama, qwen2, mistral without a sliding window): per
block one `SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization` per norm (the residual
add fused in), the fused q/k/v `MatMulNBits`, one `GroupQueryAttention` (packed q/k/v, rotary inside,
from cos / sin tables that HF's own rotary module computes), o, gate/up, SiLU and down: ~17 ops a
block where the traced graph (`onnx_export._decoder_graph`) runs ~150, most of them shape ops.

Same inputs and outputs as the traced step (ids, mask, [image features], past KV -> last logits,
present KV), the same initializer names (module paths under `model.`), so `write_shared` stores the
base once for both graphs. Text mode reads each block's original, image mode its copy and LoRA. The
attention mask gives each row's length only: `GroupQueryAttention` takes rows whose tokens are all
real (no left padding), which is what `DeployedModel` feeds.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from ..model import IMAGE_TOKEN_INDEX
from ..model.routing import LoRALinear, Switch
from .fuse import FusedProjections
from .quant import PlanarLinear, WeightOnlyLinear, merge_planes

FAMILIES = ("llama", "qwen2", "mistral")
MS = "com.microsoft"


def supported(model) -> bool:
    """Whether `model`'s LLM is one this builder writes (else the step is traced)."""
    config = model.llm.config
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (
        config.model_type in FAMILIES
        and head_dim % 16 == 0  # GroupQueryAttention's kernels
        and config.hidden_act == "silu"
        and window is None
        and set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}
    )


def _active(module: nn.Module, image: bool) -> nn.Module:
    return (module.copy if image else module.original) if isinstance(module, Switch) else module


class _Graph:
    """Nodes and initializers of one graph; tensors of the model are named by their path under `model.`.
    `one_byte_planes`: 8-bit weights held as two 4-bit planes (`PlanarLinear`) run as one 8-bit
    MatMulNBits (for int8 activations, where that op is fast), their tables gathered from it too."""

    def __init__(self, model, one_byte_planes: bool = False):
        self.nodes, self.initializers, self.done = [], {}, set()
        self.names = {id(t): f"model.{n}" for n, t in [*model.named_parameters(), *model.named_buffers()]}
        self.count = 0
        self.one_byte_planes, self.merged = one_byte_planes, {}

    def planes(self, planes: list[WeightOnlyLinear]) -> list[WeightOnlyLinear]:
        """Layers whose outputs add up to those of `planes`: the planes, or for a `PlanarLinear`'s two
        with `one_byte_planes` their one 8-bit layer (named `<layer>.packed`, made once per layer)."""
        if not self.one_byte_planes or len(planes) != 2:
            return planes
        high, low = planes
        if id(high) not in self.merged:
            merged = merge_planes(high, low)
            self.names[id(merged.packed)] = self.names[id(high.packed)].removesuffix(".high.packed") + ".packed"
            if merged.bias is not None:
                self.names[id(merged.bias)] = self.names[id(high.bias)]
            self.merged[id(high)] = merged
        return [self.merged[id(high)]]

    def tensor(self, value: torch.Tensor) -> str:
        name = self.names[id(value)]
        if name not in self.done:
            self.done.add(name)
            self.initializers[name] = onnx.numpy_helper.from_array(value.detach().contiguous().numpy(), name)
        return name

    def const(self, value, dtype=np.int64) -> str:
        self.count += 1
        name = f"const.{self.count}"
        self.initializers[name] = onnx.numpy_helper.from_array(np.asarray(value, dtype), name)
        return name

    def op(self, kind: str, *inputs: str, outputs: int = 1, domain: str = "", **attributes) -> str | list[str]:
        self.count += 1
        names = [f"{kind}.{self.count}.{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(kind, list(inputs), names, domain=domain, **attributes))
        return names[0] if outputs == 1 else names


def _unpack(g: _Graph, packed: str, bits: int, rank: int) -> str:
    """Packed uint8 (..., bytes) of `rank` dimensions -> unsigned values (..., values), in order (low
    nibble first)."""
    if bits == 8:
        return packed
    low = g.op("BitwiseAnd", packed, g.const(15, np.uint8))
    high = g.op("BitShift", packed, g.const(4, np.uint8), direction="RIGHT")
    pairs = g.op("Concat", g.op("Unsqueeze", low, g.const([-1])), g.op("Unsqueeze", high, g.const([-1])), axis=-1)
    return g.op("Reshape", pairs, g.const([0] * (rank - 1) + [-1]))


def _dequantized(g: _Graph, layer: WeightOnlyLinear) -> str:
    """The float (in, out) weight of a layer kept as plain ops (LoRA A / B): folded when onnxruntime loads the graph."""
    rows, blocks = layer.out_features, layer.packed.shape[1]
    values = g.op(
        "Reshape", _unpack(g, g.tensor(layer.packed), layer.bits, 3), g.const([rows, blocks, layer.block_size])
    )
    if layer.zero_points is None:
        zero = g.const(2 ** (layer.bits - 1), np.float32)
    else:
        zero = g.op(
            "Unsqueeze",
            g.op(
                "Cast",
                g.op("Reshape", _unpack(g, g.tensor(layer.zero_points), layer.bits, 2), g.const([rows, -1])),
                to=TensorProto.FLOAT,
            ),
            g.const([-1]),
        )
        zero = g.op("Slice", zero, g.const([0]), g.const([blocks]), g.const([1]))
    weight = g.op(
        "Mul",
        g.op("Sub", g.op("Cast", values, to=TensorProto.FLOAT), zero),
        g.op("Reshape", g.tensor(layer.scales), g.const([rows, blocks, 1])),
    )
    if layer.offsets is not None:
        weight = g.op("Add", weight, g.op("Unsqueeze", g.tensor(layer.offsets), g.const([-1])))
    weight = g.op("Reshape", weight, g.const([rows, blocks * layer.block_size]))
    if layer.in_features != blocks * layer.block_size:
        weight = g.op("Slice", weight, g.const([0]), g.const([layer.in_features]), g.const([1]))
    return g.op("Transpose", weight, perm=[1, 0])


def _nbits(g: _Graph, x: str, layer: WeightOnlyLinear) -> str:
    """x @ W.T of a packed layer: MatMulNBits, plus a GGUF Q4_1's offsets as x's block sums times them."""
    if not layer.keep_packed:
        y = g.op("MatMul", x, _dequantized(g, layer))
    else:
        inputs = [x, g.tensor(layer.packed), g.tensor(layer.scales)]
        if layer.zero_points is not None:
            inputs.append(g.tensor(layer.zero_points))
        y = g.op(
            "MatMulNBits",
            *inputs,
            domain=MS,
            K=layer.in_features,
            N=layer.out_features,
            bits=layer.bits,
            block_size=layer.block_size,
        )
    if layer.offsets is not None:
        blocks = layer.offsets.shape[1]
        sums = g.op(
            "ReduceSum", g.op("Reshape", x, g.const([0, 0, blocks, layer.block_size])), g.const([-1]), keepdims=0
        )
        offsets = g.op("Transpose", g.tensor(layer.offsets), perm=[1, 0])
        y = g.op("Add", y, g.op("MatMul", sums, offsets))
    return y if layer.bias is None else g.op("Add", y, g.tensor(layer.bias))


def _skip_norm(g, x, residual, norm):
    """RMS norm of x + residual (one SkipSimplifiedLayerNormalization): (normed, new residual)."""
    normed, _, _, total = g.op(
        "SkipSimplifiedLayerNormalization",
        x,
        residual,
        g.tensor(norm.weight),
        outputs=4,
        domain=MS,
        epsilon=norm.variance_epsilon,
    )
    return normed, total


def _linear(g: _Graph, x: str, module: nn.Module, image: bool) -> str:
    """The module's output for input `x` in the given mode (LoRA only in image mode)."""
    if isinstance(module, LoRALinear):
        y = _linear(g, x, module.original, image)
        if not image:
            return y
        if isinstance(module.lora_A, nn.Module):  # quantised LoRA, alpha / r inside B
            return g.op("Add", y, _linear(g, _linear(g, x, module.lora_A, image), module.lora_B, image))
        low = g.op(
            "MatMul",
            g.op("MatMul", x, g.op("Transpose", g.tensor(module.lora_A), perm=[1, 0])),
            g.op("Transpose", g.tensor(module.lora_B), perm=[1, 0]),
        )
        return g.op("Add", y, g.op("Mul", low, g.const(module.scaling, np.float32)))
    if isinstance(module, FusedProjections):
        y = _nbits(g, x, module)
        if image and module.lora_A is not None:
            y = g.op("Add", y, _nbits(g, _nbits(g, x, module.lora_A), module.lora_B))
        return y
    if isinstance(module, PlanarLinear):
        planes = g.planes(module.planes())
        return _nbits(g, x, planes[0]) if len(planes) == 1 else g.op("Add", *[_nbits(g, x, p) for p in planes])
    if isinstance(module, WeightOnlyLinear):
        return _nbits(g, x, module)
    if isinstance(module, nn.Linear):
        y = g.op("MatMul", x, g.op("Transpose", g.tensor(module.weight), perm=[1, 0]))
        return y if module.bias is None else g.op("Add", y, g.tensor(module.bias))
    raise TypeError(f"no ONNX builder for {type(module).__name__}")


def _siblings(g: _Graph, x: str, parent: nn.Module, names: tuple[str, ...], image: bool) -> str:
    """The members' outputs concatenated by output: their fused op when there is one."""
    fused = parent._modules.get("+".join(names))
    if fused is not None:
        return _linear(g, x, fused, image)
    return g.op("Concat", *[_linear(g, x, parent._modules[n], image) for n in names], axis=-1)


def _embed(g: _Graph, ids: str, table: nn.Module) -> str:
    """Rows of the (quantised) embedding table for `ids` (B, T) -> (B, T, D)."""
    if isinstance(table, nn.Embedding):
        return g.op("Gather", g.tensor(table.weight), ids)
    rows = None
    for plane in g.planes(list(table.planes)):
        blocks = plane.packed.shape[1]
        values = _unpack(g, g.op("Gather", g.tensor(plane.packed), ids), plane.bits, 4)
        values = g.op("Cast", g.op("Reshape", values, g.const([0, 0, blocks, plane.block_size])), to=TensorProto.FLOAT)
        if plane.zero_points is None:
            values = g.op("Sub", values, g.const(2 ** (plane.bits - 1), np.float32))
        else:
            zero = _unpack(g, g.op("Gather", g.tensor(plane.zero_points), ids), plane.bits, 3)
            zero = g.op(
                "Slice", g.op("Cast", zero, to=TensorProto.FLOAT), g.const([0]), g.const([blocks]), g.const([-1])
            )
            values = g.op("Sub", values, g.op("Unsqueeze", zero, g.const([-1])))
        scales = g.op("Reshape", g.tensor(plane.scales), g.const([-1, blocks]))
        values = g.op("Mul", values, g.op("Unsqueeze", g.op("Gather", scales, ids), g.const([-1])))
        if plane.offsets is not None:
            values = g.op("Add", values, g.op("Unsqueeze", g.op("Gather", g.tensor(plane.offsets), ids), g.const([-1])))
        values = g.op("Reshape", values, g.const([0, 0, blocks * plane.block_size]))
        if table.embedding_dim != blocks * plane.block_size:
            values = g.op("Slice", values, g.const([0]), g.const([table.embedding_dim]), g.const([-1]))
        rows = values if rows is None else g.op("Add", rows, values)
    return rows if table.embed_scale is None else g.op("Mul", rows, g.const(table.embed_scale, np.float32))


def _rotary_tables(g: _Graph, llm) -> tuple[str, str]:
    """cos and sin (positions, head_dim / 2) as HF's rotary module computes them: its inverse
    frequencies times each position, scaled by its attention scaling; constant ops, so onnxruntime
    computes the tables when it loads the graph and the files store only the frequencies."""
    rotary = llm.model.rotary_emb
    positions = g.op(
        "Range",
        g.const(0.0, np.float32),
        g.const(float(llm.config.max_position_embeddings), np.float32),
        g.const(1.0, np.float32),
    )
    freqs = g.op("Mul", g.op("Unsqueeze", positions, g.const([-1])), g.tensor(rotary.inv_freq))
    scaling = g.const(float(rotary.attention_scaling), np.float32)
    return g.op("Mul", g.op("Cos", freqs), scaling), g.op("Mul", g.op("Sin", freqs), scaling)


def decoder_graph(
    model, image: bool, names: tuple[list[str], list[str]], opset: int, one_byte_planes: bool = False
) -> onnx.ModelProto:
    """The decoder step of `model` (text or image mode) as an ONNX graph; `names`: (past, present) KV
    names; `one_byte_planes`: see `_Graph`."""
    llm, config = model.llm, model.llm.config
    g = _Graph(model, one_byte_planes)
    layers = llm.model.layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    past, present = names
    cos, sin = _rotary_tables(g, llm)

    lengths = g.op("ReduceSum", g.op("Cast", "attention_mask", to=TensorProto.INT32), g.const([1]), keepdims=0)
    seqlens = g.op("Sub", lengths, g.const(1, np.int32))
    total = g.op(
        "Cast",
        g.op("Squeeze", g.op("Slice", g.op("Shape", "attention_mask"), g.const([1]), g.const([2])), g.const([0])),
        to=TensorProto.INT32,
    )

    table = llm.get_input_embeddings()
    if image:
        visual = g.op("Equal", "input_ids", g.const(IMAGE_TOKEN_INDEX))
        ids = g.op("Where", visual, g.const(0), "input_ids")
        order = g.op(
            "Sub",
            g.op("CumSum", g.op("Reshape", g.op("Cast", visual, to=TensorProto.INT64), g.const([-1])), g.const(0)),
            g.const(1),
        )
        order = g.op("Reshape", g.op("Max", order, g.const(0)), g.op("Shape", "input_ids"))
        hidden = g.op(
            "Where",
            g.op("Unsqueeze", visual, g.const([-1])),
            g.op("Gather", "image_features", order),
            _embed(g, ids, table),
        )
    else:
        hidden = _embed(g, "input_ids", table)

    normed = None
    for i, wrapped in enumerate(layers):
        layer = _active(wrapped, image)
        norm = layer.input_layernorm
        if normed is None:
            normed = g.op(
                "SimplifiedLayerNormalization", hidden, g.tensor(norm.weight), epsilon=norm.variance_epsilon, axis=-1
            )
        attention = layer.self_attn
        qkv = _siblings(g, normed, attention, ("q_proj", "k_proj", "v_proj"), image)
        out, key, value = g.op(
            "GroupQueryAttention",
            qkv,
            "",
            "",
            past[i],
            past[len(layers) + i],
            seqlens,
            total,
            cos,
            sin,
            outputs=3,
            domain=MS,
            num_heads=heads,
            kv_num_heads=kv_heads,
            do_rotary=1,
            scale=float(attention.scaling),
        )
        g.nodes[-1].output[1:] = [present[i], present[len(layers) + i]]
        attended = _linear(g, out, attention.o_proj, image)
        normed, hidden = _skip_norm(g, attended, hidden, layer.post_attention_layernorm)
        mlp = layer.mlp
        gate, up = g.op(
            "Split", _siblings(g, normed, mlp, ("gate_proj", "up_proj"), image), outputs=2, axis=-1, num_outputs=2
        )
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        down = _linear(g, act, mlp.down_proj, image)
        norm = _active(layers[i + 1], image).input_layernorm if i + 1 < len(layers) else _active(llm.model.norm, image)
        normed, hidden = _skip_norm(g, down, hidden, norm)
    last = g.op("Slice", normed, g.const([-1]), g.const([2**62]), g.const([1]))
    _linear(g, last, llm.get_output_embeddings(), image)  # its last node writes "logits"
    g.nodes[-1].output[0] = "logits"

    kv = [kv_heads, head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "query"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
    ]
    if image:
        inputs.append(
            helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["image_tokens", config.hidden_size])
        )
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", kv[0], "past", kv[1]]) for n in past]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, config.vocab_size])]
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", kv[0], "total", kv[1]]) for n in present]
    graph = helper.make_graph(g.nodes, "genieblue_decoder_step", inputs, outputs, list(g.initializers.values()))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
