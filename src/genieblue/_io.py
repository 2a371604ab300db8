"""Atomic writes: a folder or file appears complete under its final name, or not at all, so a kill
mid-write never leaves a broken checkpoint or model folder behind; and which process of a distributed
run writes the files all of them share (`writes_files`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike):
    """Yield a temporary sibling folder; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old{os.getpid()}")
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
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: str | os.PathLike, data) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
