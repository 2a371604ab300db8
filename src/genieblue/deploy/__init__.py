"""The deploy room: W4A16 / W8A16 weight-only quantisation (`quant`), ONNX export of a text graph, an
image graph and a vision graph that share one copy of the base weights on disk (`onnx_export`), with
the projections that read one input fused into one op each (`fuse`), Llama-shaped decoders built
directly from onnxruntime's fused operators (`decoder_graph`), a GGUF base's own blocks kept
(`gguf_weights`), the activation setting (`activations`), an onnxruntime runner for the
exported folder (`runtime`, numpy + onnxruntime only), the paper's Table-9 deployment benchmark
(`bench`, its worker processes; `bench_deploy`, the whole `genieblue bench deploy`), what W4A16 costs
in accuracy (`accuracy`) and their console tables (`report`).

Names are re-exported lazily, so the runtime and the benchmark's worker processes never load torch.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "quant": ("quantize_llm", "quantize_model", "WeightOnlyEmbedding", "WeightOnlyLinear"),
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
