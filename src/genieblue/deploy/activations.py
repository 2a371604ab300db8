"""The export setting `activations`: what the 4-bit / 8-bit matmuls of the exported graphs (every
`MatMulNBits`) compute with, the default, and how a manifest records it. A light module (no torch, no
onnxruntime) so the CLI's help and the runtime can name the default without loading either."""

from __future__ import annotations

ACTIVATIONS = {"float": None, "int8": 4}
"""Setting -> the op's `accuracy_level`. `float`: float32 activations, exact (text mode is the
quantised base within float32 summation order). `int8`: onnxruntime quantises each input row to int8
per block inside the op (accuracy_level 4, as llama.cpp quantises activations to Q8 for its Q4 / Q8 dot
products): faster matmuls, no longer the quantised base exactly. Recorded in `deploy.json`."""
DEFAULT = "float"


def check(activations: str, precision: str = "w4a16") -> None:
    """Refuse an unknown setting, or int8 activations for a float (`fp32`) export."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"unknown activations {activations!r}; choose one of: {', '.join(ACTIVATIONS)}")
    if precision == "fp32" and activations != DEFAULT:
        raise ValueError(f"{activations} activations are for the quantised matmuls: export w4a16, not fp32")


def of(manifest: dict) -> str:
    """The setting a folder was exported with (folders from before the setting existed: the default)."""
    return manifest.get("activations") or DEFAULT
