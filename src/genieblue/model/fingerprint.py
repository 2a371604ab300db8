"""The fingerprint that ties a saved delta to the exact base weights it was trained on.

A base that comes from files (a hub id, a folder, a GGUF file) is named by the SHA-256 digests of its
weight files, so the fingerprint names the weights, not the dtype or device they were loaded in:

  * a hub download is free: the hub cache already names every LFS file by its digest (its blob);
  * a local file is hashed once and remembered by path, size and modification time in
    `cache_dir()/fingerprints.json`, so later loads hash nothing.

A model object with no files behind it is named by its tensors as loaded (`tensors_fingerprint`),
the scheme every delta saved before this one carries: such a delta is checked once against the
base's tensors in float32 (as it was saved), and the match is remembered beside the file digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .._io import write_json
from .cache import cache_dir
from .routing import base_state_dict

FILES_SCHEME = "files-sha256:"
"""Prefix of a fingerprint over weight files; one without a prefix is a `tensors_fingerprint`."""
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.gguf")
"""The files of a model folder that hold its weights (the first pattern that matches any file wins)."""
_HUB_BLOB = re.compile(r"[0-9a-f]{64}")
_CACHE_LOCK = threading.Lock()


def _cache_file() -> Path:
    return cache_dir() / "fingerprints.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _remember(entries: dict) -> None:
    """Add entries to the cache file (a lost race between processes only costs a later re-hash)."""
    with _CACHE_LOCK:
        cache = {**_read_cache(), **entries}
        try:
            _cache_file().parent.mkdir(parents=True, exist_ok=True)
            write_json(_cache_file(), cache)
        except OSError:
            pass  # a read-only cache folder: fingerprints are simply recomputed next time


def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def file_digest(path: Path, cache: dict | None = None) -> str:
    """SHA-256 of a file's bytes: the hub blob's own name, a remembered digest, or hashed now."""
    target = path.resolve()
    if target.parent.name == "blobs" and _HUB_BLOB.fullmatch(target.name):  # the hub cache's LFS files
        return target.name
    key = _file_key(path)
    if cache is not None and key in cache:
        return cache[key]
    digest = sha256_of(target)
    _remember({key: digest})
    return digest


def sha256_of(path: Path) -> str:
    """SHA-256 of a file's bytes, hashed now."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(16 * 2**20)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            h.update(view[:n])  # hashlib releases the GIL: files hash in parallel threads
    return h.hexdigest()


def weight_files(source: str | Path) -> list[Path]:
    """The weight files of a model folder or GGUF file; [] when there are none to read."""
    source = Path(source)
    if source.is_file():
        return [source]
    for pattern in WEIGHT_GLOBS:
        found = sorted(source.glob(pattern))
        if found:
            return found
    return []


def files_fingerprint(files: list[Path]) -> str:
    """`files-sha256:` + SHA-256 over the files' names and digests (hashed in parallel)."""
    cache = _read_cache()
    with ThreadPoolExecutor(max(1, min(len(files), os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda p: file_digest(p, cache), files))
    listing = "".join(f"{p.name} {d}\n" for p, d in zip(files, digests))
    return FILES_SCHEME + hashlib.sha256(listing.encode()).hexdigest()


def tensors_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer name, dtype, shape and bytes of a base model as loaded:
    the same whether or not the delta's wrappers are installed in it (see `base_state_dict`)."""
    h = hashlib.sha256()
    for name, tensor in sorted(base_state_dict(model).items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def remembered_match(files_fp: str, saved: str) -> bool:
    """Whether a tensors fingerprint `saved` (an earlier version's delta) was already found to name
    the weights whose files give `files_fp`."""
    return _read_cache().get(f"tensors:{files_fp}") == saved


def remember_match(files_fp: str, saved: str) -> None:
    _remember({f"tensors:{files_fp}": saved})
