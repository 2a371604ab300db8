"""The training loop: stage 0 (before stage 1, when asked), stage 1 and stage 2 on packed records of
any supported format through `accelerate` (one process, DDP or
FSDP2: see `distributed`), with resumable atomic checkpoints that every layout writes and reads alike,
a rich progress bar, a JSONL metrics log, a loss-curve PNG and a bad-data report.

Every sample, text-only ones included, trains the multimodal path (shared_base=True): the base
itself is frozen and serves text requests untouched. The loss is the token mean over the whole
global batch (all micro-batches of all processes), so 1 process and N processes with the same
global batch take the same step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .._io import temporary, write_json
from ..data.dataset import MixtureSamples
from ..data.packing import first_fit, pack
from ..data.processor import IGNORE_INDEX, GenieBlueProcessor, Sample, save_processor_settings
from ..data.records import Source
from ..model import GenieBlueForConditionalGeneration, Strategy, load_tokenizer
from ..model.folder import MANIFEST, TRAINING, read_manifest
from ..model.placement import resolve_device
from .checkpoint import (
    check_resumable,
    footprint,
    latest_checkpoint,
    load_checkpoint,
    remove_partial,
    save_checkpoint,
    step_of,
)
from .config import TrainConfig
from .distributed import (
    Layout,
    accumulating,
    contiguous_parameters,
    fsdp2_precision,
    layout,
    machine_share,
    rank0_alone,
    shard_fsdp2,
)
from .loss import causal_lm_loss
from .optim import build_optimizer
from .vision_pretrain import pretrain_vision, sample_batches, stream_batches

FINAL = "final"
"""The trained model's folder in output_dir (`save_pretrained`), written when a run ends."""


class BadDataError(RuntimeError):
    """More records were unusable than `max_bad_fraction` allows."""


@dataclass
class PreparedData:
    samples: MixtureSamples
    bad: list[dict] = field(default_factory=list)  # {"id", "reason"}
    total: int = 0  # records the data files hold, usable or not, drawn by the ratios or not


def _check_data(cfg: TrainConfig) -> None:
    """Refuse, before any model is read, a config without data or naming a file or folder that is not there."""
    if not cfg.data:
        raise ValueError("the config names no data: add `data: [{path: train.json}]`")
    where = "(a config's data paths are relative to the config file)"
    for source in cfg.data:
        if not Path(source.path).is_file():
            raise FileNotFoundError(f"data file not found: {source.path} {where}")
        if source.image_folder is not None and not Path(source.image_folder).is_dir():
            raise FileNotFoundError(f"image folder not found: {source.image_folder} {where}")


