"""Inference: chat sessions, the batching engine, the static-cache decoder (`decode`), request limits
(`guards`) and the OpenAI-compatible server over a saved GenieBlue model (text-only requests run the
untouched base), or over an exported folder under onnxruntime (`onnx_engine`)."""
