"""A data file's scan kept on disk: the byte span of every record, the measures of the usable ones
and the bad ones with their reasons, which is all a `DataMixture` learns by reading every record
(with images, ~100 µs a record: minutes for millions). Keyed by the file's content digest, its image
folder and what measured it (`ScanCache.measured_by`), so a resumed run or a later run on the same
data reads it back instead of every record. Images are not part of the key: a stored bad record
whose image has become usable makes the file be read again (`DataMixture`), and any other image
changed since is caught at its step, as an unreadable one is (see `dataset`).

The processes of a machine read a file not stored yet together: each checks and measures its part
of the records (every `parts`-th, plus those every estimate is fitted on), stores that part here and
merges the others' parts as they appear (`ScanCache.gather`); they wait on files, not on a collective,
so no process group's timeout limits how long a file may take."""

from __future__ import annotations

import hashlib
import json
import time
from array import array
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .._io import temporary
from ..model.fingerprint import sha256_of
from .records import BadRecord, Scan

_ARRAYS = {"starts": "int64", "ends": "int64", "index": "int64", "measures": "int64", "exact": "int8"}
"""A scan's arrays and their types: an entry per record (spans), then per usable record."""
PATIENCE, SLACK_S, POLL_S = 2.0, 60.0, 0.2
"""A part not stored `PATIENCE` times this process's own part's time plus `SLACK_S` seconds after it
(a peer slower than that, or whose cache folder is another) is read here too; polled every `POLL_S`."""


class ScanCache:
    """Scans in `folder`, for records measured by `measured_by` (a string naming the measure and
    everything it depends on: `lengths.LengthMeasure.key`), shared by `parts` processes of which this
    is number `part` (the processes of one machine, in a distributed run)."""

    def __init__(self, folder: str | Path, measured_by: str, part: int = 0, parts: int = 1):
        if not 0 <= part < parts:
            raise ValueError(f"part {part} of {parts} does not exist")
        self.folder = Path(folder)
        self.measured_by = measured_by
        self.part, self.parts = part, parts

    def key(self, path: Path, image_folder: Path) -> str:
        """The digest naming a scan of `path` (its bytes) with images under `image_folder`, measured by
        `measured_by` with this genieblue's code that checks, measures and stores records (an edited
        or upgraded genieblue reads the files anew)."""
        from . import images, lengths, processor, records

        code = [
            sha256_of(Path(m))
            for m in (images.__file__, lengths.__file__, processor.__file__, records.__file__, __file__)
        ]
        named = json.dumps([code, sha256_of(path), str(image_folder.resolve()), self.measured_by])
        return hashlib.sha256(named.encode()).hexdigest()

    def gather(self, key: str, read: Callable[[tuple[int, int] | None], Scan]) -> Scan:
        """The scan of a file that is not stored under `key`, stored there now (where the folder can be
        written): `read(None)` reads it whole; shared by several processes, `read((part, parts))`
        reads this process's part, stored beside the file's key for the others while theirs are
        awaited (a part stored by a run killed since is as good: the same key, the same part)."""
        if self.parts == 1:
            scan = read(None)
            self._store(key, scan)
            return scan
        scan = self._shared(key, read)
        for part in self.folder.glob(f"{key}.part*of{self.parts}.safetensors"):
            part.unlink(missing_ok=True)
        return scan

    def _shared(self, key: str, read) -> Scan:
        start = time.monotonic()
        own = read((self.part, self.parts))
        stored = self._store(f"{key}.part{self.part}of{self.parts}", replace(own, starts=array("q"), ends=array("q")))
        got = {self.part: own}
        # a folder this process cannot write, its peers cannot either: nothing to wait for
        deadline = time.monotonic() + (PATIENCE * (time.monotonic() - start) + SLACK_S if stored else 0)
        while len(got) < self.parts:
            whole = self.load(key)  # a peer merged first
            if whole is not None:
                return whole
            late = time.monotonic() > deadline
            for p in [p for p in range(self.parts) if p not in got]:
                part = self.load(f"{key}.part{p}of{self.parts}") or (read((p, self.parts)) if late else None)
                if part is not None:
                    got[p] = part
            if len(got) < self.parts:
                time.sleep(POLL_S)
        scan = _merged(own, [got[p] for p in range(self.parts)])
        self._store(key, scan)
        return scan

    def load(self, key: str) -> Scan | None:
        """The scan stored under `key`, or None (none stored, or unreadable: it is scanned again)."""
        from safetensors import SafetensorError, safe_open

        path = self.folder / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            with safe_open(path, "np") as f:
                meta = f.metadata()
                scan = Scan(
                    bad=[(i, BadRecord(r, why)) for i, r, why in json.loads(meta["bad"])], count=int(meta["count"])
                )
                for name in _ARRAYS:
                    getattr(scan, name).frombytes(f.get_tensor(name).tobytes())
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            return None
        return scan

    def save(self, key: str, scan: Scan) -> None:
        """Store `scan` under `key`, atomically (a reader finds it whole or not at all)."""
        import numpy as np
        from safetensors.numpy import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        arrays = {name: np.frombuffer(getattr(scan, name), dtype=dtype) for name, dtype in _ARRAYS.items()}
        bad = json.dumps([(i, err.record_id, err.reason) for i, err in scan.bad])
        path = self.folder / f"{key}.safetensors"
        save_file(arrays, temporary(path), metadata={"bad": bad, "count": str(scan.count)})
        temporary(path).replace(path)

    def _store(self, key: str, scan: Scan) -> bool:
        """`save`, or False where the folder cannot be written (the data is read again next time)."""
        try:
            self.save(key, scan)
        except OSError:
            return False
        return True


def _merged(own: Scan, parts: list[Scan]) -> Scan:
    """One scan of a file from the scans of its parts, with the spans this process's part read (a
    part is stored without them: each process reads every record's span)."""
    import numpy as np

    whole = Scan(starts=own.starts, ends=own.ends, count=own.count)
    order = np.argsort(np.concatenate([np.frombuffer(p.index, dtype=np.int64) for p in parts]), kind="stable")
    for name in ("index", "measures", "exact"):
        values = np.concatenate([np.frombuffer(getattr(p, name), dtype=_ARRAYS[name]) for p in parts])
        getattr(whole, name).frombytes(values[order].tobytes())
    whole.bad = sorted((b for p in parts for b in p.bad), key=lambda b: b[0])
    return whole
