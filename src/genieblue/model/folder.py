"""The files of a saved GenieBlue model folder (`save_pretrained`), and the check that a folder is one."""

from __future__ import annotations

from pathlib import Path

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
