"""Model construction: the GenieBlue MLLM, its strategies, routing wrappers and base-model sources."""

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
