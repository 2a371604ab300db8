"""What deployment costs in accuracy: logits of the W4A16 model against the float model on the same
chat prompts, on the text path and on the image path, of the exported ONNX graphs against the
PyTorch model they came from, and the exported text graph decoding step by step against the float
model (perplexity, same next token); `deployment_cost` puts them together for `genieblue bench deploy`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data import GenieBlueProcessor, read_records
from ..eval.answers import answer_records, exact_match
from ..eval.text import PASSAGES, perplexity, text_qa
from ..loading import load_model_and_processor
from ..model import GenieBlueForConditionalGeneration
from . import activations as activations_setting
from .onnx_export import EXPORT_PLACEMENT, quantize
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
def next_token_agreement(next_logits, reference, tokenizer, texts: list[str]) -> dict:
    """How faithful a runtime is to the PyTorch `reference` (its text path) over each of `texts`:
    `next_logits(ids)` gives the runtime's logits after each of ids[:-1] (one row per position).
    Returns the perplexity of both, how often their greedy next token is the same, and the mean
    and max |logit difference|."""
    nll = {"deployed": 0.0, "reference": 0.0}
    same = count = 0
    diff_sum, diff_max = 0.0, 0.0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        expected = reference(torch.tensor([ids])).logits[0, :-1].double()
        got, targets = torch.as_tensor(np.asarray(next_logits(ids))).double(), torch.tensor(ids[1:])[:, None]
        for name, logits in (("deployed", got), ("reference", expected)):
            nll[name] -= torch.log_softmax(logits, -1).gather(-1, targets).sum().item()
        same += (got.argmax(-1) == expected.argmax(-1)).sum().item()
        diff = (got - expected).abs()
        diff_sum, diff_max = diff_sum + diff.mean(-1).sum().item(), max(diff_max, diff.max().item())
        count += len(ids) - 1
    return {f"perplexity_{name}": float(np.exp(total / count)) for name, total in nll.items()} | {
        "same_next_token": same / count,
        "mean_abs_logit_diff": diff_sum / count,
        "max_abs_logit_diff": diff_max,
        "positions": count,
    }


def stepwise_text(folder, reference: GenieBlueForConditionalGeneration, tokenizer, texts: list[str]) -> dict:
    """`next_token_agreement` of the exported text graph run token by token (`DeployedModel.step`
    with its KV cache, as a phone decodes) against the PyTorch `reference` on the whole text."""
    deployed = DeployedModel(folder)

    def next_logits(ids: list[int]) -> np.ndarray:
        cache, steps = deployed.new_cache(), []
        for token in ids[:-1]:
            logits, cache = deployed.step(np.array([[token]]), cache)
            steps.append(np.asarray(logits[0]))
        return np.stack(steps)

    return next_token_agreement(next_logits, reference, tokenizer, texts)


def deployment_cost(
    model_dir: str | Path, folder: str | Path, *, llm: str | None = None, vqa: str | None = None
) -> dict:
    """What W4A16 costs against the float model.

    Args:
        model_dir: the saved GenieBlue folder that was exported.
        folder: its export (`genieblue export`); its manifest says how to quantise the reference.
        llm: the base LLM, if not the one the model's manifest names.
        vqa: a LLaVA JSON of short-answer image questions, scored float vs W4A16.

    Returns:
        logit error per mode, held-out perplexity and text QA on the text path (and VQA exact match
        with `vqa`), the exported graphs against the PyTorch model, and the exported text graph
        decoding the held-out passages step by step.

    Raises:
        FileNotFoundError: either folder is missing what it needs.
        BadRecord: a record of `vqa` is unusable.
    """
    manifest = DeployedModel(folder).manifest
    reference, processor = load_model_and_processor(model_dir, llm, *EXPORT_PLACEMENT)
    quantized = load_model_and_processor(model_dir, llm, *EXPORT_PLACEMENT)[0]
    scheme = manifest["quantization"] or {}
    quantize(quantized, llm, keep_gguf=bool(scheme.get("gguf")), copy_bits=scheme.get("copy_bits") or 4)
    prompts = probe_prompts(processor)
    records = read_records(vqa, Path(vqa).parent) if vqa else []
    scores = {}
    for name, m in (("float", reference), ("w4a16", quantized)):
        scores[name] = {
            "perplexity": perplexity(m, processor.tokenizer, shared_base=False),
            "text_qa": text_qa(m, processor)["accuracy"],
        }
        if records:
            scores[name]["vqa"] = exact_match(records, answer_records(m, processor, records, max_new_tokens=4))[
                "accuracy"
            ]
    exported = manifest["precision"]
    return {
        "logit_error": logit_error(quantized, reference, prompts),
        "scores": scores,
        "onnx_vs_pytorch": onnx_error(folder, quantized if exported == "w4a16" else reference, prompts),
        "exported_precision": exported,
        "activations": activations_setting.of(manifest),
        "quantization": manifest["quantization"],
        "deployed_text_stepwise": stepwise_text(folder, reference, processor.tokenizer, PASSAGES),
    }
