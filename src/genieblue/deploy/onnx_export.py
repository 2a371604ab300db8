"""ONNX export for phones: a text graph, an image graph and a vision graph that read ONE copy of the
base weights on disk.

  * `text.onnx`   - one decoder step of the untouched base: (input_ids, attention_mask, past KV) ->
                    (last-position logits, present KV);
  * `image.onnx`  - the same step on the multimodal path: block copies replace their originals, LoRA
                    adds, and image features are spliced in at the placeholder positions with dense
                    ops (Equal, CumSum, Gather, Where) - no routing, no data-dependent control flow;
  * `vision.onnx` - the vision tower, encoder (ViT or convolutional backbone) -> downsampler -> token
                    mixer (if the tower has one) -> projector: pixel tiles -> image features (one
                    static tile with `single_tile`, the phone's single-patch mode).

With the processor it was trained with, the folder also holds the base's tokenizer (`tokenizer/`)
and the prompt settings (`processor.json`): all `genieblue serve --onnx` needs.

Initializers live in external data files: `base.onnx.data` holds every tensor of the text graph and
the image graph points at the same file and offsets for the base tensors it uses; `delta.onnx.data`
holds the copies, LoRA and the vision tower. A quantised model exports its weights as onnxruntime
`MatMulNBits` (W4A16 / W8A16, see `quant`; a GGUF base keeps its own Q4_0 / Q4_1 / Q8_0 blocks, see
`gguf_weights`), with the projections that read one input (q/k/v, gate/up) and their LoRA updates
fused into one op each (see `fuse`).

The decoder graphs of Llama-shaped bases are built directly with onnxruntime's fused LLM operators
(`decoder_graph`); those of other families, and the vision graph, are traced around the HF modules
with a plain-tensor KV cache (a `DynamicCache` rebuilt inside the step) by torch's TorchScript-based
exporter: deprecated since torch 2.9 but still there, it exports these graphs in seconds where the
torch.export-based one took over 25x longer, and it takes the MatMulNBits op as a plain `symbolic`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from onnx.external_data_helper import set_external_data
from torch import nn
from transformers import DynamicCache

from .._io import atomic_dir, write_json
from ..data.processor import GenieBlueProcessor, save_processor_settings
from ..loading import load_model_and_processor
from ..model import IMAGE_TOKEN_INDEX, GenieBlueForConditionalGeneration
from ..model.routing import delta_members
from ..model.sources import eos_token_ids, gguf_file
from . import activations as activations_setting
from . import decoder_graph
from .fuse import fused_projections
from .gguf_weights import gguf_layers
from .quant import BLOCK_SIZE, DELTA_BITS, LLM_BITS, SYMMETRIC, TABLE_BITS, WeightOnlyLinear, quantize_model
from .runtime import MANIFEST, SHARED_BUFFER, TOKENIZER, kv_names

OPSET = 18
PRECISIONS = ("w4a16", "fp32")
EXPORT_PLACEMENT = ("cpu", torch.float32)
"""Where an export (and `bench deploy`'s float reference) loads the model, a GPU visible or not: its
quantisation and tracing read float32 weights on the CPU."""
GRAPHS = {"text": "text.onnx", "image": "image.onnx", "vision": "vision.onnx"}
BASE_DATA, DELTA_DATA = "base.onnx.data", "delta.onnx.data"
INLINE_BYTES = 128
"""Tensors smaller than this stay inside their graph file (scalars, shape constants)."""
ALIGN = 64
"""Byte alignment of each tensor inside the external data files."""


def _attention_bias(attention_mask: torch.Tensor, query_length, window: int | None, dtype) -> torch.Tensor:
    """(B, 1, T, S) additive mask: key s is visible to query t (at position S - T + t) when it is not
    padding, not in the future and, for a sliding window, less than `window` positions back."""
    total = attention_mask.shape[1]
    query = torch.arange(query_length) + (total - query_length)
    key = torch.arange(total)
    visible = key[None, :] <= query[:, None]
    if window is not None:
        visible = visible & (query[:, None] - key[None, :] < window)
    visible = visible[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)


class DecoderStep(nn.Module):
    """One decoder call of a GenieBlue model with an explicit KV cache, on the text path or the image
    path. Inputs: input_ids (B, T), attention_mask (B, past + T), [image_features (N, D): the image
    path only, consumed in order by the IMAGE_TOKEN_INDEX positions], past keys, past values (each
    (B, kv_heads, past, head_dim) per layer). Outputs: logits of the last position (B, 1, V),
    present keys, present values."""

    def __init__(self, model: GenieBlueForConditionalGeneration, image: bool):
        super().__init__()
        self.model, self.image = model, image
        config = model.llm.config
        self.window = getattr(config, "sliding_window", None)
        self.layer_types = getattr(config, "layer_types", None)

    def _masks(self, attention_mask, query_length, dtype):
        """The 4D mask HF takes as prepared: one per layer type, or one for all layers."""
        if self.layer_types is None:
            return _attention_bias(attention_mask, query_length, self.window, dtype)
        return {
            kind: _attention_bias(
                attention_mask, query_length, self.window if kind == "sliding_attention" else None, dtype
            )
            for kind in set(self.layer_types)
        }

    def forward(self, input_ids, attention_mask, *rest):
        llm, router = self.model.llm, self.model.router
        features, past = (rest[0], rest[1:]) if self.image else (None, rest)
        layers = len(past) // 2
        cache = DynamicCache(list(zip(past[:layers], past[layers:])))
        query_length = input_ids.shape[1]
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, attention_mask.shape[1] - query_length :]
        common = dict(position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        if self.image:
            visual = input_ids == IMAGE_TOKEN_INDEX
            embeds = llm.get_input_embeddings()(input_ids.masked_fill(visual, 0))
            order = (visual.long().flatten().cumsum(0) - 1).clamp(min=0).view_as(input_ids)
            embeds = torch.where(visual.unsqueeze(-1), features[order].to(embeds.dtype), embeds)
            with router.route(image=True):
                out = llm(
                    inputs_embeds=embeds,
                    attention_mask=self._masks(attention_mask, query_length, embeds.dtype),
                    **common,
                )
        else:
            with router.route(image=False):
                mask = self._masks(attention_mask, query_length, llm.dtype)
                out = llm(input_ids=input_ids, attention_mask=mask, **common)
        return (out.logits, *[layer.keys for layer in cache.layers], *[layer.values for layer in cache.layers])


class VisionStep(nn.Module):
    """Pixel tiles (tiles, 3, S, S) -> image features (tiles * tokens_per_tile, D)."""

    def __init__(self, model: GenieBlueForConditionalGeneration):
        super().__init__()
        self.vision = model.vision

    def forward(self, pixel_values):
        return self.vision(pixel_values).flatten(0, 1)


def _to_proto(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], dynamic: dict) -> onnx.ModelProto:
    buffer = io.BytesIO()
    module.eval()  # the exporter restores the wrapper's mode afterwards, recursively: train() would reach BatchNorm
    with warnings.catch_warnings():  # the tracer notes every Python-level shape check it freezes
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            do_constant_folding=False,  # keep every weight under its module name
            custom_opsets={"com.microsoft": 1},
        )
    return onnx.load_from_string(buffer.getvalue())


def _decoder_graph(model, image: bool, layers: int, kv_shape: tuple[int, int], activations: str) -> onnx.ModelProto:
    if decoder_graph.supported(model):
        names = (kv_names(layers, "past"), kv_names(layers, "present"))
        # with int8 activations 8-bit weights run as one 8-bit MatMulNBits: ~2x faster than two 4-bit planes
        return decoder_graph.decoder_graph(model, image, names, OPSET, one_byte_planes=activations == "int8")
    # sample sizes, all dynamic axes of the graph; a query longer than 1 token makes HF trace its
    # general attention branch (its single-token branch would be frozen into the graph otherwise)
    batch, query, past = 1, 3, 2
    ids = torch.randint(0, model.llm.config.vocab_size, (batch, query))
    heads, head_dim = kv_shape
    kv = tuple(torch.zeros(batch, heads, past, head_dim) for _ in range(2 * layers))
    inputs = ["input_ids", "attention_mask"]
    args = [ids, torch.ones(batch, past + query, dtype=torch.long)]
    dynamic = {
        "input_ids": {0: "batch", 1: "query"},
        "attention_mask": {0: "batch", 1: "total"},
        "logits": {0: "batch"},
    }
    if image:
        ids[0, 0] = IMAGE_TOKEN_INDEX
        inputs.append("image_features")
        args.append(torch.zeros(2, model.llm.config.hidden_size))
        dynamic["image_features"] = {0: "image_tokens"}
    dynamic |= {n: {0: "batch", 2: "past"} for n in kv_names(layers, "past")}
    dynamic |= {n: {0: "batch", 2: "total"} for n in kv_names(layers, "present")}
    return _to_proto(
        DecoderStep(model, image),
        (*args, *kv),
        inputs + kv_names(layers, "past"),
        ["logits", *kv_names(layers, "present")],
        dynamic,
    )


def _vision_graph(model, single_tile: bool) -> onnx.ModelProto:
    size = model.vision.image_size
    dynamic = {} if single_tile else {"pixel_values": {0: "tiles"}, "image_features": {0: "image_tokens"}}
    return _to_proto(VisionStep(model), (torch.zeros(1, 3, size, size),), ["pixel_values"], ["image_features"], dynamic)


def _kv_shape(model) -> tuple[int, int]:
    """(kv heads, head dim) of the cache, read from one real forward."""
    with torch.no_grad(), model.router.route(image=False):
        cache = model.llm(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True).cache
    return tuple(cache.layers[0].keys.shape[1::2])


class _DataWriter:
    """Appends tensors to one external data file and points their TensorProtos at it."""

    def __init__(self, folder: Path, name: str):
        self.name, self.file, self.size = name, open(folder / name, "wb"), 0
        self.where: dict[tuple[str, str], tuple[int, int]] = {}  # (name, sha256) -> (offset, length)

    def place(self, tensor: onnx.TensorProto, data: bytes, key: tuple[str, str]) -> None:
        if key not in self.where:
            self.file.write(b"\0" * (-self.size % ALIGN))
            self.size += -self.size % ALIGN
            self.where[key] = (self.size, len(data))
            self.file.write(data)
            self.size += len(data)
        _point(tensor, self.name, *self.where[key])


def _point(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    set_external_data(tensor, location, offset, length)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


def _raw(tensor: onnx.TensorProto) -> bytes:
    """The tensor's bytes, after moving them into `raw_data` if the exporter used a typed field."""
    if not tensor.HasField("raw_data"):
        tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name))
    return tensor.raw_data


