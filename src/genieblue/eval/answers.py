"""Short-answer evaluation: batched greedy answers for LLaVA-format questions (with or without an
image), exact-match scoring after light normalisation with 95% Wilson intervals, and the reference
answers' loss with each record's own image or another record's (does the model use the image?)."""

from __future__ import annotations

import math
import random
import string
from collections import defaultdict

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX, GenieBlueProcessor, collate, collate_prompts
from ..data.records import ROLES
from ..model import GenieBlueForConditionalGeneration

_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def normalize_answer(text: str) -> str:
    """First word of a reply, lower-cased, punctuation stripped, number words as digits."""
    words = text.strip().lower().translate(str.maketrans("", "", string.punctuation)).split()
    word = words[0] if words else ""
    return _NUMBER_WORDS.get(word, word)


def _messages(record: dict) -> tuple[list[dict], str]:
    """Everything before the final assistant reply, and that reply (the reference answer)."""
    turns = record["conversations"]
    *context, last = turns
    if last["from"] != "gpt":
        raise ValueError(f"record {record.get('id')}: the last turn must be the reference answer")
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in context], last["value"]


def _generate(model, batch: dict, shared_base: bool | None, **kwargs):
    """New tokens from a GenieBlue model (routed by `shared_base`) or from a plain HF base model."""
    if isinstance(model, GenieBlueForConditionalGeneration):
        return model.generate(**batch, shared_base=shared_base, **kwargs)
    if batch["pixel_values"] is not None:
        raise ValueError("a plain language model cannot answer questions about images")
    ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return out[:, batch["input_ids"].shape[1] :]


def answer_records(
    model,
    processor: GenieBlueProcessor,
    records: list[dict],
    batch_size: int = 16,
    max_new_tokens: int = 8,
    shared_base: bool | None = None,
    progress=None,
) -> list[str]:
    """Greedy replies to each record's question (its images attached). Records with and without
    images are batched separately, so text-only questions take the text path."""
    replies: list[str | None] = [None] * len(records)
    by_kind = defaultdict(list)
    for i, r in enumerate(records):
        by_kind[bool(r.get("images"))].append(i)
    task = progress.add_task("answering", total=len(records), status="") if progress else None
    for indices in by_kind.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            prompts = [processor.prompt(_messages(records[i])[0], records[i].get("images", [])) for i in chunk]
            batch = collate_prompts(prompts, processor.pad_id)
            new = _generate(
                model, batch, shared_base, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.pad_id
            )
            for i, row in zip(chunk, new):
                replies[i] = processor.tokenizer.decode(row, skip_special_tokens=True)
            if progress:
                progress.advance(task, len(chunk))
    if progress:
        progress.remove_task(task)
    return replies


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion hits / n."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def exact_match(records: list[dict], replies: list[str], group_key: str = "task") -> dict:
    """Accuracy overall and per group (e.g. per synthetic task), with counts and 95% intervals."""
    hits, totals = defaultdict(int), defaultdict(int)
    for record, reply in zip(records, replies):
        group = record.get(group_key, "all")
        totals[group] += 1
        hits[group] += normalize_answer(reply) == normalize_answer(_messages(record)[1])
    per = {g: hits[g] / totals[g] for g in sorted(totals)}
    n, k = sum(totals.values()), sum(hits.values())
    return {
        "accuracy": k / max(1, n),
        "per_group": per,
        "n": n,
        "hits": k,
        "interval": wilson_interval(k, n),
        "per_group_n": {g: totals[g] for g in per},
        "per_group_interval": {g: wilson_interval(hits[g], totals[g]) for g in per},
    }


@torch.no_grad()
def answer_loss(
    model,
    processor: GenieBlueProcessor,
    records: list[dict],
    shuffle_images: bool = False,
    seed: int = 0,
    batch_size: int = 16,
) -> float:
    """Mean cross-entropy per reference-answer token (the training rendering of each record). With
    `shuffle_images`, every record gets another record's image (a derangement of the images): a
    model that uses the image does clearly worse then."""
    records = [dict(r) for r in records]
    if shuffle_images:
        images = [r["images"] for r in records]
        order = list(range(len(images)))
        rng = random.Random(seed)
        while any(i == j for i, j in enumerate(order)) and len(order) > 1:
            rng.shuffle(order)
        for record, j in zip(records, order):
            record["images"] = images[j]
    total, count = 0.0, 0
    for start in range(0, len(records), batch_size):
        batch = collate([processor.encode(r) for r in records[start : start + batch_size]], processor.pad_id)
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        targets = labels[:, 1:].to(logits.device)
        total += F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((targets != IGNORE_INDEX).sum())
    return total / max(1, count)
