"""How a training run is spread over processes: one process, DDP, or FSDP2 (parameters, gradients and
optimiser state sharded per decoder block). On accelerators `accelerate` shards with FSDP2 as its
config says; on CPUs, where accelerate offers no FSDP, the trainer shards with torch's own
`fully_shard` the same way (per decoder block, then the rest), with the same mixed precision
(`fsdp2_precision`), gradient accumulation (`accumulating`) and, with `cpu_ram_efficient_loading`,
weights read by rank 0 alone and sent to the others (`Layout.rank0_weights`), so a sharded run
behaves alike on both. Modes the trainer could not save in (FSDP1, DeepSpeed, Megatron-LM, XLA) are
refused before any work is done."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from ..model.routing import Switch


@dataclass(frozen=True)
class Layout:
    """`kind`: "single", "DDP" or "FSDP2"; `shard_here`: the trainer applies FSDP2 itself (on CPUs);
    `rank0_weights`: only rank 0 reads the weights, the other processes build the model's structure and
    take rank 0's weights as DDP is built (always) or as the model is sharded (FSDP2 with
    `cpu_ram_efficient_loading`), so a machine holds the model in host memory once, not once per process."""

    kind: str
    processes: int
    shard_here: bool = False
    rank0_weights: bool = False

    def __str__(self) -> str:
        if self.kind == "single":
            return "1 process"
        notes = ["torch fully_shard on CPU"] * self.shard_here + ["weights read by rank 0"] * self.rank0_weights
        where = f" ({'; '.join(notes)})" if notes else ""
        return f"{self.kind} on {self.processes} process{'es' if self.processes > 1 else ''}{where}"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def layout(acc: Accelerator) -> Layout:
    """The layout of this run, or a one-line ValueError for one the trainer cannot save in."""
    kind, n = acc.distributed_type, acc.num_processes
    if kind == DistributedType.FSDP:
        version = acc.state.fsdp_plugin.fsdp_version
    elif _env_flag("ACCELERATE_USE_FSDP"):  # asked for, on a CPU: accelerate leaves it to us
        version = int(os.environ.get("FSDP_VERSION", "1"))
    else:
        version = None
    if version is not None and version != 2:
        raise ValueError(
            f"FSDP{version} is not supported (its sharded saves are not written): set `fsdp_version: 2` in the "
            "accelerate config (as configs/accelerate/fsdp-8gpu.yaml does) or pass --fsdp_version 2"
        )
    if kind == DistributedType.FSDP:  # accelerate shards, on any number of processes
        return Layout("FSDP2", n, rank0_weights=n > 1 and acc.state.fsdp_plugin.cpu_ram_efficient_loading)
    if version == 2 and n > 1:
        return Layout("FSDP2", n, shard_here=True, rank0_weights=_env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING"))
    if kind == DistributedType.NO:
        return Layout("single", 1)
    if kind.value.startswith("MULTI_"):
        return Layout("DDP", n, rank0_weights=True)  # DDP's construction sends rank 0's weights to all
    raise ValueError(
        f"accelerate runs {kind.value}, which genieblue's trainer cannot checkpoint: use DDP (plain "
        "`accelerate launch`) or FSDP2 (configs/accelerate/fsdp-8gpu.yaml)"
    )


def machine_share(acc: Accelerator) -> tuple[int, int]:
    """(this process's number, how many) among the processes of its machine, as the launcher
    (torchrun, `accelerate launch`) names them: those that read a new data file together."""
    if acc.num_processes == 1:
        return 0, 1
    return acc.local_process_index, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def block_classes(model: nn.Module) -> set[type]:
    """The decoder-block classes FSDP2 shards by: those named in accelerate's
    FSDP_TRANSFORMER_CLS_TO_WRAP, else the LLM's own decoder blocks (copies included)."""
    layers = [m.original if isinstance(m, Switch) else m for m in model.llm.model.layers]
    named = [c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()]
    if not named:
        return {type(m) for m in layers}
    found = {type(m) for m in model.modules() if type(m).__name__ in named}
    if not found:
        raise ValueError(
            f"FSDP wraps {', '.join(named)}, which this model has none of (its blocks are "
            f"{', '.join(sorted({type(m).__name__ for m in layers}))}): pass --fsdp_transformer_layer_cls_to_wrap"
        )
    return found


def contiguous_parameters(model: nn.Module) -> None:
    """Lay every parameter out contiguously, as FSDP2 shards only such (a convolutional vision tower
    keeps channels-last weights for its CPU speed: `VisionTower.settle_layout`)."""
    for param in model.parameters():
        if not param.is_contiguous():
            param.data = param.data.contiguous()


@contextlib.contextmanager
def accumulating(acc: Accelerator, model: nn.Module, layout: Layout):
    """A micro-batch before the step's last: its gradients are kept for the last one's
    synchronisation (accelerate's `no_sync`; a model this trainer sharded itself, on CPUs, is told so
    by FSDP2's own switch, as accelerate tells one it sharded)."""
    if not layout.shard_here:
        with acc.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def rank0_alone(layout: Layout):
    """Work that rank 0 alone does where it alone holds the weights (stage 0, `Layout.rank0_weights`):
    the other processes wait for it on a gloo group of their own with a day's timeout, not at the run's
    next collective, which NCCL's watchdog would cut short after 10 minutes."""
    group = dist.new_group(backend="gloo", timeout=timedelta(days=1)) if layout.rank0_weights else None
    yield
    if group is not None:
        dist.barrier(group=group)
        dist.destroy_process_group(group)


def fsdp2_precision():
    """FSDP2's mixed precision: none of its own. Parameters are gathered in the dtypes they are held in
    (the base's frozen projections already in the autocast dtype, the trained weights in float32),
    autocast computes as under DDP, and gradients accumulate over micro-batches and are reduced in
    float32, so FSDP2 trains as DDP does. accelerate's default for `mixed_precision: bf16` gathers every
    parameter in bf16 and accumulates and reduces gradients in bf16; under it (tried on CPUs) a
    BatchNorm of the default convolutional tower meets its float32 running statistics and stops
    ("expected scalar type BFloat16 but found Float")."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy()


def _send_from_rank0(model: nn.Module, weights: dict, per_call: int = 64) -> None:
    """Rank 0's whole tensors (`weights`; {} elsewhere) sent to every rank, each keeping its shard of the
    sharded model (`broadcast_from_rank0`), `per_call` tensors at a time, rank 0 letting go of each once
    sent: on CPUs the shards are host memory beside the whole tensors, which held to the end would put
    rank 0's peak at 1.5 times the model."""
    names = [list(weights)] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(names, src=0)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    for start in range(0, len(names[0]), per_call):
        part = {name: weights.pop(name) for name in names[0][start : start + per_call] if name in weights}
        set_model_state_dict(model, part, options=options)


def shard_fsdp2(model: nn.Module, rank0_weights: bool = False) -> nn.Module:
    """FSDP2 as accelerate's plugin applies it: `fully_shard` each decoder block (the originals and
    their copies alike), then the model, which takes the rest (embeddings, vision tower, ...). With
    `rank0_weights` (see `Layout`), as the plugin does it with `cpu_ram_efficient_loading`: rank 0 holds
    the weights and the others the structure; the model is sharded on the meta device, rank 0 sends each
    tensor whole and every rank keeps its shard; buffers no state dict holds (rotary frequencies, ...)
    stay each process's own."""
    from torch.distributed.fsdp import fully_shard

    if rank0_weights:
        own = [(m, name, m._buffers[name]) for m in model.modules() for name in m._non_persistent_buffers_set]
        weights = model.state_dict() if dist.get_rank() == 0 else {}
        model.to("meta")
        model.tie_weights()  # moving to meta unties them
    classes, policy = tuple(block_classes(model)), fsdp2_precision()
    for module in list(model.modules()):
        if isinstance(module, classes):
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if rank0_weights:
        _send_from_rank0(model, weights)
        for module, name, buffer in own:
            module.register_buffer(name, buffer, persistent=False)
        model.tie_weights()  # loading the state dict unties them
    return model
