"""Training checkpoints: the model delta, optimiser, schedule and RNG states, all in safetensors +
JSON (no pickle), written atomically and pruned to the last k, so a kill never leaves a broken one
and a resume reproduces the uninterrupted run.

A checkpoint holds whole tensors named by parameter (torch's `get_optimizer_state_dict` with
`full_state_dict`), whatever wrapped or sharded them: one written by 8 FSDP2 processes resumes on
1 process and the other way round. Every process calls `save_checkpoint` and `load_checkpoint`
together (sharded state is gathered and scattered by all of them); only rank 0 writes, and reads the
tensors back."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .._io import PARTIAL, atomic_dir, write_json, writes_files
from ..model import GenieBlueForConditionalGeneration
from ..model.folder import DELTA

STATE = "trainer_state.json"
OPTIM = "optimizer.safetensors"
MODEL = "model"
"""The subfolder holding the checkpoint's model folder (`save_pretrained`)."""


WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Whole tensors on the CPU (on rank 0 only, in a distributed run)."""


def _optimizer_tensors(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimiser state as safetensors (`PARAM_FQN/SLOT`) and JSON (param groups, plain numbers)."""
    state = get_optimizer_state_dict(model, optimizer, options=WHOLE)
    tensors, scalars = {}, {}
    for fqn, slots in state.get("state", {}).items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{fqn}/{key}"] = value.detach().contiguous()
            else:
                scalars[f"{fqn}/{key}"] = value
    return tensors, {"param_groups": state.get("param_groups", []), "scalars": scalars}


def _optimizer_state(model, optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The state dict `set_optimizer_state_dict` takes, from the files. A checkpoint of an earlier
    version numbers parameters (`INDEX.SLOT`) in the optimiser's order: they are named here."""
    groups = meta["param_groups"]
    if groups and groups[0]["params"] and isinstance(groups[0]["params"][0], int):
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]

        def rename(flat: str) -> str:  # "3.exp_avg" -> "<fqn of parameter 3>/exp_avg"
            index, key = flat.split(".", 1)
            return f"{order[int(index)]}/{key}"

        tensors = {rename(k): v for k, v in tensors.items()}
        meta = {"scalars": {rename(k): v for k, v in meta["scalars"].items()}}
        groups = [{**g, "params": [order[i] for i in g["params"]]} for g in groups]
    state: dict[str, dict] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        fqn, key = flat.rsplit("/", 1)
        state.setdefault(fqn, {})[key] = value
    return {"state": state, "param_groups": groups}


def footprint(model: GenieBlueForConditionalGeneration) -> tuple[int, int]:
    """(bytes of one checkpoint, bytes of the final model) as this model writes them: the delta in
    the dtypes it is held in, and AdamW's two moments per trained weight. Call it before sharding."""
    delta = sum(t.numel() * t.element_size() for t in model.delta_state_dict().values())
    moments = sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return delta + moments, delta


def remove_partial(folder: Path) -> list[Path]:
    """Delete what a killed writer left in `folder`: the hidden `.name.tmpPID-HOST` / `.name.oldPID-HOST`
    siblings of `atomic_dir` and `write_json`. Call it only while no other writer uses `folder`."""
    stale = [p for p in Path(folder).glob(".*") if PARTIAL.fullmatch(p.name)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def save_checkpoint(
    folder: Path, model: GenieBlueForConditionalGeneration, optimizer, scheduler, step: int, extra: dict, keep_last: int
) -> Path:
    """Write `folder/step-XXXXXXX` atomically, then remove all but the newest `keep_last`. In a
    distributed run every process calls it (the model and optimiser are gathered by all); rank 0 writes."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    target = folder / f"step-{step:07d}"
    tensors, meta = _optimizer_tensors(model, optimizer)
    if not writes_files():
        model.save_pretrained(target / MODEL)  # gathers its shards with rank 0; writes nothing here
        return target
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


def step_of(path: Path) -> int:
    """The step a checkpoint folder was written after (its name, as `save_checkpoint` gives it)."""
    return int(path.name.removeprefix("step-"))


def latest_checkpoint(folder: Path) -> Path | None:
    complete = [p for p in sorted(folder.glob("step-*")) if (p / STATE).is_file()]
    return complete[-1] if complete else None


def check_resumable(path: Path, model: GenieBlueForConditionalGeneration, config_file: Path) -> None:
    """Refuse, before any work, a checkpoint that is damaged (its state or optimiser file cut short) or
    that the model a config builds cannot continue from (another base, strategy, LoRA rank or tower):
    one line naming the difference and the way out."""
    for name, read in ((STATE, lambda f: json.loads(f.read_text())), (OPTIM, lambda f: safe_open(f, "pt").keys())):
        try:
            read(path / name)  # (the optimiser's header only)
        except (OSError, ValueError, SafetensorError) as err:
            raise ValueError(
                f"checkpoint {path} is damaged ({name}: {err}): delete it to resume from the one before it"
            ) from None
    try:
        model.check_continues(path / MODEL)
    except ValueError as err:
        wrote = f" ({config_file})" if config_file.is_file() else ""
        raise ValueError(
            f"cannot resume from {path}: {err}; resume with the config that wrote it{wrote} or start in "
            "another output_dir"
        ) from None


def load_checkpoint(path: Path, model: GenieBlueForConditionalGeneration, optimizer, scheduler) -> dict:
    """Restore model delta, optimiser, schedule and RNG onto a model and optimiser as training runs
    them (wrapped, sharded or neither); returns the trainer state (step, ...). Every process calls it;
    in a distributed run only rank 0 reads the tensors and sends them to the others one by one
    (`broadcast_from_rank0`), so a machine of 8 processes holds the checkpoint in memory once, not 8 times."""
    state = json.loads((path / STATE).read_text())
    reads = writes_files()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_available() and dist.is_initialized())
    model_state = load_file(path / MODEL / DELTA) if reads else {}
    set_model_state_dict(model, model_state, options=replace(options, strict=False))
    if reads:
        tensors = load_file(path / OPTIM)
    else:  # the others take rank 0's RNG state, as the uninterrupted run's processes had it
        with safe_open(path / OPTIM, "pt") as f:
            tensors = {"rng.torch": f.get_tensor("rng.torch")}
    torch.set_rng_state(tensors.pop("rng.torch"))
    optim = _optimizer_state(model, optimizer, tensors, state["optimizer"])
    set_optimizer_state_dict(model, optimizer, optim, options=options)
    scheduler.load_state_dict(state["scheduler"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state