COPIED_ORIGINAL = re.compile(r"\.layers\.\d+\.original\.")
"""Names of the base tensors of a copied block (a `Switch`'s original), whose bytes the copies repeat."""


def _delta_parts(model: GenieBlueForConditionalGeneration) -> Callable[[str], str]:
    """Tensor name in a graph -> the part of the delta holding it, as the model's modules name them
    (`routing.delta_members`, under `DecoderStep.model`; the vision graph is all `vision`), else "other"."""
    prefixes = [(f"model.{name}", part) for name, part, _ in delta_members(model)] + [("vision", "vision")]

    def part(name: str) -> str:
        return next((p for prefix, p in prefixes if name.startswith(prefix + ".") or name == prefix), "other")

    return part


def write_shared(
    graphs: dict[str, onnx.ModelProto], folder: Path, delta_part: Callable[[str], str]
) -> tuple[dict[str, int], dict[str, int]]:
    """Save the graphs with their large initializers in two external data files: every tensor of the
    text graph in BASE_DATA (once); a tensor of another graph with the same name and the same bytes
    reads those bytes; every other tensor goes to DELTA_DATA. Returns the bytes of each file and the
    delta's bytes by part (`delta_part`: block copies, LoRA, ViT + projector) and the bytes of the base
    tensors the copies replace (`copied_originals`: the copies' storage at the base's own precision)."""
    base, delta = _DataWriter(folder, BASE_DATA), _DataWriter(folder, DELTA_DATA)
    parts = dict.fromkeys(("copies", "lora", "vision", "other", "copied_originals"), 0)
    for kind, proto in graphs.items():
        for tensor in proto.graph.initializer:
            data = _raw(tensor)
            if len(data) < INLINE_BYTES:
                continue
            key = (tensor.name, hashlib.sha256(data).hexdigest())
            if kind == "text" and key not in base.where and COPIED_ORIGINAL.search(tensor.name):
                parts["copied_originals"] += len(data)
            if kind != "text" and key not in base.where and key not in delta.where:
                parts[delta_part(tensor.name)] += len(data)
            (base if kind == "text" or key in base.where else delta).place(tensor, data, key)
        onnx.save(proto, folder / GRAPHS[kind])
    for writer in (base, delta):
        writer.file.close()
    return {name: os.path.getsize(folder / name) for name in (*GRAPHS.values(), BASE_DATA, DELTA_DATA)}, parts


