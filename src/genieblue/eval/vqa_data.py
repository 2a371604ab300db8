"""Multimodal benchmark files in, `Benchmark`s out: every item becomes a LLaVA record (question with
its images, the first reference answer as the final turn) plus all its references, its options
(multiple choice) and its category. Two formats:

  * JSON / JSONL: records in any training format (`data.records`: LLaVA `conversations`,
    ShareGPT / LLaMA-Factory `messages`, OpenAI content parts) or LLaVA eval questions
    (`question_id`, `image`, `text`); references from `answers` (list), `answer` or the final reply; options from
    `options` (list or dict) or from "A. ..." lines in the question. Images are relative to the file's folder.
  * VLMEvalKit-style TSV: columns index, image (base64, a list of them, or the index of a row whose
    image it shares), question, answer (a letter, a text, or a list literal of texts), optional
    option columns A, B, C, ..., hint and category. Prompts follow LLaVA's evaluation prompts.

Items that cannot be used (malformed row, missing question or answer, undecodable image, answer not
among the options) are skipped and counted per reason.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..data.images import ImageError, load_image
from ..data.records import NEEDS, BadRecord, RecordFile, check_record, unbroken, unusable_file
from .vqa_metrics import METRICS, metric_for

NEEDS_QUESTION = f"{NEEDS}, or a `question` / `text` with `answer` / `answers` (LLaVA eval questions)"
MC_PROMPT = "Answer with the option's letter from the given choices directly."
SHORT_PROMPT = "Answer the question using a single word or phrase."
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.+?)\s*$", re.MULTILINE)


@dataclass
class Benchmark:
    """One benchmark file: usable items, the metric that scores them and what was skipped."""

    name: str
    metric: str
    items: list[dict]
    skipped: Counter = field(default_factory=Counter)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


def _options(value) -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k).strip(): str(v) for k, v in value.items()}
    return {string.ascii_uppercase[i]: str(v) for i, v in enumerate(value)}


def _answer_letter(answer: str, options: dict[str, str]) -> str | None:
    """An answer given as a letter or as an option's text, as the option's letter."""
    answer = answer.strip()
    if answer.rstrip(".)").lstrip("(") in options:
        return answer.rstrip(".)").lstrip("(")
    return next((k for k, v in options.items() if v.strip().lower() == answer.lower()), None)


def _item(record: dict, answers: list[str], options: dict[str, str] | None, category: str, mc: bool) -> dict:
    """The item of a checked record; raises ValueError when it has no usable answer."""
    answers = [str(a).strip() for a in answers if str(a).strip()]
    if not answers:
        raise ValueError("no reference answer")
    for image in record.get("images", []):
        load_image(image)
    item = {"id": record["id"], "record": record, "answers": answers, "category": category}
    if mc:
        letter = _answer_letter(answers[0], options or {})
        if letter is None:
            raise ValueError("answer is not one of the options")
        item.update(answers=[letter], options=options)
    return item


def _skip_reason(err: Exception) -> str:
    if isinstance(err, ImageError):
        return "unusable image"
    return str(err.reason if isinstance(err, BadRecord) else err).split(":")[0].split(" (")[0].split(", got")[0]


def _llava_record(raw: dict, index: int, folder: Path) -> tuple[dict, list]:
    """The checked training-style record of a LLaVA eval question or a record in any training
    format, and its references."""
    if "conversations" in raw or "messages" in raw:
        record = check_record(raw, folder, fallback_id=index)
        final = record["conversations"][-1]["value"]
    else:
        question = raw.get("text", raw.get("question", raw.get("prompt")))
        if not isinstance(question, str) or not question.strip():
            raise ValueError("no question")
        final = raw.get("answer", raw.get("gt_answer", ""))
        record = {k: v for k, v in raw.items() if k in ("image", "images")}
        record["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": str(final)}]
        record = check_record(record, folder, fallback_id=index)
    record["id"] = str(raw.get("question_id", raw.get("id", index)))
    answers = raw.get("answers", [final])
    return record, answers if isinstance(answers, list) else [answers]


def read_llava(path: Path, name: str, metric: str | None) -> Benchmark:
    parsed, skipped, count, first, first_reason = [], Counter(), 0, None, ""
    for i, raw in RecordFile(path).scan():
        count, first = count + 1, raw if i == 0 else first
        try:
            record, answers = _llava_record(unbroken(raw, i), i, path.parent)
            question = "\n".join(t["value"] for t in record["conversations"][:-1] if t["from"] == "human")
            options = _options(raw["options"]) if "options" in raw else dict(_OPTION_LINE.findall(question))
            parsed.append((record, answers, options, str(raw.get("category", ""))))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            skipped[_skip_reason(err)] += 1
            first_reason = first_reason or str(getattr(err, "reason", err))
    if not parsed:
        raise ValueError(unusable_file(path, count, first, first_reason, NEEDS_QUESTION))
    metric = metric or metric_for(name, any(options for _, _, options, _ in parsed))
    return _finish(name, metric, parsed, skipped)


def _finish(name: str, metric: str, parsed: list, skipped: Counter) -> Benchmark:
    items = []
    for record, answers, options, category in parsed:
        try:
            items.append(_item(record, answers, options, category, metric == "mc"))
        except ValueError as err:  # ImageError included
            skipped[_skip_reason(err)] += 1
    seen = Counter()
    for item in items:  # ids key the resume cache: repeated ones get a suffix
        seen[item["id"]] += 1
        if seen[item["id"]] > 1:
            item["id"] = f"{item['id']}#{seen[item['id']]}"
    return Benchmark(name, metric, items, skipped)


def _tsv_answers(value: str) -> list:
    if value.startswith("[") and value.endswith("]"):
        try:
            parsed = ast.literal_eval(value)
            return parsed if isinstance(parsed, list) else [value]
        except (ValueError, SyntaxError):
            pass
    return [value]


def _tsv_images(value: str, by_index: dict[str, str]) -> list[bytes]:
    """Image bytes of a TSV cell: base64, a list literal of base64 strings, or another row's index."""
    if len(value) <= 64 and value in by_index:
        value = by_index[value]
    encoded = ast.literal_eval(value) if value.startswith("[") else [value]
    try:
        return [base64.b64decode(v, validate=True) for v in encoded]
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("image is not base64") from None


