"""Short-answer evaluation: batched greedy answers for LLaVA-format questions (with or without an
image) and exact-match scoring after light normalisation."""

from __future__ import annotations

import string
from collections import defaultdict

from ..data import GenieBlueProcessor, collate_prompts
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
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    return out[:, batch["input_ids"].shape[1] :]


def answer_records(model, processor: GenieBlueProcessor, records: list[dict], batch_size: int = 16,
                   max_new_tokens: int = 8, shared_base: bool | None = None, progress=None) -> list[str]:
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
            new = _generate(model, batch, shared_base, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=processor.pad_id)
            for i, row in zip(chunk, new):
                replies[i] = processor.tokenizer.decode(row, skip_special_tokens=True)
            if progress:
                progress.advance(task, len(chunk))
    if progress:
        progress.remove_task(task)
    return replies


def exact_match(records: list[dict], replies: list[str], group_key: str = "task") -> dict:
    """Accuracy overall and per group (e.g. per synthetic task)."""
    hits, totals = defaultdict(int), defaultdict(int)
    for record, reply in zip(records, replies):
        group = record.get(group_key, "all")
        totals[group] += 1
        hits[group] += normalize_answer(reply) == normalize_answer(_messages(record)[1])
    per = {g: hits[g] / totals[g] for g in sorted(totals)}
    return {"accuracy": sum(hits.values()) / max(1, sum(totals.values())), "per_group": per, "n": sum(totals.values())}


