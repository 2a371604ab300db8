"""Inference: chat sessions, the batching engine and the OpenAI-compatible server over a saved
GenieBlue model (text-only requests run the untouched base)."""
