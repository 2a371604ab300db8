"""Model construction: the GenieBlue MLLM (`modeling`), its strategies, routing wrappers, vision tower,
base-model sources and the base's fingerprint (`fingerprint`, `cache`), placement (`--device` /
`--dtype`), parameter report, and a saved folder's files and model card (`folder`, `card`)."""

from .modeling import DEFAULT_VISION, IMAGE_TOKEN_INDEX, GenieBlueForConditionalGeneration
from .sources import DEFAULT_LLM, SUPPORTED_LLM_TYPES, fingerprint, load_llm, load_tokenizer
from .strategy import STRATEGIES, Strategy

__all__ = [
    "DEFAULT_LLM",
    "DEFAULT_VISION",
    "IMAGE_TOKEN_INDEX",
    "STRATEGIES",
    "SUPPORTED_LLM_TYPES",
    "GenieBlueForConditionalGeneration",
    "Strategy",
    "fingerprint",
    "load_llm",
    "load_tokenizer",
]
