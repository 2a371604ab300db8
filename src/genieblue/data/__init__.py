"""The data room: records in (LLaVA, ShareGPT / LLaMA-Factory or OpenAI-style JSON / JSONL, read
lazily, validated, mixed by ratio), images in (safe loading, dynamic-resolution tiling,
normalisation), model inputs out (chat-template encoding with assistant-only labels, lengths for
packing before any pixel is decoded, exact or estimated in bulk, samples encoded per step, packed or
padded batches), and the synthetic data sets.

Names are re-exported lazily, so `genieblue.data.synthetic` and the CLI do not load torch.
"""

from .._lazy import lazy_exports

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
    "lengths": ("LengthMeasure",),
    "packing": ("collate", "collate_prompts", "first_fit", "pack"),
    "processor": (
        "IGNORE_INDEX",
        "GenieBlueProcessor",
        "Sample",
        "load_processor",
        "save_processor_settings",
    ),
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
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
