"""Training records in the formats people already have, read lazily from JSON / JSONL files,
validated (roles, `<image>` placeholders, image files) and mixed by ratio (`DataMixture`, e.g.
multimodal data plus a share of text-only data, as in the paper's ablation).

Formats, told apart per record:
  * LLaVA / ShareGPT4V: `conversations` [{"from": "human" | "gpt" | "system", "value": str}],
    `image` (str) or `images` (list);
  * ShareGPT / LLaMA-Factory: `messages` [{"role": "user" | "assistant" | "system", "content": str}],
    `images`, an optional top-level `system` prompt;
  * OpenAI content parts: a turn's content is a list of {"type": "text", "text"} and
    {"type": "image_url", "image_url": {"url"}} parts (the url a path or a base64 `data:` URL), or
    bare {"type": "image"} parts standing for the record's next `images` entry.
`<image>` may stand anywhere in any turn; without any, the images go before the first user text.
Image paths are relative to an image folder (by default the data file's folder).

Records that come out of this module are normalised LLaVA copies: `conversations` with from/value
turns, `images` a list of absolute paths or data URLs (absent for text-only records) and exactly
one placeholder per image. Files are indexed by the byte span of each record and records parsed on
access, so a million-record file never sits in memory as Python objects.
"""

from __future__ import annotations

