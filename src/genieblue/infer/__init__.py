"""Inference: chat sessions over a saved GenieBlue model (text turns run the untouched base)."""