def _precision(model) -> str:
    return f"w{LLM_BITS}a16" if any(isinstance(m, WeightOnlyLinear) for m in model.modules()) else "fp32"


def quantize(
    model: GenieBlueForConditionalGeneration, llm: str | None = None, keep_gguf: bool = True, copy_bits: int = LLM_BITS
) -> dict:
    """Quantise `model` in place for a W4A16 export (block copies at `copy_bits`): when its base
    (`llm`, else the one it names) is a GGUF file, with the file's own Q4_0 / Q4_1 / Q8_0 blocks for
    those tensors (unless not `keep_gguf`). Returns the manifest's `quantization` entry."""
    path = gguf_file(llm if llm is not None else model.base_spec) if keep_gguf else None
    kept, types = gguf_layers(path, model.llm) if path is not None else ({}, {})
    quantize_model(model, kept=kept, copy_bits=copy_bits)
    gguf = None if path is None else {"file": path.name, "tensor_types": types, "kept": len(kept)}
    return _quantization(copy_bits, gguf)


def _quantization(copy_bits: int | None, gguf: dict | None) -> dict:
    """The manifest's `quantization` entry (`copy_bits` None: the model was quantised outside `quantize`)."""
    return {
        "llm_bits": LLM_BITS,
        "table_bits": TABLE_BITS,
        "copy_bits": copy_bits,
        "delta_bits": DELTA_BITS,
        "block_size": BLOCK_SIZE,
        "symmetric": SYMMETRIC,
        "op": "com.microsoft.MatMulNBits",
        "gguf": gguf,
    }