import json
import math
import random
from array import array
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .images import is_data_url

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
"""LLaVA speaker names -> chat-template roles."""
_SPEAKERS = {"system": "system", "human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
"""Every speaker or role name read -> its LLaVA name."""
TOO_LONG = "exceed max_length"
"""The words of a record refused for its length (`GenieBlueProcessor`), as it says them."""
NEEDS = (
    "a record needs `conversations` (LLaVA / ShareGPT: [{from: human|gpt|system, value}]) or `messages` "
    "(LLaMA-Factory / OpenAI: [{role: user|assistant|system, content: text or parts}]), optionally "
    "`image` / `images`"
)


class BadRecord(ValueError):
    """A record that cannot be trained on: names the record and the reason."""

    def __init__(self, record_id, reason: str):
        super().__init__(f"record {record_id}: {reason}")
        self.record_id = record_id
        self.reason = reason


class BrokenLine:
    """A JSONL line that does not parse, kept in its place as a record that `check_record` refuses:
    one cut or garbled line of a file of millions is a bad record, skipped and counted, not the file's end."""

    def __init__(self, where: str, error: Exception):
        self.reason = f"invalid JSON on {where} ({error})"


def unbroken(record, fallback_id="?"):
    """`record`, or a `BadRecord` raised for a line that did not parse (`BrokenLine`)."""
    if isinstance(record, BrokenLine):
        raise BadRecord(fallback_id, record.reason)
    return record


def _record_id(record, fallback) -> str:
    return str(record["id"]) if isinstance(record, dict) and "id" in record else str(fallback)


# formats -> LLaVA ---------------------------------------------------------------------------------
def _part_text(part, inline: list[str]) -> str:
    """The text of one content part; an image part becomes a placeholder (its source, if it names
    one, goes to `inline`)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if kind in ("image_url", "image"):
        source = part.get(kind)
        source = source.get("url") if isinstance(source, dict) else source
        if source is not None:
            if not isinstance(source, str):
                raise ValueError(f"an {kind} part needs a path or data URL, got {source!r:.80}")
            inline.append(source)
        return IMAGE_PLACEHOLDER + "\n"  # as the server renders an image part
    raise ValueError(f"content part {part!r:.80} is not a text, image_url or image part")


def _turn(turn, inline: list[str]):
    """A LLaVA turn from a LLaVA / ShareGPT / OpenAI one; anything else is returned as it is for
    `_check_turns` to name."""
    if not isinstance(turn, dict):
        return turn
    speaker, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
    if isinstance(text, list):
        text = "".join(_part_text(part, inline) for part in text)
    if speaker not in _SPEAKERS or not isinstance(text, str):
        return turn
    return {"from": _SPEAKERS[speaker], "value": text}


def _image_list(record: dict) -> list:
    images = record.get("images", record.get("image"))
    if images is None:
        return []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError(f"image/images must be a path or a list of paths, got {images!r:.80}")
    return images


def _llava_turns(record: dict) -> tuple[list, list[str]]:
    """(turns in LLaVA form, image sources in placeholder order) of a record in any format."""
    turns = record.get("conversations", record.get("messages"))
    if turns is None:
        raise ValueError(f"no turns: {NEEDS}")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"conversations / messages must be a non-empty list, got {turns!r:.80}")
    inline: list[str] = []
    turns = [_turn(t, inline) for t in turns]
    system = record.get("system")
    if isinstance(system, str) and system and not (isinstance(turns[0], dict) and turns[0].get("from") == "system"):
        turns.insert(0, {"from": "system", "value": system})
    listed = _image_list(record)
    if inline and listed:
        raise ValueError("images both inline (image parts with a url) and in image/images: give them one way")
    return turns, inline or listed


def _check_turns(turns) -> None:
    """Raise ValueError unless turns are [system?] human, gpt, human, gpt, ... with string values."""
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(
                f"turn {i} must be {{'from': human|gpt|system, 'value': str}} or {{'role': "
                f"user|assistant|system, 'content': str or parts}}, got {turn!r:.80}"
            )
    speakers = [t["from"] for t in turns]
    if speakers[0] == "system":
        speakers = speakers[1:]
    alternating = set(speakers[0::2]) == {"human"} and set(speakers[1::2]) == {"gpt"}
    if not alternating or len(speakers) % 2:
        raise ValueError(f"roles must alternate human, gpt, ... and end with gpt, got {speakers}")


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


def _resolve(source: str, folder: Path) -> str:
    if is_data_url(source):
        return source
    if source.startswith(("http://", "https://")):
        raise ValueError(f"remote image URLs are never fetched, got {source:.80}: use a local path or a data: URL")
    return str((folder / source.removeprefix("file://")).resolve())


def check_record(record, image_folder: str | Path | None = None, fallback_id="?") -> dict:
    """The normalised LLaVA copy of a valid record in any supported format.

    Args:
        record: one parsed record: LLaVA / ShareGPT4V, ShareGPT / LLaMA-Factory or OpenAI content
            parts (docs/training.md, Data formats).
        image_folder: what relative image paths are relative to (default: the working directory).
        fallback_id: the id to report for a record without one.

    Returns:
        {"id", "conversations" (LLaVA turns with `<image>` placeholders), "images" (absolute paths
        or data URLs), and the record's other keys}.

    Raises:
        BadRecord: what is wrong with the record (shape, roles, placeholders, a remote or missing
            image).
    """
    rid = _record_id(unbroken(record, fallback_id), fallback_id)
    if not isinstance(record, dict):
        raise BadRecord(rid, f"a record must be a JSON object, got {type(record).__name__}")
    try:
        turns, images = _llava_turns(record)
        _check_turns(turns)
        folder = Path(image_folder or ".")
        images = [_resolve(p, folder) for p in images]
        turns = _with_placeholders(turns, len(images))
    except ValueError as err:
        raise BadRecord(rid, str(err)) from None
    missing = [p for p in images if not is_data_url(p) and not Path(p).is_file()]
    if missing:
        raise BadRecord(rid, f"image file not found: {missing[0]}")
    out = {k: v for k, v in record.items() if k not in ("image", "images", "messages", "system")}
    out.update(id=rid, conversations=turns, **({"images": images} if images else {}))
    return out


def unusable_file(path, count: int, first, reason: str, needs: str = NEEDS) -> str:
    """The one-line error for a file none of whose `count` records can be used; `first` is its
    first record and `reason` why that one was refused."""
    if not count:
        return f"{path}: no records"
    if isinstance(first, BrokenLine):
        keys = "no JSON"
    elif isinstance(first, dict):
        keys = f"keys [{', '.join(map(str, first))}]"
    else:
        keys = f"a {type(first).__name__}"
    return f"{path}: none of its {count} records is usable: {needs}; the first record has {keys} ({reason})"


# files ----------------------------------------------------------------------------------------------
class RecordFile:
    """The records of one JSON list or JSONL file: `scan()` reads them once, front to back, and
    keeps only each record's byte span; `load(i)` parses record i alone."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._starts, self._ends = array("q"), array("q")

    def __len__(self) -> int:
        return len(self._starts)

    def scan(self):
        """Yield every record (index, parsed JSON) in file order, indexing its span; a JSONL line that
        does not parse is yielded as a `BrokenLine` (a JSON list that does not parse raises ValueError)."""
        self._starts, self._ends = array("q"), array("q")
        with self.path.open("rb") as f:
            head = f.read(4096).lstrip()
        yield from (self._scan_list() if head.startswith(b"[") else self._scan_lines())

    @property
    def spans(self) -> tuple[array, array]:
        """Each record's first and past-the-end byte, as `scan()` found them."""
        return self._starts, self._ends

    def restore(self, starts: array, ends: array) -> None:
        """Take the spans an earlier `scan()` of the same bytes found (`spans`), instead of scanning."""
        self._starts, self._ends = starts, ends

    def load(self, index: int):
        """Record `index` parsed (a `BrokenLine` where its bytes are not JSON)."""
        with self.path.open("rb") as f:
            f.seek(self._starts[index])
            raw = f.read(self._ends[index] - self._starts[index])
        try:
            return json.loads(raw)
        except ValueError as err:
            return BrokenLine(f"record {index}", err)

    def checked(self, index: int, image_folder: Path, raw=None) -> dict:
        """`check_record` of record `index` (`raw`: the record as parsed, when at hand)."""
        return check_record(self.load(index) if raw is None else raw, image_folder, f"{self.path.name}#{index}")

    def _add(self, start: int, end: int) -> int:
        self._starts.append(start)
        self._ends.append(end)
        return len(self._starts) - 1

    def _scan_lines(self):
        offset = 0
        with self.path.open("rb") as f:
            for n, line in enumerate(f, 1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:  # (a UnicodeDecodeError too)
                    record = BrokenLine(f"line {n}", err)
                yield self._add(start, offset), record

    def _scan_list(self):
        """Elements of a JSON list one by one (`raw_decode`), their character spans turned into
        byte spans by encoding the text between them."""
        text = self.path.read_text(encoding="utf-8")
        decoder, ascii_only = json.JSONDecoder(), text.isascii()
        pos, byte, char = text.index("[") + 1, 0, 0

        def skip(i: int) -> int:
            while i < len(text) and text[i] in " \t\r\n":
                i += 1
            return i

        def to_byte(i: int) -> int:
            nonlocal byte, char
            byte, char = (i, i) if ascii_only else (byte + len(text[char:i].encode()), i)
            return byte

        try:
            pos = skip(pos)
            if text[pos : pos + 1] == "]":
                return
            while True:
                record, end = decoder.raw_decode(text, pos)
                yield self._add(to_byte(pos), to_byte(end)), record
                pos = skip(end)
                if text[pos : pos + 1] == "]":
                    return
                if text[pos : pos + 1] != ",":
                    raise json.JSONDecodeError("expected ',' or ']'", text, pos)
                pos = skip(pos + 1)
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.path}: invalid JSON ({err})") from None


def scan_records(path: str | Path, image_folder: str | Path | None = None) -> tuple[list[dict], list[BadRecord]]:
    """Read a JSON list or JSONL file in any supported format.

    Args:
        path: the data file.
        image_folder: what image paths are relative to (default: the data file's folder).

    Returns:
        (the normalised good records, one `BadRecord` per bad one).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a JSON list that does not parse (a JSONL line that does not is a bad record).
    """
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    good, bad = [], []
    for i, raw in RecordFile(path).scan():
        try:
            good.append(check_record(raw, folder, fallback_id=f"{path.name}#{i}"))
        except BadRecord as err:
            bad.append(err)
    return good, bad


def read_records(path: str | Path, image_folder: str | Path | None = None) -> list[dict]:
    """Like `scan_records`, but every record must be good: returns the normalised records.

    Raises:
        BadRecord: the first bad record, saying what is wrong with it.
        FileNotFoundError: no such file.
        ValueError: a JSON list that does not parse (a JSONL line that does not is a bad record).
    """
    good, bad = scan_records(path, image_folder)
    if bad:
        raise bad[0]
    return good


# mixtures ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One data file in a mixture; `ratio` is its relative weight."""

    path: str | Path
    ratio: float = 1.0
    image_folder: str | Path | None = None


def _draw(pool, count: int, rng: random.Random) -> list:
    """`count` items: whole shuffled passes over `pool`, then a random part of one more."""
    passes, rest = divmod(count, len(pool))
    out = []
    for _ in range(passes):
        out += rng.sample(pool, len(pool))
    return out + rng.sample(pool, rest)


def _shares(weights: list[float], size: int) -> list[int]:
    """Split `size` in proportion to `weights` (largest-remainder rounding, sums to `size`)."""
    exact = [size * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: size - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass
class Scan:
    """One source's scan: record spans (all records), then per usable record its position, measure
    and whether that is exact, the bad records by position, and how many records were read."""

    starts: array = field(default_factory=lambda: array("q"))
    ends: array = field(default_factory=lambda: array("q"))
    index: array = field(default_factory=lambda: array("q"))
    measures: array = field(default_factory=lambda: array("q"))
    exact: array = field(default_factory=lambda: array("b"))
    bad: list[tuple[int, BadRecord]] = field(default_factory=list)
    count: int = 0


PROGRESS_EVERY = 1024
"""Records read between two calls of a mixture's `on_record`."""


class DataMixture:
    """Records of several sources, interleaved deterministically (by `seed`) so that each source's
    share of the list follows its ratio. `size` defaults to the number of usable records; a source with
    fewer records than its share is repeated (in reshuffled passes), a larger one subsampled.

    Every record is read once to validate it and, with `measure`, to measure it: `measure(checked,
    reload)` is given an iterator of one source's (position, checked record) and a function
    reloading the record at a position, and yields (position, value, exact) for each, value a number
    (exact or estimated, e.g. `lengths.LengthMeasure`) or the `BadRecord` that makes the record
    unusable; a value that depends on other records than its own depends only on those at the
    positions `measure.sampled(position)` names. What fails either is left out and kept in `bad` (one
    `BadRecord` each, in file order) for the caller to report; `scanned` counts every record read and
    `on_record(n)` is told each time n more were. Only byte spans, the drawn order and the measures
    stay in memory; `mixture[i]` re-reads record i from its file. With `scans` (a `scans.ScanCache`),
    a file whose scan it holds is not read again, and a file read is stored there (read in parts by
    the processes sharing it).

    Raises:
        ValueError: no source, a negative ratio or ratios summing to zero, a file that is not
            valid JSON / JSONL, or a file without one usable record.
        FileNotFoundError: a source's file does not exist.
    """

    def __init__(self, sources, seed: int = 0, size: int | None = None, measure=None, on_record=None, scans=None):
        self.sources = [s if isinstance(s, Source) else Source(*s) for s in sources]
        self.scans = scans
        if not self.sources or any(s.ratio < 0 for s in self.sources) or not sum(s.ratio for s in self.sources):
            raise ValueError("a mixture needs at least one source and non-negative ratios with a positive sum")
        self.files = [RecordFile(s.path) for s in self.sources]
        self.bad: list[BadRecord] = []
        self.scanned = 0
        # per usable record: its source, its position there, its measure and whether that is exact
        self._source, self._index, self._measures, self._exact = array("l"), array("q"), array("q"), array("b")
        pools = [self._scan(n, measure, on_record) for n in range(len(self.sources))]
        rng = random.Random(seed)
        size = sum(len(p) for p in pools) if size is None else size
        self.counts = _shares([s.ratio for s in self.sources], size)
        self._order = array("q", [g for pool, n in zip(pools, self.counts) for g in _draw(pool, n, rng)])
        rng.shuffle(self._order)

    def _scan(self, n: int, measure, on_record) -> range:
        """Source n's records validated (and measured), from `scans` when it holds them; returns the
        ids of its usable ones."""
        source, file = self.sources[n], self.files[n]
        folder = Path(source.image_folder) if source.image_folder is not None else file.path.parent
        key = self.scans.key(file.path, folder) if self.scans else None
        scan = self.scans.load(key) if key else None
        if scan is not None:
            file.restore(scan.starts, scan.ends)
            if self._mended(file, folder, scan, measure):  # e.g. a missing image fetched since: read again
                scan = None
            elif on_record:
                on_record(scan.count)
        if scan is None:
            read = partial(self._read, n, folder, measure, on_record)
            scan = self.scans.gather(key, read) if key else read(None)
            file.restore(scan.starts, scan.ends)
        if not scan.index:
            if scan.bad and all(TOO_LONG in bad.reason for _, bad in scan.bad):  # well formed, only too long
                raise ValueError(
                    f"{source.path}: none of its {scan.count} records fits ({scan.bad[0][1].reason}): raise max_length"
                )
            reason = scan.bad[0][1].reason if scan.bad and scan.bad[0][0] == 0 else ""
            raise ValueError(unusable_file(source.path, scan.count, file.load(0) if scan.count else None, reason))
        first_good = len(self._index)
        self._source.extend(array("l", [n]) * len(scan.index))
        self._index.extend(scan.index)
        self._measures.extend(scan.measures)
        self._exact.extend(scan.exact)
        self.bad += [err for _, err in scan.bad]
        self.scanned += scan.count
        return range(first_good, len(self._index))

    @staticmethod
    def _mended(file: RecordFile, folder: Path, scan, measure) -> bool:
        """Whether a record a stored scan found bad would be usable now (the file's bytes are the
        same, but an image it names may have been fetched or repaired since)."""
        positions, checked = [], []
        for i, _ in scan.bad:
            try:
                checked.append((len(checked), file.checked(i, folder)))
            except BadRecord:
                continue
            positions.append(i)
        if not checked or measure is None:
            return bool(checked)
        reload = lambda j: file.checked(positions[j], folder)  # noqa: E731
        return any(not isinstance(value, BadRecord) for _, value, _ in measure(iter(checked), reload))

    def _read(self, n: int, folder: Path, measure, on_record, share: tuple[int, int] | None) -> Scan:
        """Read every record of source n once: its `Scan`. With `share` (part, parts), only the part's
        records (positions part, part + parts, ...) are checked and measured, and those `measure`
        learns from (`measure.sampled`), whose results are left to the part they belong to."""
        file, scan = self.files[n], Scan()
        mine = (lambda i: True) if share is None else (lambda i: i % share[1] == share[0])  # noqa: E731
        learns = getattr(measure, "sampled", None) if share is not None else None

        def checked():
            for i, raw in file.scan():
                scan.count += 1
                if on_record and scan.count % PROGRESS_EVERY == 0:
                    on_record(PROGRESS_EVERY)
                if not (mine(i) or (learns and learns(i))):
                    continue
                try:
                    yield i, file.checked(i, folder, raw)
                except BadRecord as err:
                    if mine(i):
                        scan.bad.append((i, err))
            if on_record:
                on_record(scan.count % PROGRESS_EVERY)

        results = (
            measure(checked(), lambda i: file.checked(i, folder)) if measure else ((i, 0, True) for i, _ in checked())
        )
        for i, value, exact in results:
            if not mine(i):
                continue
            if isinstance(value, BadRecord):
                scan.bad.append((i, value))
                continue
            scan.index.append(i)
            scan.measures.append(value)
            scan.exact.append(exact)
        scan.bad.sort(key=lambda b: b[0])
        scan.starts, scan.ends = file.spans
        return scan

    def __len__(self) -> int:
        return len(self._order)

    def measure(self, index: int) -> int:
        """`measure` of the record at position `index` (0 without one)."""
        return self._measures[self._order[index]]

    def exact(self, index: int) -> bool:
        """Whether that measure is exact rather than an estimate."""
        return bool(self._exact[self._order[index]])

    def __getitem__(self, index: int) -> dict:
        g = self._order[index]
        source, i = self._source[g], self._index[g]
        file = self.files[source]
        folder = self.sources[source].image_folder or file.path.parent
        return file.checked(i, folder)

    def __iter__(self):
        return (self[i] for i in range(len(self)))