def _check_attention(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse, before any work, an attention implementation that cannot train this config's packed rows."""
    impl = cfg.attn_implementation or ""
    if impl == "flex_attention" and device.type != "cuda":
        raise ValueError(
            f"attn_implementation flex_attention trains on a GPU only (torch has no {device.type} backward for it); "
            "use sdpa"
        )
    if "flash" in impl and cfg.batch_size > 1:  # transformers reads packing from the positions of one row only
        raise ValueError(
            f"attn_implementation {impl} keeps packed samples apart only with batch_size 1 (with more rows, they "
            "would attend to each other); set batch_size: 1 and raise grad_accum, or use flex_attention"
        )


def build_model(cfg: TrainConfig, weights: bool = True) -> GenieBlueForConditionalGeneration:
    """The model a config trains, on the CPU in float32 (master weights; accelerate places it); without
    `weights`, its structure only (a process that takes rank 0's weights: `Layout.rank0_weights`)."""
    strategy = Strategy(cfg.strategy, fraction=cfg.fraction, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
    if not cfg.init_from:
        model = GenieBlueForConditionalGeneration.from_base(
            cfg.llm, cfg.vision, strategy, downsample=cfg.vision_downsample, weights=weights
        )
    else:
        saved = Strategy(**read_manifest(cfg.init_from)["strategy"])
        folder = Path(cfg.init_from)
        another = saved.settings() != strategy.settings()
        if another:
            # a stage-1 folder (LLM delta untrained) may start any strategy's stage 2: tower and connector only
            record = folder / TRAINING
            stages = json.loads(record.read_text())["stages"] if record.is_file() else None
            if stages is None or any(s["stage"] != 1 for s in stages):
                said = lambda s: ", ".join(f"{k} {v}" for k, v in s.settings().items())  # noqa: E731
                raise ValueError(
                    f"init_from {cfg.init_from} was trained beyond stage 1 as {said(saved)}; the config asks "
                    f"{said(strategy)} (only a stage-1 folder can start another strategy or other settings of it)"
                )
        model = GenieBlueForConditionalGeneration.from_pretrained(
            folder,
            llm=cfg.llm,
            strategy=strategy if another else None,
            device="cpu",
            dtype=torch.float32,
            weights=weights,
        )
    model.set_stage(cfg.stage)
    if cfg.attn_implementation:
        model.llm.set_attn_implementation(cfg.attn_implementation)  # the block copies share its config
    return model


def prepare_data(
    cfg: TrainConfig, processor: GenieBlueProcessor, progress=None, share: tuple[int, int] = (0, 1)
) -> PreparedData:
    """Read, check and measure every record of the mixture (token counts exact or, in a large
    source, mostly estimated: see `data.lengths`; no pixel decoded: samples are encoded when a step
    asks for them); unusable ones are skipped and listed, never fatal alone. `share` (part, parts):
    this process's part of a data file read for the first time by `parts` processes together."""
    sources = [Source(d.path, d.ratio, d.image_folder) for d in cfg.data]
    task = progress.add_task("reading data", total=None, status="") if progress else None
    advance = (lambda n: progress.advance(task, n)) if progress else None  # noqa: E731
    samples = MixtureSamples.from_sources(sources, processor, cfg.seed, advance, share=share)
    if progress:
        progress.remove_task(task)
    mixture = samples.mixture
    bad = [{"id": b.record_id, "reason": b.reason} for b in mixture.bad]
    return PreparedData(samples, bad, total=mixture.scanned)  # every record read, drawn or not


def _check_writable(folder: Path) -> None:
    """A one-line ValueError now, rather than a run that trains for hours and then cannot save."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"output_dir {folder} cannot be written ({err.strerror}): choose another") from None


def _check_room(folder: Path, checkpoint: int, final: int, held: int, console: Console) -> None:
    """A one-line ValueError now where `folder` cannot hold one checkpoint (if the run writes any) and
    the final model, rather than a run that trains for hours and then cannot save; a warning where it
    cannot hold the most checkpoints the run holds at once (`held`: keep_last beside the one being
    written) and the final model."""
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    free = shutil.disk_usage(folder).free
    least = final + checkpoint * min(held, 1)
    if free < least:
        raise ValueError(
            f"output_dir {folder} has {gib(free)} free, but this run writes {gib(least)} (a checkpoint "
            f"{gib(checkpoint)}, the final model {gib(final)}): free some space or choose another output_dir"
        )
    if free < final + checkpoint * held:
        console.print(
            f"[yellow]output_dir {folder} has {gib(free)} free; {held} checkpoints at once (keep_last beside the "
            f"one being written) and the final model take up to {gib(final + checkpoint * held)}[/yellow]"
        )


def _restart_metrics(path: Path, last_step: int) -> None:
    """Keep only the log entries of steps <= `last_step`: a resumed run logs the later steps again,
    a fresh run (last_step 0) starts an empty log."""
    kept = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):  # e.g. a line cut short by a kill
                continue
    tmp = temporary(path)
    tmp.write_text("".join(kept))
    tmp.replace(path)


def _precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 autocast on a GPU that has it, and on a CPU with native bf16 matrix units (AVX512-BF16
    or AMX: matmuls ~8x faster than fp32 there); else fp32. Trained weights stay fp32 either way (the
    base's frozen projections are held in the autocast dtype: `cast_base_projections`)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else "no"


PRECISION_WORDS = {"bf16": "bf16 autocast", "fp16": "fp16 autocast", "no": "fp32"}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


@dataclass
class _Run:
    """What `Trainer._setup` hands the loop."""

    model: GenieBlueForConditionalGeneration
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    processor: GenieBlueProcessor
    data: PreparedData
    rows: list[list[int]]
    steps_per_epoch: int
    total: int
    start: int


class Trainer:
    """Runs one stage described by a `TrainConfig`; `run()` returns the final model folder.

    Args:
        cfg: the run (model, data, optimisation, output_dir).
        console: where the plan, progress and warnings go (default: stderr).
        stage0_source: an endless iterator of (PIL image, reply text) that feeds stage 0 instead of
            the stage-1 records (the demo draws freshly generated images).

    Raises:
        ValueError: an unknown device, an attention implementation that cannot train the config's
            rows, a distributed mode the trainer cannot save in (FSDP1, DeepSpeed, ...); from `run()`:
            a config without data and an output_dir that cannot be written (before any weight is
            read), an output_dir holding another run's checkpoints without `resume` or without room
            for a checkpoint and the final model, a `resume` from another model's checkpoint, data
            without usable records or too few rows for one global batch.
        FileNotFoundError: from `run()`, a data file or image folder that is not there.
        BadDataError: from `run()`, more unusable records than `max_bad_fraction` allows.
    """

    def __init__(self, cfg: TrainConfig, console: Console | None = None, stage0_source=None):
        self.cfg = cfg
        self.stage0_source = stage0_source
        self.console = console or Console(stderr=True)
        device = resolve_device(cfg.device)
        _check_attention(cfg, device)
        self.precision = precision = _precision(cfg.precision, device)
        state = AcceleratorState._shared_state
        if state and state.get("_mixed_precision") != precision and PartialState().num_processes == 1:
            # one process running stages of different precision in turn (a notebook, the tests):
            # accelerate keeps the first precision for the whole process unless its state is cleared
            AcceleratorState._reset_state()
        self.accelerator = Accelerator(
            mixed_precision=precision,
            cpu=device.type == "cpu",
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.layout: Layout = layout(self.accelerator)  # refuses what could not be saved, before any work
        self.out = Path(cfg.output_dir)
        self._epoch_order: tuple[int | None, list[int]] = (None, [])

    # data schedule ------------------------------------------------------------------------------
    def _rows(self, samples: MixtureSamples) -> list[list[int]]:
        return first_fit(samples.lengths, self.cfg.max_length)

    def _global_rows(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.accelerator.num_processes

    def _step_rows(self, rows: list[list[int]], step: int, steps_per_epoch: int) -> list[list[int]]:
        """The rows of optimizer step `step`: each epoch visits the rows in a seeded order."""
        epoch, offset = divmod(step, steps_per_epoch)
        if self._epoch_order[0] != epoch:
            order = list(range(len(rows)))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch_order = (epoch, order)
        order = self._epoch_order[1]
        g = self._global_rows()
        return [rows[i] for i in order[offset * g : (offset + 1) * g]]

    # setup, loop -------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> Path:
        """Set up (model, data, optimiser, the checkpoint to resume from), run the steps, write the
        final model; returns its folder."""
        _check_data(self.cfg)
        set_seed(self.cfg.seed)
        latest = self._claim_output(resume)
        progress = _progress(self.console) if self.accelerator.is_main_process else None
        with progress or contextlib.nullcontext():
            run = self._setup(latest, resume, progress)
            self._loop(run, progress)
        return self._finish(run)

    def _claim_output(self, resume: bool) -> Path | None:
        """The newest checkpoint in output_dir (refused unless `resume`), after clearing what a killed
        writer left half-written (checkpoint, final model, JSON) and checking the folder takes files."""
        ckpt_dir = self.out / "checkpoints"
        latest = latest_checkpoint(ckpt_dir)
        if latest and not resume:
            raise ValueError(
                f"{self.out} already holds checkpoints of a run (newest: {latest.name}): pass --resume "
                "to continue it, or choose another output_dir"
            )
        if (self.out / FINAL / MANIFEST).is_file() and not latest:  # (a resume may train on past it)
            raise ValueError(
                f"{self.out} already holds a trained model (final/) and no checkpoint to resume from: choose "
                "another output_dir, or delete it to train again"
            )
        if self.accelerator.is_main_process:
            remove_partial(self.out)
            remove_partial(ckpt_dir)
            _check_writable(self.out)
        return latest

    def _setup(self, latest: Path | None, resume: bool, progress) -> _Run:
        cfg, acc = self.cfg, self.accelerator
        weights = acc.is_main_process or not self.layout.rank0_weights  # (the others take rank 0's)
        model = build_model(cfg, weights)
        if latest and weights:  # before the data is read: a checkpoint of another model is refused at once
            check_resumable(latest, model, self.out / "train_config.json")
        processor = GenieBlueProcessor.from_model(
            model, load_tokenizer(cfg.llm), cfg.max_tiles, cfg.max_length, cfg.system_prompt
        )
        # the processes of a machine read a new data file in parts and merge them (waiting on files, not
        # on a collective that NCCL's 10-minute watchdog would cut short); a --resume reads the scans back
        data = prepare_data(cfg, processor, progress, machine_share(acc))
        self._check_bad_data(data)
        rows = self._rows(data.samples)
        steps_per_epoch = len(rows) // self._global_rows()
        if steps_per_epoch == 0:
            raise ValueError(
                f"{len(rows)} packed rows cannot fill one global batch of {self._global_rows()} rows; "
                "lower batch_size/grad_accum or max_length"
            )
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        done = step_of(latest) if latest else 0
        saves = len(range(done + cfg.save_every - done % cfg.save_every, total, cfg.save_every))
        if acc.is_main_process:  # the writer (the launcher stops the others if it stops)
            _check_room(self.out, *footprint(model), min(cfg.keep_last + 1, saves), self.console)
        if cfg.stage == 1 and cfg.stage0_steps and not latest:
            with rank0_alone(self.layout):
                if weights:
                    self._stage0(model, data.samples, processor, progress)
        if self.precision in AUTOCAST_DTYPES:  # autocast computes the frozen projections in its dtype anyway
            model.cast_base_projections(AUTOCAST_DTYPES[self.precision])
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if cfg.compile:
            model.compile_blocks()
        model.train()
        if self.layout.kind == "FSDP2":
            contiguous_parameters(model)
            if self.layout.shard_here:  # FSDP2 on CPUs, where accelerate offers none
                model = shard_fsdp2(model, self.layout.rank0_weights)
            else:
                acc.state.fsdp_plugin.mixed_precision_policy = fsdp2_precision()
        elif not weights:  # DDP: its construction sends rank 0's parameters and buffers to the others
            model.to_empty(device=acc.device)  # (where they land: on a GPU, no host memory)
            model.tie_weights()
        optimizer, scheduler = build_optimizer(model, cfg, total)
        if self.layout.shard_here:
            ddp_model, optimizer = model, acc.prepare(optimizer)
        else:
            ddp_model, optimizer = acc.prepare(model, optimizer)
        start = 0
        if latest:  # after sharding: every process loads its shards of the whole tensors saved
            start = load_checkpoint(latest, model, optimizer, scheduler)["step"]
            if acc.is_main_process:
                self.console.print(f"resuming from {latest} (step {start})")
        elif resume and acc.is_main_process:
            self.console.print(f"no checkpoint in {self.out / 'checkpoints'}: starting from step 0")
        run = _Run(model, ddp_model, optimizer, scheduler, processor, data, rows, steps_per_epoch, total, start)
        if acc.is_main_process:
            self._announce(run)
        return run

    def _announce(self, run: _Run) -> None:
        """The plan on the console, the config beside the run, metrics.jsonl cut back to `run.start`."""
        cfg, acc = self.cfg, self.accelerator
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "train_config.json", cfg.to_dict())
        n = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        device = acc.device.type.upper() if acc.device.type != "cpu" else "CPU"
        self.console.print(
            f"stage {cfg.stage} · {cfg.strategy} · {len(run.data.samples)} samples in {len(run.rows)} rows of "
            f"<= {cfg.max_length} tokens · {run.total} steps · {n / 1e6:.2f}M trainable · {self.layout} on "
            f"{device} · {PRECISION_WORDS[self.precision]}"
        )
        _restart_metrics(self.out / "metrics.jsonl", run.start)

    def _loop(self, run: _Run, progress) -> None:
        """Steps `run.start` .. `run.total`: metrics per step, a checkpoint every `save_every`."""
        cfg, acc = self.cfg, self.accelerator
        main = acc.is_main_process
        task = (
            progress.add_task(f"stage {cfg.stage}", total=run.total, completed=run.start, status="") if main else None
        )
        metrics = (self.out / "metrics.jsonl").open("a") if main else None
        known = 0  # records that failed only at a step, counted over every process
        for step in range(run.start, run.total):
            record, failed = self._step(run, step)
            if main:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                progress.update(
                    task,
                    advance=1,
                    status=f"loss {record['loss']:.4f} · lr {record['lr']:.2e} · {record['tokens_per_s']:.0f} tok/s",
                )
            try:
                if failed > known:  # (the same count on every process: all list them together)
                    known = failed
                    self._note_late_failures(run.data)
            except BadDataError as err:  # the steps so far are kept: every process saw the same failures
                self._save_checkpoint(run, step + 1)
                raise BadDataError(
                    f"{err}; the {step + 1} steps so far are kept in checkpoint step-{step + 1:07d}: fix the data "
                    "or raise max_bad_fraction, then --resume"
                ) from None
            if (step + 1) % cfg.save_every == 0 and step + 1 < run.total:
                self._save_checkpoint(run, step + 1)
        if main:
            metrics.close()

    def _save_checkpoint(self, run: _Run, step: int) -> None:
        """A checkpoint after `step` steps, written by every process together (sharded state is
        gathered by all; rank 0 writes)."""
        self.accelerator.wait_for_everyone()
        save_checkpoint(
            self.out / "checkpoints",
            run.model,
            run.optimizer,
            run.scheduler,
            step,
            {"total": run.total},
            self.cfg.keep_last,
        )

    def _step(self, run: _Run, step: int) -> tuple[dict, int]:
        """One optimizer step over this process's share of the step's rows; returns its metrics and how
        many records have failed only at a step so far (`_note_late_failures`), over every process."""
        cfg, acc = self.cfg, self.accelerator
        model, optimizer, scheduler, pad_id = run.ddp_model, run.optimizer, run.scheduler, run.processor.pad_id
        t0 = time.perf_counter()
        mine = self._step_rows(run.rows, step, run.steps_per_epoch)[acc.process_index :: acc.num_processes]
        # the step's samples, pixels and all, encoded now; one failing only now is left out (and listed)
        encoded = [[s for s in map(run.data.samples.sample, row) if s is not None] for row in mine]
        micro = [
            pack([s for row in encoded[j : j + cfg.batch_size] for s in row], cfg.max_length, pad_id)
            for j in range(0, len(encoded), cfg.batch_size)
            if any(encoded[j : j + cfg.batch_size])
        ]
        seen = sum(len(s) for row in encoded for s in row)
        # the token count of the whole global batch normalises every micro-batch's summed loss
        local = torch.tensor(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro), dtype=torch.float64)
        n_tokens = acc.reduce(local.to(acc.device), reduction="sum").item()
        if n_tokens == 0:
            raise ValueError(f"step {step}: the global batch has no assistant tokens to learn from")
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i, batch in enumerate(micro):
            batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            sync = contextlib.nullcontext() if i == len(micro) - 1 else accumulating(acc, model, self.layout)
            with sync, acc.autocast():
                loss = causal_lm_loss(model, batch, n_tokens) * acc.num_processes  # DDP averages over processes
            acc.backward(loss)
            loss_sum += loss.detach().double().cpu() / acc.num_processes
        if cfg.max_grad_norm:
            acc.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
        # the schedule's current lr for `cfg.lr` (group 0 may be a decayed ViT group)
        lr = cfg.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # the loss, and this process's records that failed at a step (in the one reduction the step has)
        local = torch.tensor([loss_sum.item(), len(run.data.samples.failed)], dtype=torch.float64)
        loss_value, failed = acc.reduce(local.to(acc.device), reduction="sum").tolist()
        elapsed = time.perf_counter() - t0
        record = {
            "step": step + 1,
            "loss": loss_value,
            "lr": lr,
            "tokens": seen * acc.num_processes,
            "tokens_per_s": seen * acc.num_processes / elapsed,
            "time_s": elapsed,
        }
        return record, int(failed)

    def _stage0(self, model: GenieBlueForConditionalGeneration, samples: list[Sample], processor, progress) -> None:
        """Stage 0 (see `vision_pretrain`) on this process's device (the model is built on the CPU);
        every process holding weights runs the same seeded steps, so ViTs agree (where only rank 0 holds
        them, `Layout.rank0_weights`, the others take its tower when the model is sharded)."""
        cfg = self.cfg
        model.to(self.accelerator.device)
        task = progress.add_task("stage 0 (vision tower)", total=cfg.stage0_steps, status="") if progress else None

        def on_step(step: int, loss: float) -> None:
            if progress:
                progress.update(task, completed=step, status=f"loss {loss:.4f}")

        if self.stage0_source is None:
            batches = sample_batches(samples, cfg.stage0_batch, cfg.seed)
        else:
            batches = stream_batches(self.stage0_source, processor, cfg.stage0_batch)
        losses = pretrain_vision(
            model,
            batches,
            cfg.stage0_steps,
            lr=cfg.stage0_lr,
            seed=cfg.seed,
            on_step=on_step,
            match=cfg.stage0_match,
            autocast=self.accelerator.autocast,
        )
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "stage0.json", {"steps": len(losses), "losses": losses})

    # bookkeeping ------------------------------------------------------------------------------
    def _check_bad_data(self, data: PreparedData) -> None:
        if not data.bad:
            return
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "bad_records.json", data.bad)
        fraction = len(data.bad) / max(1, data.total)
        if fraction > self.cfg.max_bad_fraction:
            examples = "; ".join(f"{b['id']}: {b['reason']}" for b in data.bad[:3])
            files = ", ".join(str(d.path) for d in self.cfg.data)
            raise BadDataError(
                f"{len(data.bad)} of {data.total} records ({100 * fraction:.1f}%) in {files} are unusable, above "
                f"max_bad_fraction={self.cfg.max_bad_fraction:g} (e.g. {examples}); all listed in "
                f"{self.out / 'bad_records.json'}"
            )

    def _note_late_failures(self, data: PreparedData) -> None:
        """Records that failed only when a step encoded them (pixels that do not decode) join the
        bad list and its checks, those of every process (each encodes its own rows), so that all
        decide alike: every process calls it together, when `_step` has counted a new one."""
        listed = {b["id"] for b in data.bad}
        late = [{"id": b.record_id, "reason": b.reason} for b in data.samples.failed if b.record_id not in listed]
        if self.accelerator.num_processes > 1:
            everyone = [None] * self.accelerator.num_processes
            torch.distributed.all_gather_object(everyone, late)
            late = list({b["id"]: b for part in everyone for b in part}.values())
        if late:
            data.bad += late
            self._check_bad_data(data)

    def _training_record(self, run: _Run) -> dict:
        """What the model was trained on, for its card: the stages before (from init_from) and this one.
        Tokens and final loss come from metrics.jsonl; they are None where it lacks steps (a resume into
        a folder that holds only the checkpoint)."""
        cfg, data = self.cfg, run.data
        log = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]
        whole = [r["step"] for r in log] == list(range(1, run.total + 1))
        earlier = Path(cfg.init_from or "") / TRAINING
        stage = {
            "stage": cfg.stage,
            "strategy": cfg.strategy,
            "init_from": cfg.init_from,
            "steps": run.total,
            "tokens": sum(r["tokens"] for r in log) if whole else None,
            "final_loss": log[-1]["loss"] if whole else None,
            "samples": len(data.samples),
            "bad_records": len(data.bad),
            "lr": cfg.lr,
            "max_length": cfg.max_length,
            "precision": self.precision,
            "data": [
                {"path": d.path, "ratio": d.ratio, "samples": n} for d, n in zip(cfg.data, data.samples.mixture.counts)
            ],
        }
        return {
            "stages": (json.loads(earlier.read_text())["stages"] if cfg.init_from and earlier.is_file() else [])
            + [stage]
        }

    def _finish(self, run: _Run) -> Path:
        acc, model, data = self.accelerator, run.model, run.data
        acc.wait_for_everyone()
        final = self.out / FINAL
        # every process: a sharded model is gathered by all of them; only rank 0 writes
        model.save_pretrained(final, training=self._training_record(run) if acc.is_main_process else None)
        if acc.is_main_process:
            from ..plots import loss_curve  # matplotlib: only the main process, only at the end

            save_processor_settings(final, max_tiles=self.cfg.max_tiles, system_prompt=self.cfg.system_prompt)
            loss_curve(
                self.out / "metrics.jsonl", self.out / "loss.png", f"stage {self.cfg.stage} · {self.cfg.strategy}"
            )
            if data.bad:
                self.console.print(
                    f"[yellow]skipped {len(data.bad)} of {data.total} records[/yellow] "
                    f"(ids: {', '.join(b['id'] for b in data.bad[:10])}{' ...' if len(data.bad) > 10 else ''}); "
                    f"see {self.out / 'bad_records.json'}"
                )
            self.console.print(f"saved {final} · loss curve {self.out / 'loss.png'}")
        return final