def set_activations(proto: onnx.ModelProto, activations: str) -> int:
    """Set every `MatMulNBits` of `proto` to compute with `activations` (see `activations`); returns
    how many it set. `float` leaves the nodes as they are (no attribute: onnxruntime's default)."""
    level = activations_setting.ACTIVATIONS[activations]
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    if level is not None:
        for node in nodes:
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])
    return len(nodes)


@torch.no_grad()
def export_onnx(
    model: GenieBlueForConditionalGeneration,
    folder: str | Path,
    single_tile: bool = False,
    eos_token_ids: list[int] | None = None,
    quantization: dict | None = None,
    processor: GenieBlueProcessor | None = None,
    activations: str = activations_setting.DEFAULT,
) -> dict:
    """Write text.onnx, image.onnx, vision.onnx, base.onnx.data, delta.onnx.data and deploy.json
    into `folder` (atomically), and with a `processor` its tokenizer and settings.

    Args:
        model: a GenieBlue model of a genieblue-*, lora or full strategy; quantise it first
            (`quantize`, or `quant.quantize_model`) for W4A16, or leave it float to export float32.
        folder: the folder to write; replaced as a whole once everything is written.
        single_tile: fix the vision graph to one 1x3xSxS tile (default: any number of tiles).
        eos_token_ids: the ids that end a reply, recorded for the runtime and `serve --onnx`.
        quantization: the manifest's `quantization` entry (what `quantize` returns).
        processor: the model's processor; its tokenizer and prompt settings are written beside.
        activations: what the quantised matmuls compute with, "float" or "int8" (see `activations`).

    Returns:
        The manifest written as deploy.json.

    Raises:
        ValueError: a cogvlm strategy (its experts route per token), an unknown `activations`, or
            int8 activations for a float model.
    """
    if model.strategy.family == "cogvlm":
        raise ValueError(
            "cogvlm visual experts pick weights per token (MoE-style routing); export supports "
            "the genieblue-*, lora and full strategies"
        )
    check_export_folder(folder)
    model.eval()
    precision = _precision(model)
    activations_setting.check(activations, precision)
    layers = len(model.llm.model.layers)
    kv_shape = _kv_shape(model)
    with fused_projections(model):
        delta_part = _delta_parts(model)
        graphs = {
            "text": _decoder_graph(model, False, layers, kv_shape, activations),
            "image": _decoder_graph(model, True, layers, kv_shape, activations),
            "vision": _vision_graph(model, single_tile),
        }
    for proto in graphs.values():
        set_activations(proto, activations)
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        files, parts = write_shared(graphs, tmp, delta_part)
        manifest = {
            "format": "genieblue-onnx",
            "version": 1,
            "precision": precision,
            "activations": activations,
            "quantization": None if precision == "fp32" else quantization or _quantization(None, None),
            "graphs": GRAPHS,
            "data": {"base": BASE_DATA, "delta": DELTA_DATA},
            "bytes": files,
            "delta_parts": parts,
            "num_layers": layers,
            "kv_cache": SHARED_BUFFER if decoder_graph.supported(model) else "concat",
            "kv_heads": kv_shape[0],
            "head_dim": kv_shape[1],
            "hidden_size": model.llm.config.hidden_size,
            "vocab_size": model.llm.config.vocab_size,
            "context_length": model.llm.config.max_position_embeddings,
            "image_token_index": IMAGE_TOKEN_INDEX,
            "image_size": model.vision.image_size,
            "tokens_per_tile": model.vision.tokens_per_tile,
            "vision_type": model.vision.vit.config.model_type,
            "single_tile": single_tile,
            "eos_token_ids": eos_token_ids or [],
            "genieblue": model.manifest(),
        }
        write_json(tmp / MANIFEST, manifest)
        if processor is not None:
            processor.tokenizer.save_pretrained(tmp / TOKENIZER)
            save_processor_settings(tmp, processor.max_tiles, processor.system_prompt)
    return manifest


