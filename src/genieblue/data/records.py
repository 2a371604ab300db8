"""Training records in the LLaVA format: reading JSON / JSONL files, validating each record
(roles, `<image>` placeholders, image files) and mixing several sources by ratio (`DataMixture`,
e.g. multimodal data plus a share of text-only data, as in the paper's ablation).

A record is a dict: `conversations` (list of {"from": "human" | "gpt" | "system", "value": str}),
optional `image` (str) or `images` (list of str) relative to an image folder, optional `id`.
Records that come out of this module are normalised copies: `images` is always a list of absolute
paths (absent for text-only records) and the placeholder count matches the images.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
"""LLaVA speaker names -> chat-template roles."""


class BadRecord(ValueError):
    """A record that cannot be trained on: names the record and the reason."""

    def __init__(self, record_id, reason: str):
        super().__init__(f"record {record_id}: {reason}")
        self.record_id = record_id
        self.reason = reason


def _record_id(record, fallback) -> str:
    return str(record["id"]) if isinstance(record, dict) and "id" in record else str(fallback)


def _check_turns(turns) -> None:
    """Raise ValueError unless turns are [system?] human, gpt, human, gpt, ... with string values."""
    if not isinstance(turns, list) or not turns:
        raise ValueError("conversations must be a non-empty list")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i} must be {{'from': human|gpt|system, 'value': str}}, got {turn!r:.80}")
    speakers = [t["from"] for t in turns]
    if speakers[0] == "system":
        speakers = speakers[1:]
    alternating = set(speakers[0::2]) == {"human"} and set(speakers[1::2]) == {"gpt"}
    if not alternating or len(speakers) % 2:
        raise ValueError(f"roles must alternate human, gpt, ... and end with gpt, got {speakers}")


def _image_list(record: dict) -> list:
    images = record.get("images", record.get("image"))
    if images is None:
        return []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError(f"image/images must be a path or a list of paths, got {images!r:.80}")
    return images


def prepend_placeholders(turns: list[dict], index: int, text_key: str, n_images: int) -> list[dict]:
    """A copy of `turns` with `<image>\\n` per image before the text of turn `index`."""
    turns = [dict(t) for t in turns]
    turns[index][text_key] = f"{IMAGE_PLACEHOLDER}\n" * n_images + turns[index][text_key]
    return turns


def _with_placeholders(turns: list[dict], n_images: int) -> list[dict]:
    """Turns whose `<image>` count equals `n_images`; with none at all, they go before the first
    human text (LLaVA convention)."""
    found = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if found == 0 and n_images:
        first = next(i for i, t in enumerate(turns) if t["from"] == "human")
        turns = prepend_placeholders(turns, first, "value", n_images)
    elif found != n_images:
        raise ValueError(f"{found} {IMAGE_PLACEHOLDER} placeholders but {n_images} images")
    return turns


def check_record(record, image_folder: str | Path | None = None, fallback_id="?") -> dict:
    """The normalised copy of a valid record, or `BadRecord` saying what is wrong with it."""
    rid = _record_id(record, fallback_id)
    if not isinstance(record, dict):
        raise BadRecord(rid, f"a record must be a JSON object, got {type(record).__name__}")
    try:
        _check_turns(record.get("conversations"))
        folder = Path(image_folder or ".")
        images = [str((folder / p).resolve()) for p in _image_list(record)]
        turns = _with_placeholders(record["conversations"], len(images))
    except ValueError as err:
        raise BadRecord(rid, str(err)) from None
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise BadRecord(rid, f"image file not found: {missing[0]}")
    out = {k: v for k, v in record.items() if k not in ("image", "images")}
    out.update(id=rid, conversations=turns, **({"images": images} if images else {}))
    return out


def _parse(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: invalid JSON line ({err})") from None
    return rows


def scan_records(path: str | Path, image_folder: str | Path | None = None) -> tuple[list[dict], list[BadRecord]]:
    """Read a LLaVA JSON list or JSONL file: (normalised good records, one BadRecord per bad one).
    Image paths are relative to `image_folder`, by default the data file's folder."""
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    good, bad = [], []
    for i, raw in enumerate(_parse(path)):
        try:
            good.append(check_record(raw, folder, fallback_id=f"{path.name}#{i}"))
        except BadRecord as err:
            bad.append(err)
    return good, bad


def read_records(path: str | Path, image_folder: str | Path | None = None) -> list[dict]:
    """Like `scan_records`, but the first bad record raises its `BadRecord`."""
    good, bad = scan_records(path, image_folder)
    if bad:
        raise bad[0]
    return good


@dataclass(frozen=True)
class Source:
    """One data file in a mixture; `ratio` is its relative weight."""

    path: str | Path
    ratio: float = 1.0
    image_folder: str | Path | None = None


def _draw(records: list[dict], count: int, rng: random.Random) -> list[dict]:
    """`count` records: whole shuffled passes over `records`, then a random part of one more."""
    passes, rest = divmod(count, len(records))
    out = []
    for _ in range(passes):
        out += rng.sample(records, len(records))
    return out + rng.sample(records, rest)


def _shares(weights: list[float], size: int) -> list[int]:
    """Split `size` in proportion to `weights` (largest-remainder rounding, sums to `size`)."""
    exact = [size * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: size - sum(counts)]:
        counts[i] += 1
    return counts


class DataMixture:
    """Records of several sources, interleaved deterministically (by `seed`) so that each source's
    share of the list follows its ratio. `size` defaults to the total record count; a source with
    fewer records than its share is repeated (in reshuffled passes), a larger one subsampled.
    Invalid records are left out and kept in `bad` (one `BadRecord` each) for the caller to report."""

    def __init__(self, sources, seed: int = 0, size: int | None = None):
        self.sources = [s if isinstance(s, Source) else Source(*s) for s in sources]
        if not self.sources or any(s.ratio < 0 for s in self.sources) or not sum(s.ratio for s in self.sources):
            raise ValueError("a mixture needs at least one source and non-negative ratios with a positive sum")
        rng = random.Random(seed)
        scanned = [scan_records(s.path, s.image_folder) for s in self.sources]
        pools = [good for good, _ in scanned]
        self.bad: list[BadRecord] = [b for _, bad in scanned for b in bad]
        for source, pool in zip(self.sources, pools):
            if not pool:
                raise ValueError(f"{source.path}: no records")
        size = sum(len(p) for p in pools) if size is None else size
        self.counts = _shares([s.ratio for s in self.sources], size)
        self.records = [r for pool, n in zip(pools, self.counts) for r in _draw(pool, n, rng)]
        rng.shuffle(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def __iter__(self):
        return iter(self.records)
