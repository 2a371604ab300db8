"""The data room: records in (LLaVA, ShareGPT / LLaMA-Factory or OpenAI-style JSON / JSONL, read
lazily, validated, mixed by ratio), images in (safe loading, dynamic-resolution tiling,
normalisation), model inputs out (chat-template encoding with assistant-only labels, lengths for
packing before any pixel is decoded, exact or estimated in bulk, samples encoded per step, packed or
padded batches), and the synthetic data sets.

Names are re-exported lazily, so `genieblue.data.synthetic` and the CLI do not load torch.
"""

import importlib

_EXPORTS = {
    "images": (
        "BACKBONE_STATS",
        "IMAGE_STATS",
        "MAX_PIXELS",
        "ImageError",
        "best_grid",
        "image_tiles",
        "image_to_tensor",
        "load_image",
        "normalize",
        "tile_image",
    ),
    "dataset": ("MixtureSamples",),
    "lengths": ("measure_lengths",),
    "packing": ("collate", "collate_prompts", "first_fit", "pack"),
    "processor": ("IGNORE_INDEX", "GenieBlueProcessor", "Sample", "load_model_and_processor", "load_processor", "save_processor_settings"),
    "records": (
        "IMAGE_PLACEHOLDER",
        "ROLES",
        "BadRecord",
        "DataMixture",
        "RecordFile",
        "Source",
        "check_record",
        "read_records",
        "scan_records",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