def check_export_folder(folder: str | Path, model_dir: str | Path | None = None) -> None:
    """Refuse, before any work, a folder an export must not replace (it is replaced whole): a file, a
    folder holding anything but an earlier export (no MANIFEST in it), or `model_dir` or a folder
    that holds it."""
    folder = Path(folder).absolute()
    above = next((parent for parent in folder.parents if parent.is_file()), None)
    if above is not None:
        raise ValueError(f"{above} is a file: write the export to a folder that can be made there")
    if model_dir is not None and Path(model_dir).absolute().is_relative_to(folder):
        raise ValueError(f"{folder} holds the model being exported: write the export to another folder")
    if folder.is_file():
        raise ValueError(f"{folder} is a file: write the export to a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST).is_file():
        raise ValueError(
            f"{folder} holds other files, not an earlier export (no {MANIFEST}): it would be replaced whole; "
            "write the export to a new folder, or empty that one"
        )


def export_saved_model(
    model_dir: str | Path,
    out: str | Path,
    *,
    precision: str = "w4a16",
    single_tile: bool = False,
    llm: str | None = None,
    keep_gguf: bool = True,
    copy_bits: int = LLM_BITS,
    activations: str = activations_setting.DEFAULT,
) -> dict:
    """Load a saved GenieBlue folder, quantise it and export it: what `genieblue export` does.

    Args:
        model_dir: a saved GenieBlue folder (`save_pretrained`).
        out: the folder to write (see `export_onnx`).
        precision: "w4a16" (weights quantised, see `quantize`) or "fp32" (float weights).
        single_tile: fix the vision graph to one tile.
        llm: the base LLM, if not the one the model's manifest names.
        keep_gguf: with w4a16 and a GGUF base, keep the file's own Q4_0 / Q4_1 / Q8_0 blocks.
        copy_bits: bits of the block copies' weights, 4 or 8.
        activations: "float" or "int8" (see the `activations` module).

    Returns:
        The export's manifest (deploy.json).

    Raises:
        FileNotFoundError: `model_dir` is not a saved model folder.
        ValueError: an unknown precision or activations setting, `copy_bits` other than 4 or 8, a
            cogvlm strategy, a GGUF tensor that does not match the loaded base, or an `out` that an
            export must not replace (see `check_export_folder`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    activations_setting.check(activations, precision)
    if copy_bits not in (4, 8):
        raise ValueError(f"block copies quantise to 4 or 8 bits, not {copy_bits}")
    check_export_folder(out, model_dir)
    model, processor = load_model_and_processor(model_dir, llm, *EXPORT_PLACEMENT)
    quantization = quantize(model, llm, keep_gguf, copy_bits) if precision == "w4a16" else None
    eos = eos_token_ids(model.llm, processor.tokenizer)
    return export_onnx(model, out, single_tile, eos, quantization, processor, activations)
