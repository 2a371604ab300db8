"""A saved model loaded for use: the model on its base, that base's tokenizer and the processor the
model was trained with. It sits above the model and data rooms (it needs both), below the rooms that
use a saved model (infer, eval, deploy, the demo)."""

from __future__ import annotations

from pathlib import Path

from .data.processor import GenieBlueProcessor, load_processor
from .model import GenieBlueForConditionalGeneration, load_tokenizer


def load_model_and_processor(
    model_dir: str | Path, llm: str | None = None, device=None, dtype=None
) -> tuple[GenieBlueForConditionalGeneration, GenieBlueProcessor]:
    """A saved GenieBlue model (its base from the manifest, or `llm`) in eval mode on `device` in
    `dtype` (defaults: see `model.placement`), with the tokenizer of that base and the processor the
    model was trained with. Raises what `from_pretrained` raises."""
    model = GenieBlueForConditionalGeneration.from_pretrained(model_dir, llm=llm, device=device, dtype=dtype)
    tokenizer = load_tokenizer(llm if llm is not None else model.base_spec)
    return model, load_processor(model_dir, model, tokenizer, max_length=model.llm.config.max_position_embeddings)
