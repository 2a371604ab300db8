"""A data file's scan kept on disk: the byte span of every record, the measures of the usable ones
and the bad ones with their reasons, which is all a `DataMixture` learns by reading every record
(with images, ~100 µs a record: minutes for millions). Keyed by the file's content digest, its image
folder and what measured it (`ScanCache.measured_by`), so a resumed run or a later run on the same
data reads it back instead of every record. Images are not part of the key: a stored bad record
whose image has become usable makes the file be read again (`DataMixture`), and any other image
changed since is caught at its step, as an unreadable one is (see `dataset`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..model.fingerprint import sha256_of
from .records import BadRecord, Scan

_ARRAYS = ("starts", "ends", "index", "measures", "exact")


class ScanCache:
    """Scans in `folder`, for records measured by `measured_by` (a string naming the measure and
    everything it depends on: `lengths.measure_key`)."""

    def __init__(self, folder: str | Path, measured_by: str):
        self.folder = Path(folder)
        self.measured_by = measured_by

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
        arrays = {
            name: np.frombuffer(getattr(scan, name), dtype=np.int8 if name == "exact" else np.int64) for name in _ARRAYS
        }
        bad = json.dumps([(i, err.record_id, err.reason) for i, err in scan.bad])
        tmp = self.folder / f".{key}.tmp{os.getpid()}"
        save_file(arrays, tmp, metadata={"bad": bad, "count": str(scan.count)})
        tmp.replace(self.folder / f"{key}.safetensors")
