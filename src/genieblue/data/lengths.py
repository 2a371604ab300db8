"""Token counts of one source's records for packing, in bulk before the first step.

The exact count (`GenieBlueProcessor.lengths`: chat template, tokenizer, image headers) costs ~0.3 ms
a record on one core, mostly the tokenizer, so a million records would take minutes. It is taken
for the first `EXACT_FIRST` records of a source (a small file is measured exactly, all of it) and
for every `EXACT_EVERY`-th record after; each other record gets an estimate: its image tokens (exact,
from the headers) plus its text tokens predicted from its characters, turns and own system turn by
a least-squares fit on the source's exact ones, scaled up to their `QUANTILE` of exact / predicted so
that few estimates fall short.

An estimate only places a sample in a packed row. A step encodes its samples exactly and packs them
again (`pack`): no row exceeds `max_length`, no token is cut, no sample dropped, and a micro-batch
whose rows were estimated short gets one more row. A record whose estimate leaves doubt about
`max_length` (its image tokens plus twice its text estimate exceed it) is measured exactly, so
records too long are refused before training as before.
"""

from __future__ import annotations

import heapq
from array import array
from operator import itemgetter

import numpy as np

from .records import IMAGE_PLACEHOLDER, BadRecord

EXACT_FIRST = 4096
EXACT_EVERY = 256
QUANTILE = 0.9
BATCH = 1024
"""Records per tokenizer call."""
_DIGITS = b"0123456789"
_PLAIN = bytes(range(ord("a"), ord("z") + 1)) + bytes(range(ord("A"), ord("Z") + 1)) + _DIGITS + b" \n"


def sampled(position: int) -> bool:
    """Whether a source's record at `position` is measured exactly: the first `EXACT_FIRST` and every
    `EXACT_EVERY`-th, the sample every estimate of that source is fitted on."""
    return position < EXACT_FIRST or position % EXACT_EVERY == 0


class LengthMeasure:
    """Token counts by `processor`, as a `DataMixture` takes a measure: called with an iterator of one
    source's (position, checked record), in order, and `reload(position)` (a record again, to measure
    a doubtful one exactly), it yields (position, length, exact) for each, where length is the
    record's token count (exact or estimated) or the `BadRecord` that makes it unusable. An estimate
    depends on the records at the `sampled` positions and on nothing else beyond its own record; `key`
    names the settings every length depends on (the code that measures is named by
    `scans.ScanCache`): equal keys, equal lengths."""

    sampled = staticmethod(sampled)

    def __init__(self, processor):
        self.processor = processor

    @property
    def key(self) -> str:
        return f"{self.processor.measure_key()}:{EXACT_FIRST}:{EXACT_EVERY}:{QUANTILE}"

    def __call__(self, checked, reload):
        sample_x, sample_y = [], []  # features and exact text tokens of the exact ones

        def exact(batch: list) -> list:
            out = []
            for (i, record), value in zip(batch, self.processor.lengths([r for _, r in batch])):
                if isinstance(value, Exception):
                    value = _bad(record, value)
                else:
                    sample_x.append(_features(record))
                    sample_y.append(value - self.processor.image_tokens(record))
                out.append((i, value, True))
            return out

        measured, pending, positions, images, features = [], [], array("q"), array("q"), array("q")
        for i, record in checked:
            if sampled(i):
                pending.append((i, record))
                if len(pending) == BATCH:
                    measured += exact(pending)
                    pending = []
                continue
            try:
                images.append(self.processor.image_tokens(record))
            except ValueError as err:  # ImageError: a header that does not read
                measured.append((i, _bad(record, err), True))
                continue
            positions.append(i)
            features.extend(_features(record))
        measured += exact(pending)
        guesses = []
        if positions:
            image = np.frombuffer(images, dtype=np.int64)
            text = _estimate(sample_x, sample_y, np.frombuffer(features, dtype=np.int64).reshape(len(positions), -1))
            doubtful = np.flatnonzero(image + 2 * text > self.processor.max_length)
            for start in range(0, len(doubtful), BATCH):
                measured += exact(
                    [(positions[k], reload(positions[k])) for k in doubtful[start : start + BATCH].tolist()]
                )
            estimated = np.ones(len(positions), dtype=bool)
            estimated[doubtful] = False
            guesses = ((i, n, False) for i, n, e in zip(positions, (image + text).tolist(), estimated.tolist()) if e)
        yield from heapq.merge(sorted(measured, key=itemgetter(0)), guesses, key=itemgetter(0))


def _features(record: dict) -> tuple[int, ...]:
    """What a checked record's text tokens are fitted on: its characters, UTF-8 bytes beyond them,
    spaces, newlines, digits, other bytes (punctuation, non-ASCII), turns and own system turn."""
    turns = record["conversations"]
    text = "\n".join(t["value"] for t in turns)
    if "images" in record:
        text = text.replace(IMAGE_PLACEHOLDER, "")
    raw = text.encode()
    digits = len(raw) - len(raw.translate(None, _DIGITS))
    return (
        len(text),
        len(raw) - len(text),
        raw.count(b" "),
        raw.count(b"\n"),
        digits,
        len(raw.translate(None, _PLAIN)),
        len(turns),
        int(turns[0]["from"] == "system"),
    )


def _bad(record: dict, err: ValueError) -> BadRecord:
    return err if isinstance(err, BadRecord) else BadRecord(record["id"], str(err))


def _estimate(sample_x: list, sample_y: list, x: np.ndarray) -> np.ndarray:
    """Text tokens of records with features `x` from the exact sample's fit (all `max_length`
    doubtful, i.e. measured exactly, when the sample is too small to fit)."""
    if len(sample_y) < 8:
        return np.full(len(x), np.iinfo(np.int32).max, dtype=np.int64)
    design = np.column_stack([np.asarray(sample_x, dtype=np.float64), np.ones(len(sample_x))])
    y = np.asarray(sample_y, dtype=np.float64)
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    scale = float(np.quantile(y / np.maximum(design @ coef, 1.0), QUANTILE))
    predicted = np.column_stack([x.astype(np.float64), np.ones(len(x))]) @ coef
    return np.ceil(scale * np.maximum(predicted, 1.0)).astype(np.int64)
