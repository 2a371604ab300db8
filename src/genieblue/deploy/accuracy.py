"""What deployment costs in accuracy: logits of the W4A16 model against the float model on the same
chat prompts, on the text path and on the image path, of the exported ONNX graphs against the
PyTorch model they came from, and the exported text graph decoding step by step against the float
model (perplexity, same next token)."""

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
    return {
        "max_abs": diff.max().item(),
        "mean_abs": diff.mean().item(),
        "max_abs_reference": scale,
        "top1_agreement": agree.float().mean().item(),
        "positions": agree.numel(),
    }


@torch.no_grad()
def logit_error(
    model: GenieBlueForConditionalGeneration, reference: GenieBlueForConditionalGeneration, prompts: dict[str, list]
) -> dict:
    """Per mode: how far `model`'s logits are from `reference`'s at every prompt position (max and
    mean absolute difference, and how often the greedy next token is the same)."""
    return {
        mode: _stats(
            [(model(ids, pixel_values=px).logits[0], reference(ids, pixel_values=px).logits[0]) for ids, px in items]
        )
        for mode, items in prompts.items()
    }


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


@torch.no_grad()
def stepwise_text(folder, reference: GenieBlueForConditionalGeneration, tokenizer, texts: list[str]) -> dict:
    """The exported text graph run token by token (`DeployedModel.step` with its KV cache, as a
    phone decodes) over each of `texts`, against the PyTorch `reference` (its text path) on the
    whole text: perplexity of both and how often their greedy next token is the same."""
    deployed = DeployedModel(folder)
    nll = {"deployed": 0.0, "reference": 0.0}
    same = count = 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        expected = reference(ids).logits[0, :-1].double()
        cache, steps = deployed.empty_cache(), []
        for token in ids[0, :-1].tolist():
            logits, cache = deployed.step(np.array([[token]]), cache)
            steps.append(torch.from_numpy(np.asarray(logits[0])).double())
        got, targets = torch.stack(steps), ids[0, 1:, None]
        for name, logits in (("deployed", got), ("reference", expected)):
            nll[name] -= torch.log_softmax(logits, -1).gather(-1, targets).sum().item()
        same += (got.argmax(-1) == expected.argmax(-1)).sum().item()
        count += len(steps)
    return {f"perplexity_{name}": float(np.exp(total / count)) for name, total in nll.items()} | {
        "same_next_token": same / count,
        "positions": count,
    }