def _tsv_prompt(row: dict, options: dict[str, str]) -> str:
    hint = row.get("hint", "").strip()
    question = row["question"].strip()
    if hint and hint.lower() != "nan":
        question = f"Hint: {hint}\n{question}"
    if options:
        return question + "\n" + "".join(f"{k}. {v}\n" for k, v in options.items()) + MC_PROMPT
    return f"{question}\n{SHORT_PROMPT}"


def read_tsv(path: Path, name: str, metric: str | None) -> Benchmark:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are long cells
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = {"image", "question", "answer"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not a VLMEvalKit TSV (no {', '.join(sorted(missing))} column)")
        rows = list(reader)
    by_index = {r["index"]: r["image"] for r in rows if r.get("index") and r.get("image") and len(r["image"]) > 64}
    letters = [c for c in string.ascii_uppercase if c in (reader.fieldnames or [])]
    parsed, skipped = [], Counter()
    for i, row in enumerate(rows):
        try:
            if None in row or None in row.values():
                raise ValueError("malformed row")
            if not row["question"].strip():
                raise ValueError("no question")
            options = {c: row[c].strip() for c in letters if row[c].strip() and row[c].strip().lower() != "nan"}
            images = _tsv_images(row["image"].strip(), by_index)
            turns = [{"from": "human", "value": _tsv_prompt(row, options)}, {"from": "gpt", "value": row["answer"]}]
            record = {"id": row.get("index") or str(i), "images": images, "conversations": turns}
            parsed.append((record, _tsv_answers(row["answer"].strip()), options, row.get("category", "")))
        except (ValueError, SyntaxError) as err:
            skipped[_skip_reason(err)] += 1
    metric = metric or metric_for(name, any(options for _, _, options, _ in parsed))
    return _finish(name, metric, parsed, skipped)


def parse_spec(spec: str) -> tuple[str, str | None, Path]:
    """`[NAME[:METRIC]=]FILE` -> (name, metric or None, file); the name defaults to the file's stem."""
    head, sep, tail = spec.partition("=")
    if not sep or "/" in head or Path(spec).is_file():
        head, tail = "", spec
    name, _, metric = head.partition(":")
    path = Path(tail)
    if metric and metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} in {spec!r}; choose from {', '.join(METRICS)}")
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    return name or path.stem, metric or None, path


def load_benchmark(spec: str) -> Benchmark:
    """Read a benchmark from `[NAME[:METRIC]=]FILE` (.tsv: VLMEvalKit, otherwise LLaVA JSON/JSONL)."""
    name, metric, path = parse_spec(spec)
    read = read_tsv if path.suffix.lower() == ".tsv" else read_llava
    return read(path, name, metric)
