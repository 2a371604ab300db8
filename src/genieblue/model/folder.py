"""The files of a saved GenieBlue model folder (`save_pretrained`), the check that a folder is one, and
the reading of its manifest."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from .strategy import Strategy

MANIFEST = "genieblue.json"
"""The base it extends (spec, fingerprint), strategy, vision settings and parameter counts."""
DELTA = "delta.safetensors"
"""The delta's weights; the base is never written."""
TRAINING = "training.json"
"""What the model was trained on (stages, data, steps), written by the trainer."""


def check_model_folder(directory: str | Path) -> Path:
    """`directory` as a Path, or a one-line FileNotFoundError: no such folder, or the first file it lacks."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"model folder not found: {directory} (a folder that save_pretrained or training wrote)"
        )
    for needed in (MANIFEST, DELTA):
        if not (directory / needed).is_file():
            raise FileNotFoundError(
                f"{directory / needed} is missing: not a genieblue model folder (see save_pretrained)"
            )
    return directory


MANIFEST_FORMAT, MANIFEST_VERSION = "genieblue-delta", 1
"""What a manifest says it is (`format`), and the newest `version` this code reads."""
_MANIFEST_KEYS = ("base", "strategy", "vision")


def read_manifest(directory: str | Path) -> dict:
    """A model folder's manifest, or a one-line error: FileNotFoundError as `check_model_folder`;
    ValueError for a manifest that is damaged, is not one, or comes from a newer genieblue."""
    file = check_model_folder(directory) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except ValueError as err:  # (a UnicodeDecodeError too)
        raise ValueError(f"{file} is damaged ({err}): save the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{file} is not a genieblue manifest (no format {MANIFEST_FORMAT!r})")
    if manifest.get("version", 0) > MANIFEST_VERSION:
        raise ValueError(
            f"{file} is version {manifest['version']}, written by a newer genieblue (this one reads up to "
            f"{MANIFEST_VERSION}): upgrade genieblue"
        )
    newer = sorted(manifest.get("strategy", {}).keys() - {f.name for f in fields(Strategy)})
    if newer:
        raise ValueError(f"{file} names strategy settings unknown here ({', '.join(newer)}): upgrade genieblue")
    lacks = [k for k in _MANIFEST_KEYS if k not in manifest] + [
        f"base.{k}" for k in ("llm", "fingerprint") if k not in manifest.get("base", {})
    ]
    if lacks:
        raise ValueError(f"{file} is damaged: it lacks {', '.join(lacks)}: save the model again")
    return manifest
