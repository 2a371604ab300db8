"""Atomic writes: a folder or file appears complete under its final name, or not at all, so a kill
mid-write never leaves a broken checkpoint or model folder behind; and which process of a distributed
run writes the files all of them share (`writes_files`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())
PARTIAL = re.compile(r"\..+\.(tmp|old)\d+(-[A-Za-z0-9-]*)?")
"""The names `temporary` gives (and, without the host, what earlier versions gave)."""


def temporary(path: Path, kind: str = "tmp") -> Path:
    """The hidden sibling a writer fills before its atomic rename to `path` (`kind` "old": where the
    replaced one goes meanwhile), named by host and process: no two writers share one, also in a
    cache folder the machines of a cluster share (where process ids repeat across machines)."""
    return path.with_name(f".{path.name}.{kind}{os.getpid()}-{_HOST}")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike):
    """Yield a temporary sibling folder; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = temporary(target, "old")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def writes_files() -> bool:
    """Whether this process writes shared files: the only process, or rank 0 of a distributed run."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = temporary(path)
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: str | os.PathLike, data) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
