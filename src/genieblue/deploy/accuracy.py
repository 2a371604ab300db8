"""What deployment costs in accuracy: logits of the W4A16 model against the float model on the same
chat prompts, on the text path and on the image path, and of the exported ONNX graphs against the
PyTorch model they came from."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data import GenieBlueProcessor
from ..model import GenieBlueForConditionalGeneration
from .runtime import DeployedModel

QUESTIONS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "How many legs does a spider have?",
    "Describe what you see.",
]


def probe_image(size: int = 64) -> Image.Image:
    """A fixed test picture: a red disc and a blue square on white."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 4, size // 2, size // 2), fill="red")
    draw.rectangle((size // 2, size // 2, size - 4, size - 4), fill="blue")
    return image


def probe_prompts(processor: GenieBlueProcessor) -> dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Chat prompts (input_ids, pixel_values) for each mode: QUESTIONS alone, and with probe_image."""
    image = probe_image()
    return {
        "text": [processor.prompt([{"role": "user", "content": q}]) for q in QUESTIONS],
        "image": [processor.prompt([{"role": "user", "content": q}], [image]) for q in QUESTIONS],
    }


def _stats(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    diff = torch.cat([(a - b).abs().flatten() for a, b in pairs])
    agree = torch.cat([(a.argmax(-1) == b.argmax(-1)).flatten() for a, b in pairs])
    scale = max(b.abs().max().item() for _, b in pairs)
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "max_abs_reference": scale,
            "top1_agreement": agree.float().mean().item(), "positions": agree.numel()}


@torch.no_grad()
def logit_error(model: GenieBlueForConditionalGeneration, reference: GenieBlueForConditionalGeneration,
                prompts: dict[str, list]) -> dict:
    """Per mode: how far `model`'s logits are from `reference`'s at every prompt position (max and
    mean absolute difference, and how often the greedy next token is the same)."""
    return {mode: _stats([(model(ids, pixel_values=px).logits[0], reference(ids, pixel_values=px).logits[0])
                          for ids, px in items]) for mode, items in prompts.items()}


@torch.no_grad()
def onnx_error(folder, model: GenieBlueForConditionalGeneration, prompts: dict[str, list]) -> dict:
    """Per mode: last-position logits of the exported graphs (prefill under onnxruntime) against the
    PyTorch model that was exported."""
    deployed = DeployedModel(folder)
    out = {}
    for mode, items in prompts.items():
        pairs = []
        for ids, px in items:
            features = None if px is None else deployed.image_features(px.numpy())
            logits, _ = deployed.step(ids.numpy(), deployed.empty_cache(), features)
            pairs.append((torch.from_numpy(np.asarray(logits[0])), model(ids, pixel_values=px).logits[0, -1]))
        out[mode] = _stats(pairs)
    return out
