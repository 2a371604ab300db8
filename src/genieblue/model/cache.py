"""Where genieblue keeps what it derives from files once: GGUF files converted to transformers
folders (`sources`), the digests of weight files (`fingerprint`) and the scans of training data
files (`genieblue.data.scans`)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """GENIEBLUE_CACHE, else ~/.cache/genieblue."""
    return Path(os.environ.get("GENIEBLUE_CACHE", Path.home() / ".cache" / "genieblue"))
