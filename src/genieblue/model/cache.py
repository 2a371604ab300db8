"""Where genieblue keeps what it derives from base models: GGUF files converted to transformers
folders (`sources`) and the digests of weight files (`fingerprint`)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """GENIEBLUE_CACHE, else ~/.cache/genieblue."""
    return Path(os.environ.get("GENIEBLUE_CACHE", Path.home() / ".cache" / "genieblue"))
