"""Training checkpoints: the model delta, optimiser, schedule and RNG states, all in safetensors +
JSON (no pickle), written atomically and pruned to the last k, so a kill never leaves a broken one
and a resume reproduces the uninterrupted run."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_dir, write_json
from ..model import GenieBlueForConditionalGeneration
from ..model.folder import DELTA

STATE = "trainer_state.json"
_PARTIAL = re.compile(r"\..+\.(tmp|old)\d+")
OPTIM = "optimizer.safetensors"
MODEL = "model"
"""The subfolder holding the checkpoint's model folder (`save_pretrained`)."""


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def remove_partial(folder: Path) -> list[Path]:
    """Delete what a killed writer left in `folder`: the hidden `.name.tmpPID` / `.name.oldPID`
    siblings of `atomic_dir` and `write_json`. Call it only while no other writer uses `folder`."""
    stale = [p for p in Path(folder).glob(".*") if _PARTIAL.fullmatch(p.name)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def save_checkpoint(
    folder: Path, model: GenieBlueForConditionalGeneration, optimizer, scheduler, step: int, extra: dict, keep_last: int
) -> Path:
    """Write `folder/step-XXXXXXX` atomically, then remove all but the newest `keep_last`."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    target = folder / f"step-{step:07d}"
    tensors, meta = _optimizer_tensors(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp / MODEL)
        save_file(tensors, tmp / OPTIM)
        write_json(
            tmp / STATE,
            {
                "step": step,
                "optimizer": meta,
                "scheduler": scheduler.state_dict(),
                "python_rng": random.getstate(),
                **extra,
            },
        )
    for old in sorted(folder.glob("step-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(folder: Path) -> Path | None:
    complete = [p for p in sorted(folder.glob("step-*")) if (p / STATE).is_file()]
    return complete[-1] if complete else None


def load_checkpoint(path: Path, model: GenieBlueForConditionalGeneration, optimizer, scheduler) -> dict:
    """Restore model delta, optimiser, schedule and RNG; returns the trainer state (step, ...)."""
    state = json.loads((path / STATE).read_text())
    delta = load_file(path / MODEL / DELTA)
    model.load_state_dict(delta, strict=False)
    tensors = load_file(path / OPTIM)
    torch.set_rng_state(tensors.pop("rng.torch"))
    _load_optimizer(optimizer, tensors, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state
