"""The deploy room: W4A16 / W8A16 weight-only quantisation (`quant`), ONNX export of a text graph, an
image graph and a vision graph that share one copy of the base weights on disk (`onnx_export`), with
the projections that read one input fused into one op each (`fuse`), an onnxruntime runner for the
exported folder (`runtime`, numpy + onnxruntime only) and the paper's Table-9 deployment benchmark
(`bench`).

Names are re-exported lazily, so the runtime and the benchmark's worker processes never load torch.
"""

import importlib

_EXPORTS = {
    "quant": ("quantize_llm", "quantize_model", "WeightOnlyEmbedding", "WeightOnlyLinear"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
