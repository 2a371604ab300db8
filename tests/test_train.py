"""The training room end to end on a 4-block random Llama (real SmolLM2 tokenizer) and a 2-block
SigLIP at 32 px: exact resume after a real SIGKILL, atomic checkpoints, 2-process DDP on CPU (gloo)
equal to 1 process with the same global batch, the FSDP status on CPU, the bad-data report and
error, the loss against transformers' own, the ViT layer-wise learning-rate decay, and a real
learning signal.

Every run uses one thread (OMP_NUM_THREADS=1 in subprocesses, torch.set_num_threads(1) in this
one), so CPU float results of different processes can be compared bit for bit."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from accelerate.utils import set_seed
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from conftest import TINY_RESNET, TINY_SIGLIP
from genieblue._io import atomic_dir, write_json
from genieblue.cli import app
from genieblue.data import GenieBlueProcessor, image_to_tensor, pack, read_records
from genieblue.model import GenieBlueForConditionalGeneration, load_tokenizer
from genieblue.train import BadDataError, TrainConfig, Trainer
from genieblue.train import checkpoint as checkpoint_module
from genieblue.train import trainer as trainer_module
from genieblue.train.checkpoint import latest_checkpoint, load_checkpoint, remove_partial, save_checkpoint
from genieblue.train.loss import causal_lm_loss
from genieblue.train.optim import build_optimizer, param_groups
from genieblue.train.trainer import build_model
from genieblue.train.vision_pretrain import (
    caption_loss,
    common_tokens,
    cyclic_targets,
    informative_tokens,
    pretrain_vision,
    sample_batches,
    stream_batches,
)

PARTIAL = re.compile(r"\.(tmp|old)\d*$")  # what atomic_dir / write_json leave behind when killed


pytestmark = pytest.mark.usefixtures("one_thread")


def _env(cpu: bool = False) -> dict:
    """One thread, wide console lines; `cpu` hides GPUs (several processes on one machine's CPU)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "COLUMNS": "300",
    }
    return {**env, "CUDA_VISIBLE_DEVICES": ""} if cpu else env


def _config(tmp_path: Path, synth_data, name: str = "cfg.yaml", **fields) -> Path:
    """A YAML config in tmp_path; its data paths are relative to the YAML file."""
    rel = lambda key: os.path.relpath(synth_data[key], tmp_path)  # noqa: E731
    raw = {
        "llm": str(fields.pop("llm")),
        "vision": TINY_SIGLIP,
        "data": [{"path": rel("train"), "ratio": 0.8}, {"path": rel("text"), "ratio": 0.2}],
        "max_length": 256,
        "batch_size": 2,
        "grad_accum": 1,
        "lr": 1e-3,
        "precision": "no",
        "save_every": 100,
        **fields,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _processor(llm: str) -> GenieBlueProcessor:
    model = GenieBlueForConditionalGeneration.from_base(llm, TINY_SIGLIP)
    return GenieBlueProcessor.from_model(model, load_tokenizer(llm), max_length=4096)


def _train_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "genieblue.cli", "train", "--config", str(config), *extra]


def _losses(run: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; the last entry per step wins."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


def _delta(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "delta.safetensors")


def _partial_files(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if PARTIAL.search(p.name)]


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*"))


# 1. exact resume after a real kill -----------------------------------------------------------------
@pytest.mark.integration
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, chat_base, synth_data):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    config = _config(
        tmp_path, synth_data, llm=chat_base, max_steps=10, save_every=2, keep_last=2, output_dir=str(killed)
    )
    step4 = killed / "checkpoints" / "step-0000004" / "trainer_state.json"

    log = tmp_path / "killed.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(_train_cmd(config), env=_env(), stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 120
            while not step4.is_file():
                if proc.poll() is not None:
                    pytest.fail(f"training exited ({proc.returncode}) before step 4:\n{log.read_text()[-3000:]}")
                assert time.monotonic() < deadline, "no checkpoint at step 4 within 120 s"
                time.sleep(0.01)
            assert proc.poll() is None, "the run finished before it could be killed"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists()
    killed_steps = _losses(killed)
    assert 4 <= max(killed_steps) < 10
    # a kill in the middle of a checkpoint or final-model write leaves such hidden folders behind
    for leftover in (killed / "checkpoints" / ".step-0000006.tmp99999", killed / ".final.tmp99999"):
        leftover.mkdir(parents=True)
        (leftover / "delta.safetensors").write_bytes(b"half a file")

    start = latest_checkpoint(killed / "checkpoints")
    assert start.name >= "step-0000004"
    # the same command with --resume (through the CLI, in this process: one thread like the subprocess)
    resumed = CliRunner().invoke(app, ["train", "--config", str(config), "--resume"])
    assert resumed.exit_code == 0, (resumed.output, resumed.exception)
    assert "resuming from" in resumed.output

    # the uninterrupted run
    Trainer(TrainConfig.from_yaml(config, output_dir=str(reference))).run()

    # CPU kernels are deterministic at a fixed thread count, so on CPU losses and weights are
    # compared bit for bit (exactly); CUDA backward kernels use atomics, hence a tolerance there
    exact = not torch.cuda.is_available()
    expected, got = _losses(reference), _losses(killed)
    assert sorted(expected) == sorted(got) == list(range(1, 11))
    if exact:
        assert got == expected
    else:
        assert got == pytest.approx(expected, rel=1e-5)
    ref_delta, got_delta = _delta(reference), _delta(killed)
    assert ref_delta.keys() == got_delta.keys()
    for name, tensor in ref_delta.items():
        if exact:
            assert torch.equal(tensor, got_delta[name]), name
        else:
            torch.testing.assert_close(got_delta[name], tensor, rtol=0, atol=1e-5)
    step6 = load_file(killed / "checkpoints" / "step-0000006" / "model" / "delta.safetensors")
    assert any(not torch.equal(t, got_delta[n]) for n, t in step6.items())  # the last steps still trained
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 10  # the resume dropped steps after it
    for run in (killed, reference):
        assert _partial_files(run) == []
        assert _steps(run) == ["step-0000006", "step-0000008"]  # keep_last=2 (step 10 is the final model)

    # a checkpoint at the last step, copied into a folder of its own (no metrics.jsonl): the resume
    # has no step left to train and writes it as the final model; its card says what the log lost
    last = tmp_path / "last"
    _resume_from(killed, "step-0000008", last)
    Trainer(TrainConfig.from_yaml(config, output_dir=str(last), max_steps=8)).run(resume=True)
    step8 = load_file(killed / "checkpoints" / "step-0000008" / "model" / "delta.safetensors")
    assert step8.keys() == _delta(last).keys() and all(torch.equal(t, _delta(last)[n]) for n, t in step8.items())
    assert "8 steps" in (last / "final" / "README.md").read_text()
    assert "final loss unknown" in (last / "final" / "README.md").read_text()


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, chat_base, synth_data):
    """A --resume whose config builds another model than its checkpoint's (strategy, LoRA rank, a base
    with one weight changed) is refused in one line naming the difference, before its first step; the
    checkpoint is kept and the config that wrote it resumes."""
    out = tmp_path / "run"
    config = _config(tmp_path, synth_data, llm=chat_base, max_steps=2, save_every=1, output_dir=str(out))
    Trainer(TrainConfig.from_yaml(config)).run()
    other = tmp_path / "other-base"
    shutil.copytree(chat_base, other)
    tensors = load_file(other / "model.safetensors")
    tensors["model.norm.weight"][0] += 1e-3
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    for overrides, words in (
        ({"strategy": "lora"}, "does not fit this model: missing"),
        ({"lora_rank": 4}, "does not fit this model: other shapes"),
        ({"llm": str(other)}, "was trained on another base LLM"),
    ):
        with pytest.raises(ValueError) as refused:
            Trainer(TrainConfig.from_yaml(config, **overrides)).run(resume=True)
        message = str(refused.value)
        assert message.startswith(f"cannot resume from {out / 'checkpoints' / 'step-0000001'}: ") and words in message
        assert "resume with the config that wrote it" in message and "\n" not in message
    assert _steps(out) == ["step-0000001"] and json.loads((out / "train_config.json").read_text())["lora_rank"] == 8
    step = out / "checkpoints" / "step-0000001"
    for name, words in (("optimizer.safetensors", "header"), ("trainer_state.json", "Unterminated string")):
        kept = (step / name).read_bytes()
        (step / name).write_bytes(kept[:20])  # a copy cut short
        damaged = f"checkpoint {step} is damaged \\({name}: .*{words}.*\\): delete it to resume"
        with pytest.raises(ValueError, match=damaged):
            Trainer(TrainConfig.from_yaml(config)).run(resume=True)
        (step / name).write_bytes(kept)
    Trainer(TrainConfig.from_yaml(config)).run(resume=True)


def test_a_run_its_output_dir_could_not_hold_is_refused_before_its_first_step(
    tmp_path, chat_base, synth_data, monkeypatch
):
    """What a run writes is known before its first step: the estimate is a real checkpoint's and final
    model's tensors to within their headers; an output_dir with less room than one checkpoint and the
    final model is refused in one line, before any step; one short of every checkpoint kept warns."""
    config = _config(tmp_path, synth_data, llm=chat_base, max_steps=2, save_every=1, output_dir=str(tmp_path / "a"))
    cfg = TrainConfig.from_yaml(config)
    Trainer(cfg).run()
    checkpoint, final = checkpoint_module.footprint(build_model(cfg))
    written = lambda folder: sum(f.stat().st_size for f in folder.rglob("*.safetensors"))  # noqa: E731
    for estimate, folder in (
        (checkpoint, tmp_path / "a" / "checkpoints" / "step-0000001"),
        (final, tmp_path / "a" / "final"),
    ):
        assert estimate <= written(folder) < estimate + 2**17, folder  # headers, step counts, RNG state

    def free(n):
        monkeypatch.setattr(trainer_module.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(2**40, 0, n))

    free(checkpoint + final - 1)
    with pytest.raises(ValueError) as refused:
        Trainer(TrainConfig.from_yaml(config, output_dir=str(tmp_path / "b"))).run()
    assert re.fullmatch(
        r"output_dir \S+ has [\d.]+ GiB free, but this run writes [\d.]+ GiB \(a checkpoint .*\): "
        r"free some space or choose another output_dir",
        str(refused.value),
    )
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
    free(checkpoint + final)  # room for one checkpoint, not for the second written beside it (keep_last=2)
    console = Console(file=io.StringIO(), width=300)
    Trainer(TrainConfig.from_yaml(config, output_dir=str(tmp_path / "c"), max_steps=3), console).run()
    assert "2 checkpoints at once (keep_last beside the one being written) and the final model take up to" in (
        console.file.getvalue()
    )
    assert _steps(tmp_path / "c") == ["step-0000001", "step-0000002"]


def test_fresh_run_refuses_an_output_dir_with_checkpoints(tmp_path, chat_base, synth_data):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-0000002").mkdir(parents=True)
    (out / "checkpoints" / "step-0000002" / "trainer_state.json").write_text('{"step": 2}')
    cfg = TrainConfig.from_yaml(_config(tmp_path, synth_data, llm=chat_base, output_dir=str(out)))
    with pytest.raises(ValueError, match="--resume"):
        Trainer(cfg).run()
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        TrainConfig(keep_last=0)
    # a finished run with no checkpoint (save_every past max_steps): its model is not trained over
    shutil.rmtree(out / "checkpoints")
    (out / "final").mkdir()
    (out / "final" / "genieblue.json").write_text("{}")
    for resume in (False, True):
        with pytest.raises(ValueError, match="already holds a trained model \\(final/\\) and no checkpoint"):
            Trainer(cfg).run(resume=resume)
    assert (out / "final" / "genieblue.json").read_text() == "{}"


# 2. atomic checkpoints -----------------------------------------------------------------------------
def _one_step(model, optimizer, scheduler):
    loss = sum((p * p).sum() for g in optimizer.param_groups for p in g["params"])
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, chat_base, monkeypatch):
    cfg = TrainConfig(llm=chat_base, vision=TINY_SIGLIP, lr=1e-3)
    model = build_model(cfg)
    optimizer, scheduler = build_optimizer(model, cfg, 10)
    _one_step(model, optimizer, scheduler)
    folder = tmp_path / "checkpoints"
    first = save_checkpoint(folder, model, optimizer, scheduler, 2, {"total": 10}, keep_last=2)
    files = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    saved_state = {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()}
    saved_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
    assert {str(p) for p in files} >= {"trainer_state.json", "optimizer.safetensors", "model/delta.safetensors"}

    _one_step(model, optimizer, scheduler)

    def disk_full(*args, **kwargs):  # the optimiser file fails after the model folder was written
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(folder, model, optimizer, scheduler, 4, {"total": 10}, keep_last=2)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000002"]  # no step-4, no hidden partial
    assert {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()} == files
    assert latest_checkpoint(folder) == first

    # the intact checkpoint restores model, optimiser and schedule exactly
    fresh = build_model(cfg)
    opt2, sched2 = build_optimizer(fresh, cfg, 10)
    assert load_checkpoint(first, fresh, opt2, sched2)["step"] == 2
    saved = load_file(first / "model" / "delta.safetensors")
    assert all(torch.equal(v, fresh.delta_state_dict()[k]) for k, v in saved.items())
    assert sched2.state_dict()["last_epoch"] == 1
    state2 = opt2.state_dict()
    assert state2["state"].keys() == saved_state.keys()
    for i, slots in saved_state.items():
        assert all(torch.equal(v, state2["state"][i][k]) for k, v in slots.items()), i
    assert [{k: v for k, v in g.items() if k != "params"} for g in state2["param_groups"]] == [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in saved_groups
    ]


def test_atomic_dir_on_interrupt_and_stale_partials(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    for interrupt in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(interrupt)):
            with atomic_dir(target) as tmp:
                (tmp / "weights").write_text("v2, half written")
                raise interrupt
        assert (target / "weights").read_text() == "v1"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    # what a SIGKILL leaves (it skips the cleanup above) goes at the next start; other files stay
    # (named by process and host, or by process alone as earlier versions named them)
    (tmp_path / ".step-0000004.tmp4242-gpu-node-7").mkdir()
    (tmp_path / ".final.old4242").mkdir()
    (tmp_path / ".metrics.jsonl.tmp4242").write_text("{")
    (tmp_path / ".gitignore").write_text("*")
    removed = remove_partial(tmp_path)
    assert len(removed) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gitignore", "model"]


# 3. several processes ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_beside_one_process(cmd: list[str], tmp_path: Path, synth_data, config: dict, one: Path) -> str:
    """Run `cmd` (2 CPU processes with batch_size 1) and the same global batch in one CPU process
    (batch_size 2) into `one`: in this process, or beside `cmd` in another one where this process
    would train on a GPU. Returns cmd's stderr."""
    single = _config(tmp_path, synth_data, "one.yaml", **dict(config, batch_size=2, output_dir=str(one)))
    reference = None
    if torch.cuda.is_available():
        reference = subprocess.Popen(
            _train_cmd(single), env=_env(cpu=True), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    done = subprocess.run(cmd, env=_env(cpu=True), capture_output=True, text=True, timeout=300)
    if reference is None:
        Trainer(TrainConfig.from_yaml(single)).run()
    else:
        _, reference_err = reference.communicate(timeout=300)
        assert reference.returncode == 0, reference_err[-3000:]
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def _assert_same_training(one: Path, several: Path, steps: int) -> None:
    expected, got = _losses(one), _losses(several)
    assert sorted(got) == sorted(expected) == list(range(1, steps + 1))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-6, abs=1e-6), step
    ref, dist = _delta(one), _delta(several)
    assert ref.keys() == dist.keys()
    for name in ref:
        torch.testing.assert_close(dist[name], ref[name], rtol=0, atol=1e-5, msg=name)


def _torchrun_two(config: Path) -> list[str]:
    """`genieblue train` in 2 processes under torch's launcher: DDP (over gloo on CPUs)."""
    cli = ["-m", "genieblue.cli", "train", "--config", str(config)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cli]


@pytest.mark.integration
def test_ddp_two_cpu_processes_equal_one_process(tmp_path, chat_base, synth_data):
    two, one = tmp_path / "ddp2", tmp_path / "ddp1"
    fields = dict(llm=chat_base, batch_size=1, grad_accum=2, max_steps=3, save_every=2)
    config = _config(tmp_path, synth_data, **fields, output_dir=str(two))
    stderr = _run_beside_one_process(_torchrun_two(config), tmp_path, synth_data, fields, one)
    assert "DDP on 2 processes (weights read by rank 0) on CPU · fp32" in " ".join(stderr.split())  # over gloo
    _assert_same_training(one, two, 3)
    step2 = load_file(two / "checkpoints" / "step-0000002" / "model" / "delta.safetensors")
    assert any(not torch.equal(t, _delta(two)[n]) for n, t in step2.items())  # a checkpoint written under DDP


def _late_data(tmp_path: Path, synth_data) -> Path:
    """tmp_path/late.json: 12 good records and "late", whose image's header reads but whose pixels,
    cut short, do not decode (found only when a step encodes it)."""
    good = json.loads(Path(synth_data["train"]).read_text())[:12]
    for record in good:
        record["image"] = str(Path(synth_data["train"]).parent / record["image"])
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(good[0]["image"]).read_bytes()[:-40])
    late = {"id": "late", "image": str(truncated), "conversations": good[0]["conversations"]}
    write_json(tmp_path / "late.json", [*good, late])
    return tmp_path / "late.json"


@pytest.mark.integration
def test_a_record_that_fails_at_a_step_on_one_process_stops_both(tmp_path, chat_base, synth_data):
    """Each process encodes its own rows, so only one meets an image whose pixels do not decode: both
    list it and stop together (the other would wait at its next collective for ever), after a
    checkpoint of the steps so far."""
    _late_data(tmp_path, synth_data)
    out = tmp_path / "run"
    fields = dict(llm=chat_base, batch_size=1, max_steps=6, save_every=100, max_bad_fraction=0.01)
    config = _config(tmp_path, synth_data, **fields, output_dir=str(out), data=[{"path": "late.json"}])
    done = subprocess.run(_torchrun_two(config), env=_env(cpu=True), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "steps so far are kept in checkpoint step-" in done.stderr, done.stderr[-3000:]
    assert [r["id"] for r in json.loads((out / "bad_records.json").read_text())] == ["late"]
    assert len(list((out / "checkpoints").glob("step-*/trainer_state.json"))) == 1


def _accelerate_launch_fsdp(*args: str, processes: int = 2, precision: str = "no") -> list[str]:
    """`accelerate launch` as the shipped FSDP config asks (FSDP2, one unit per decoder block), on CPUs:
    accelerate leaves FSDP to the trainer there, which shards with torch's own fully_shard."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--use_fsdp",
        "--fsdp_version",
        "2",
        "--fsdp_transformer_layer_cls_to_wrap",
        "LlamaDecoderLayer",
        # the default (true) stops at once without an accelerator: FullyShardedDataParallelPlugin
        # raises "RuntimeError: There are currently no available devices found, must be one of
        # 'XPU', 'CUDA', 'MLU', 'NPU', 'MUSA', or 'HPU'." (accelerate 1.15)
        "--fsdp_sync_module_states",
        "false",
        "--fsdp_cpu_ram_efficient_loading",  # (the launcher's default too): rank 0 alone reads the weights
        "true",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        precision,
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        *args,
    ]


def _train_fsdp(config: Path, *extra: str, processes: int = 2) -> str:
    done = subprocess.run(
        _accelerate_launch_fsdp("-m", "genieblue.cli", "train", "--config", str(config), *extra, processes=processes),
        env=_env(cpu=True),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def _resume_from(run: Path, step: str, into: Path) -> None:
    """`into` holds only `run`'s checkpoint `step`, as a run killed after writing it would."""
    (into / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / step, into / "checkpoints" / step)


@pytest.mark.integration
def test_fsdp2_two_cpu_processes_save_resume_and_load(tmp_path, chat_base, synth_data):
    """FSDP2 over 2 gloo processes, sharded per decoder block: it trains as 1 process does, writes its
    checkpoint and final model (the whole delta once), `--resume` from its checkpoint continues as
    the uninterrupted run, on 2 processes and on 1, and the saved delta loads with from_pretrained."""
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    fields = dict(llm=chat_base, batch_size=1, grad_accum=2, max_steps=3, save_every=2, gradient_checkpointing=True)
    config = _config(tmp_path, synth_data, **fields, output_dir=str(fsdp))
    cmd = _accelerate_launch_fsdp("-m", "genieblue.cli", "train", "--config", str(config))
    stderr = _run_beside_one_process(cmd, tmp_path, synth_data, fields, one)
    header = "FSDP2 on 2 processes (torch fully_shard on CPU; weights read by rank 0) on CPU · fp32"
    assert header in " ".join(stderr.split())
    _assert_same_training(one, fsdp, 3)
    assert _steps(fsdp) == ["step-0000002"] and not _partial_files(fsdp)
    saved = _delta(fsdp)
    loaded = GenieBlueForConditionalGeneration.from_pretrained(fsdp / "final", device="cpu").delta_state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)

    # the sharded checkpoint resumes sharded, unsharded, and under DDP (where rank 0 alone reads it
    # and sends every tensor to the other process)
    for how, processes in (("fsdp", 2), ("fsdp", 1), ("ddp", 2)):
        resumed = tmp_path / f"resumed-{how}{processes}"
        _resume_from(fsdp, "step-0000002", resumed)
        same_batch = dict(fields, batch_size=2 // processes)  # the same global batch of rows
        resumed_config = _config(
            tmp_path, synth_data, f"resume-{how}{processes}.yaml", **same_batch, output_dir=str(resumed)
        )
        if how == "fsdp":
            err = _train_fsdp(resumed_config, "--resume", processes=processes)
        else:
            done = subprocess.run(
                [*_torchrun_two(resumed_config), "--resume"],
                env=_env(cpu=True),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr[-4000:]
            err = done.stderr
        assert "resuming from" in err and "step 2" in err
        assert _losses(resumed)[3] == pytest.approx(_losses(fsdp)[3], rel=1e-6, abs=1e-6)
        again = _delta(resumed)
        for name in saved:
            torch.testing.assert_close(again[name], saved[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.integration
def test_ddp_and_fsdp2_train_alike_with_the_base_projections_held_in_bf16(tmp_path, chat_base, synth_data):
    """Under bf16 autocast the trainer holds the base's projections in bf16 beside float32 trained
    weights: DDP's broadcast and FSDP2's all-gather of those mixed dtypes (2 gloo processes) take them,
    and both train (with gradient checkpointing) and save the same losses and delta; with a
    convolutional tower (the default's kind: channels-last weights, which FSDP2 cannot shard as such,
    and BatchNorms, which stop under accelerate's own FSDP2 precision: `fsdp2_precision`)."""
    runs = {}
    for kind in ("ddp", "fsdp2"):
        out = tmp_path / kind
        fields = dict(llm=chat_base, batch_size=1, grad_accum=2, max_steps=2, gradient_checkpointing=True)
        fields["vision"] = TINY_RESNET
        config = _config(tmp_path, synth_data, f"{kind}.yaml", **fields, precision="bf16", output_dir=str(out))
        cli = ("-m", "genieblue.cli", "train", "--config", str(config))
        cmd = _torchrun_two(config) if kind == "ddp" else _accelerate_launch_fsdp(*cli, precision="bf16")
        done = subprocess.run(cmd, env=_env(cpu=True), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        assert "on 2 processes" in done.stderr and "bf16 autocast" in " ".join(done.stderr.split())
        runs[kind] = (_losses(out), _delta(out))
    (ddp_losses, ddp_delta), (fsdp_losses, fsdp_delta) = runs["ddp"], runs["fsdp2"]
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-6) and len(ddp_losses) == 2
    floats = {t.dtype for t in ddp_delta.values() if t.is_floating_point()}  # (and BatchNorm's int64 counts)
    assert fsdp_delta.keys() == ddp_delta.keys() and floats == {torch.float32}
    for name, tensor in ddp_delta.items():
        torch.testing.assert_close(fsdp_delta[name], tensor, rtol=0, atol=1e-6, msg=name)


def _tied_base(chat_base: str, folder: Path) -> str:
    """chat_base with its output embeddings tied to its input ones, as SmolLM2's and Qwen2.5-3B's are."""
    config = AutoConfig.from_pretrained(chat_base)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(chat_base).save_pretrained(folder)
    return str(folder)


@pytest.mark.integration
def test_the_weights_read_by_rank_0_alone_train_as_when_every_rank_reads_them(tmp_path, chat_base, synth_data):
    """Under DDP, and under FSDP2 with `cpu_ram_efficient_loading` (as accelerate's launcher passes the
    shipped config's settings, which it refuses on CPUs), rank 0 alone reads the base, the tower and
    the init_from folder and runs stage 0; the other process builds the structure only (parameters on
    the meta device) and takes rank 0's weights as DDP is built or the model sharded. A stage 1 with
    stage 0 and a convolutional tower (BatchNorm statistics: buffers a state dict holds; rotary
    frequencies: ones it does not), then a stage 2 from it, train as under FSDP2 with every process
    reading the weights and running stage 0 itself."""
    common = dict(llm=_tied_base(chat_base, tmp_path / "base"), vision=TINY_RESNET, batch_size=1, grad_accum=2)
    common["max_steps"] = 2
    stages = {
        "s1": dict(common, stage=1, stage0_steps=2, stage0_batch=8),
        "s2": dict(common, init_from=str(tmp_path / "s1-every" / "final")),
    }
    fsdp2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"}
    runs = {
        "every": (
            {**fsdp2, "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"},
            "FSDP2 on 2 processes (torch fully_shard on CPU)",
        ),
        "rank0": (
            {**fsdp2, "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"},
            "FSDP2 on 2 processes (torch fully_shard on CPU; weights read by rank 0)",
        ),
        "ddp": ({}, "DDP on 2 processes (weights read by rank 0)"),
    }
    for name, fields in stages.items():
        for who, (env, layout) in runs.items():
            config = _config(
                tmp_path, synth_data, f"{name}-{who}.yaml", **fields, output_dir=str(tmp_path / f"{name}-{who}")
            )
            done = subprocess.run(
                _torchrun_two(config), env={**_env(cpu=True), **env}, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, done.stderr[-4000:]
            assert f"{layout} on CPU" in " ".join(done.stderr.split())
        for who in ("rank0", "ddp"):
            _assert_same_training(tmp_path / f"{name}-every", tmp_path / f"{name}-{who}", 2)
    assert json.loads((tmp_path / "s1-rank0" / "stage0.json").read_text())["steps"] == 2


ACCELERATE_PREPARATION = """
import json, sys, types, torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin, fsdp2_prepare_model
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from genieblue import GenieBlueForConditionalGeneration
from genieblue.train.distributed import contiguous_parameters, fsdp2_precision

base, vision, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
acc = Accelerator(cpu=True)
rank = acc.process_index
model = GenieBlueForConditionalGeneration.from_base(base, vision, weights=rank == 0)
model.cast_base_projections(torch.bfloat16)  # as the trainer holds them under bf16 autocast
contiguous_parameters(model)
built_on = sorted({p.device.type for p in model.parameters()})
read = {k: v.clone() for k, v in model.state_dict().items()}
plugin = FullyShardedDataParallelPlugin(
    fsdp_version=2, cpu_ram_efficient_loading=True, auto_wrap_policy="transformer_based_wrap",
    transformer_cls_names_to_wrap=["LlamaDecoderLayer"], mixed_precision_policy=fsdp2_precision(),
)
accelerator = types.SimpleNamespace(  # what fsdp2_prepare_model reads of the Accelerator calling it on a GPU
    state=types.SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, is_main_process=rank == 0,
    device=acc.device, mixed_precision="bf16",
)
model = fsdp2_prepare_model(accelerator, model)
held = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
    logits = model(input_ids=torch.arange(3, 15)[None]).logits.float()
tensors = {f"held.{k}": v.clone() for k, v in held.items()} | {"logits": logits}
if rank == 0:
    tensors |= {f"read.{k}": v for k, v in read.items()}
save_file(tensors, f"{out}/rank{rank}.safetensors")
facts = {
    "built_on": built_on,
    "tied": model.llm.lm_head.weight is model.llm.get_input_embeddings().weight,
    "buffers_on": sorted({b.device.type for b in model.buffers()}),
}
open(f"{out}/rank{rank}.json", "w").write(json.dumps(facts))
"""


@pytest.mark.integration
def test_accelerates_fsdp2_preparation_gives_every_rank_the_weights_rank_0_read(tmp_path, chat_base):
    """On GPUs accelerate shards the model (`fsdp2_prepare_model`); with `cpu_ram_efficient_loading` it
    moves it to the meta device, shards it and sends rank 0's weights. Its own function on 2 gloo
    processes (given the attributes of an Accelerator it reads: accelerate offers no FSDP on CPUs), rank
    1 holding the structure only: both end with the tensors rank 0 read, in their dtypes (the frozen
    projections in bf16), tied embeddings tied, buffers real, and compute the same logits."""
    script = tmp_path / "prepare.py"
    script.write_text(ACCELERATE_PREPARATION)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(
        [*cmd, _tied_base(chat_base, tmp_path / "base"), json.dumps(TINY_RESNET), str(tmp_path)],
        env=_env(cpu=True),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    tensors = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert facts[0]["built_on"] == ["cpu"] and facts[1]["built_on"] == ["meta"]
    read = {k.removeprefix("read."): v for k, v in tensors[0].items() if k.startswith("read.")}
    assert {t.dtype for t in read.values()} >= {torch.bfloat16, torch.float32}
    for rank in (0, 1):
        assert facts[rank]["tied"] and facts[rank]["buffers_on"] == ["cpu"]
        held = {k.removeprefix("held."): v for k, v in tensors[rank].items() if k.startswith("held.")}
        assert held.keys() == read.keys()
        for name, tensor in read.items():
            assert held[name].dtype == tensor.dtype and torch.equal(held[name], tensor), (rank, name)
    assert torch.equal(tensors[0]["logits"], tensors[1]["logits"])


def test_modes_that_could_not_save_are_refused_before_any_work(tmp_path, chat_base, synth_data, monkeypatch):
    """FSDP1 (asked for as accelerate's launcher asks: environment variables) and an output_dir that
    cannot take files stop at once with a one-line reason, before the model or data are touched (the
    base named is not there: reading it would raise another error)."""
    missing = tmp_path / "no-such-base"
    cfg = TrainConfig.from_yaml(_config(tmp_path, synth_data, llm=missing, output_dir=str(tmp_path / "run")))
    with monkeypatch.context() as env:
        for name, value in {
            "ACCELERATE_USE_FSDP": "true",
            "FSDP_VERSION": "1",
            "FSDP_SYNC_MODULE_STATES": "false",
        }.items():
            env.setenv(name, value)
        with pytest.raises(ValueError, match="FSDP1 is not supported .* set `fsdp_version: 2`"):
            Trainer(cfg)
    (tmp_path / "a-file").write_text("")
    cfg.output_dir = str(tmp_path / "a-file" / "run")
    with pytest.raises(ValueError, match="output_dir .*a-file/run cannot be written"):
        Trainer(cfg).run()


# 4. bad data ---------------------------------------------------------------------------------------
BAD = {
    "bad-missing-image": r"image file not found: .*no-such-image\.png",
    "bad-corrupt-png": r"corrupt\.png: cannot decode image",
    "bad-no-conversations": r"no turns: a record needs `conversations`",
    "bad-placeholders": r"2 <image> placeholders but 1 images",
    "bad-too-long": r"\d+ tokens exceed max_length=256",
}


@pytest.fixture
def bad_data(tmp_path, synth_data) -> Path:
    """mixed.json: 16 good synthetic records with the five kinds of bad one among them."""
    train = Path(synth_data["train"])
    good = json.loads(train.read_text())[:16]
    for record in good:
        record["image"] = str(train.parent / record["image"])  # absolute: this file lives elsewhere
    image = good[0]["image"]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + b"garbage" * 20)
    ask = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    bad = [
        {"id": "bad-missing-image", "image": "no-such-image.png", "conversations": ask("<image>\nColour?", "red")},
        {"id": "bad-corrupt-png", "image": "corrupt.png", "conversations": ask("<image>\nColour?", "red")},
        {"id": "bad-no-conversations", "image": image},
        {"id": "bad-placeholders", "images": [image], "conversations": ask("<image>\n<image>\nSame?", "yes")},
        {"id": "bad-too-long", "conversations": ask("tell me a story " * 200, "no")},
    ]
    path = tmp_path / "mixed.json"
    write_json(path, good[:3] + bad[:2] + good[3:9] + bad[2:4] + good[9:13] + bad[4:] + good[13:])
    return path


def _bad_config(tmp_path, chat_base, synth_data, bad_data, **fields) -> Path:
    return _config(
        tmp_path,
        synth_data,
        "bad.yaml",
        llm=chat_base,
        max_steps=2,
        output_dir=str(tmp_path / "run"),
        data=[{"path": bad_data.name, "ratio": 0.8}, {"path": str(synth_data["text"]), "ratio": 0.2}],
        **fields,
    )


@pytest.mark.parametrize("estimated", [False, True], ids=["exact", "estimated"])
def test_bad_records_are_skipped_and_reported(tmp_path, chat_base, synth_data, bad_data, monkeypatch, estimated):
    """The same report when most lengths are estimated (every other record measured exactly): the
    too-long record, at an estimated position, is measured exactly for its doubt and refused."""
    from genieblue.data import lengths

    if estimated:
        monkeypatch.setattr(lengths, "EXACT_FIRST", 0)
        monkeypatch.setattr(lengths, "EXACT_EVERY", 2)
    config = _bad_config(tmp_path, chat_base, synth_data, bad_data, max_bad_fraction=0.5)
    trainer = Trainer(TrainConfig.from_yaml(config))
    samples = trainer_module.prepare_data(trainer.cfg, _processor(chat_base)).samples
    assert all(samples.exact(k) for k in range(len(samples))) != estimated
    final = trainer.run()
    assert (final / "delta.safetensors").is_file()
    report = json.loads((tmp_path / "run" / "bad_records.json").read_text())
    assert sorted(r["id"] for r in report) == sorted(BAD)  # each exactly once
    for row in report:
        assert re.search(BAD[row["id"]], row["reason"]), row


@pytest.mark.parametrize(
    "text, says",
    [
        ("stage: 1\nlora_rnak: 4\n", r"unknown keys 'lora_rnak' \(did you mean 'lora_rank'\?\)"),
        ("- stage: 1\n", r"not valid YAML at line 2: expected <block end>"),
        ("stage: 1\n", r"the config names no data: add `data: \[\{path: train.json\}\]`"),
        ("data: train.json\n", r"data: lists sources such as .*; got 'train.json'"),
        ("data: [train.json]\n", r"data: lists sources such as .*; got 'train.json' in it"),
        ("data: [{path: train.json, ration: 2}]\n", r"unknown keys 'ration' \(did you mean 'ratio'\?\)"),
        ("stage: 3\ndata: [{path: train.json}]\n", r"stage must be 1 or 2, got 3"),
        ("data: [{path: none.json}]\n", r"data file not found: \S*none.json \(a config's data paths are relative"),
        ("data: [{path: train.json, image_folder: no-such}]\n", r"image folder not found: \S*no-such"),
        ("lr: fast\ndata: [{path: train.json}]\n", r"lr must be float, got 'fast'"),
        ("gradient_checkpointing: yes please\ndata: [{path: train.json}]\n", r"must be bool, got 'yes please'"),
        ("max_steps: 0\ndata: [{path: train.json}]\n", r"max_steps must be >= 1, got 0"),
    ],
)
def test_a_config_mistake_is_one_line_before_any_weight_is_read(tmp_path, text, says):
    """Each names the file and what to write instead; the base named is not there, so an error about it
    would mean the config was checked too late."""
    (tmp_path / "train.json").write_text("[]")
    config = tmp_path / "c.yaml"
    config.write_text(f"llm: {tmp_path / 'no-such-base'}\n{text}")
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(says, errors[0]), result.output
    assert "Traceback" not in result.output and "no-such-base" not in result.output


def test_a_float_written_as_yaml_1_1_reads_as_a_string_is_taken_as_the_number(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 2e-5\neps: 1.0e-6\n")  # `2e-5` is a string to YAML 1.1
    config = TrainConfig.from_yaml(tmp_path / "c.yaml")
    assert config.lr == 2e-5 and config.eps == 1e-6


def test_too_many_bad_records_stop_training(tmp_path, chat_base, synth_data, bad_data):
    """The share of bad records is over every record the files hold, also those the ratios leave undrawn
    (the text file's ratio draws 5 of its 8 records here)."""
    config = _bad_config(tmp_path, chat_base, synth_data, bad_data)  # default max_bad_fraction: 1%
    held = len(json.loads(bad_data.read_text())) + len(json.loads(Path(synth_data["text"]).read_text()))
    with pytest.raises(BadDataError) as err:
        Trainer(TrainConfig.from_yaml(config)).run()
    message = str(err.value)
    assert f"5 of {held} records" in message and str(bad_data) in message
    assert str(tmp_path / "run" / "bad_records.json") in message
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()

    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert re.search(r"\b5 of \d+ records", errors[0]) and errors[0].rstrip().endswith("bad_records.json")
    assert "Traceback" not in result.output


def _llama_factory_file(folder: Path) -> Path:
    """What a new user brings: a LLaMA-Factory file (messages, images, `<image>` inside the first
    user turn, several turns and images, a system turn) with JPEG photos beside it."""
    (folder / "photos").mkdir(parents=True)
    records = []
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        rgb = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (20, 40, 220), "white": (250, 250, 250)}[colour]
        Image.new("RGB", (48 + 8 * i, 40), rgb).save(folder / "photos" / f"{i}.jpg", "JPEG")
        records.append(
            {
                "messages": [
                    {"role": "system", "content": "You describe photos."},
                    {"role": "user", "content": "<image>What colour is this photo?"},
                    {"role": "assistant", "content": f"It is {colour}."},
                    {"role": "user", "content": "Compare it with <image>"},
                    {"role": "assistant", "content": "They are the same photo."},
                ],
                "images": [f"photos/{i}.jpg", f"photos/{i}.jpg"],
            }
        )
    path = folder / "mllm_demo.json"
    path.write_text(json.dumps(records, indent=2))
    return path


def test_train_reads_a_llama_factory_file_and_names_what_an_unusable_file_lacks(tmp_path, chat_base, synth_data):
    data = _llama_factory_file(tmp_path / "data")
    config = _config(
        tmp_path,
        synth_data,
        "factory.yaml",
        llm=chat_base,
        max_steps=2,
        batch_size=1,
        output_dir=str(tmp_path / "run"),
        data=[{"path": os.path.relpath(data, tmp_path)}],
    )
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "4 samples" in result.output and not (tmp_path / "run" / "bad_records.json").exists()
    assert sorted(_losses(tmp_path / "run")) == [1, 2]
    card = (tmp_path / "run" / "final" / "README.md").read_text()  # the model card says what it was trained on
    assert "- **stage 2** (tower, connector, LLM delta): 2 steps, 4 samples per epoch," in card
    assert f"final loss {_losses(tmp_path / 'run')[2]:.4f}" in card
    assert f"  - `{data}` (ratio 1): 4 samples in the mixture" in card

    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("\n".join(json.dumps({"instruction": "Q?", "input": "", "output": "A."}) for _ in range(4)))
    config = _config(
        tmp_path,
        synth_data,
        "alpaca.yaml",
        llm=chat_base,
        max_steps=2,
        output_dir=str(tmp_path / "run2"),
        data=[{"path": "alpaca.jsonl"}],
    )
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert f"{alpaca}: none of its 4 records is usable: a record needs `conversations`" in errors[0]
    assert "`messages`" in errors[0] and "the first record has keys [instruction, input, output]" in errors[0]
    # well-formed records that are all too long: the way out, not a lecture on formats
    short = _config(
        tmp_path,
        synth_data,
        "short.yaml",
        llm=chat_base,
        max_length=8,
        output_dir=str(tmp_path / "run3"),
        data=[{"path": os.path.relpath(data, tmp_path)}],
    )
    result = CliRunner().invoke(app, ["train", "--config", str(short)])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    fits = r"none of its 4 records fits \(\d+ tokens exceed max_length=8\): raise max_length"
    assert re.search(fits, errors[0]), errors[0]


def test_pixels_are_decoded_per_step_and_late_failures_are_counted(tmp_path, chat_base, synth_data, monkeypatch):
    """No pixel is decoded before training: the steps decode only their own samples; an image
    whose header reads but whose pixels do not is skipped at its step and listed."""
    from genieblue.data import processor as processor_module

    _late_data(tmp_path, synth_data)
    decoded = []
    real = processor_module.image_to_tensor
    monkeypatch.setattr(
        processor_module, "image_to_tensor", lambda source, *a, **k: decoded.append(source) or real(source, *a, **k)
    )
    config = _config(
        tmp_path,
        synth_data,
        "late.yaml",
        llm=chat_base,
        batch_size=1,
        max_length=4096,
        max_bad_fraction=0.5,
        output_dir=str(tmp_path / "run"),
        data=[{"path": "late.json"}],
    )
    trainer = Trainer(TrainConfig.from_yaml(config))
    data_only = trainer_module.prepare_data(trainer.cfg, _processor(chat_base))
    assert decoded == [] and data_only.bad == [] and len(data_only.samples) == 13
    trainer.run()
    assert len(decoded) == 13  # all 13 packed into one row: one step, each sample decoded there
    report = json.loads((tmp_path / "run" / "bad_records.json").read_text())
    assert [r["id"] for r in report] == ["late"] and "cannot decode image" in report[0]["reason"]
    # above max_bad_fraction, found only at a step: the run stops there and keeps its steps
    strict = TrainConfig.from_yaml(config, output_dir=str(tmp_path / "strict"))
    strict.max_bad_fraction = 0.01
    with pytest.raises(BadDataError, match="1 steps so far are kept in checkpoint step-0000001: .* then --resume"):
        Trainer(strict).run()
    assert (tmp_path / "strict" / "checkpoints" / "step-0000001" / "trainer_state.json").is_file()


# 5. loss and optimiser -----------------------------------------------------------------------------
def test_causal_lm_loss_equals_transformers_loss_on_a_packed_batch(chat_base, synth_data):
    torch.manual_seed(0)
    model = GenieBlueForConditionalGeneration.from_base(chat_base, TINY_SIGLIP).eval()
    processor = GenieBlueProcessor.from_model(model, load_tokenizer(chat_base), max_length=160)
    records = read_records(synth_data["train"])[:5] + read_records(synth_data["text"])[:3]
    batch = pack([processor.encode(r) for r in records], 160, processor.pad_id)
    assert batch["input_ids"].shape[0] >= 2 and batch["pixel_values"] is not None
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        ours = causal_lm_loss(model, batch, n_tokens)
        theirs = model(**batch, shared_base=True).loss
    assert abs(ours.item() - theirs.item()) < 1e-6


@pytest.mark.parametrize("strategy,stage", [("genieblue-skip", 2), ("cogvlm-skip", 2), ("genieblue-skip", 1)])
def test_a_text_only_micro_batch_touches_every_trainable_parameter(chat_base, synth_data, strategy, stage):
    """Through the training forward (`causal_lm_loss`, train mode), a micro-batch without images
    gives every trainable parameter a gradient - zero for the vision tower and projector, none left
    None - as data-parallel ranks seeing different modalities need; its loss is unchanged by it
    and an image micro-batch gives the tower a real gradient."""
    torch.manual_seed(0)
    model = GenieBlueForConditionalGeneration.from_base(chat_base, TINY_SIGLIP, strategy=strategy)
    model.set_stage(stage)
    processor = GenieBlueProcessor.from_model(model, load_tokenizer(chat_base), max_length=160)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("vision.") for n in trainable) and (
        stage == 1 or any(not n.startswith("vision.") for n in trainable)
    )

    def backward(records) -> torch.Tensor:
        batch = pack([processor.encode(r) for r in records], 160, processor.pad_id)
        model.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model.train(), batch, int((batch["labels"][:, 1:] != -100).sum()))
        loss.backward()
        with torch.no_grad():
            assert torch.equal(loss, causal_lm_loss(model.eval(), batch, int((batch["labels"][:, 1:] != -100).sum())))
        return batch["pixel_values"]

    assert backward(read_records(synth_data["text"])[:3]) is None
    untouched = [n for n, p in trainable.items() if p.grad is None]
    assert not untouched, untouched[:5]
    assert all(torch.count_nonzero(p.grad) == 0 for n, p in trainable.items() if n.startswith("vision."))
    if stage == 2:
        assert any(torch.count_nonzero(p.grad) for n, p in trainable.items() if not n.startswith("vision."))
    assert backward(read_records(synth_data["train"])[:2]) is not None
    assert all(p.grad is not None for p in trainable.values())
    assert any(torch.count_nonzero(p.grad) for n, p in trainable.items() if n.startswith("vision."))


TINY_DINOV2 = dict(  # an AutoBackbone whose config has layers but no stages (`depths`)
    TINY_SIGLIP, model_type="dinov2", out_features=["stage2"], downsample=2
)


@pytest.mark.parametrize("tower", [TINY_SIGLIP, TINY_DINOV2], ids=["siglip", "dinov2-backbone"])
def test_param_groups_vit_layer_decay_and_weight_decay(chat_base, tower):
    model = GenieBlueForConditionalGeneration.from_base(chat_base, tower)
    lr, L = 1e-3, tower["num_hidden_layers"]
    cfg = TrainConfig(llm=chat_base, lr=lr, vit_layer_decay=0.9, weight_decay=0.05)
    groups = param_groups(model, cfg)
    where = {id(p): g for g in groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(where) == sum(len(g["params"]) for g in groups) == len(trainable)  # each once, none frozen
    seen = {"block0": 0, "block1": 0, "projector": 0, "llm": 0}
    for name, p in trainable.items():
        group = where[id(p)]
        assert group["weight_decay"] == (0.0 if p.ndim == 1 else 0.05), name
        block = re.search(r"^vision\.vit\..*\.layers?\.(\d+)\.", name)
        if block:
            i = int(block.group(1))
            assert group["lr"] == pytest.approx(lr * 0.9 ** (L - i)), name
            seen[f"block{i}"] += 1
        elif name.startswith("vision.projector."):
            assert group["lr"] == pytest.approx(lr), name
            seen["projector"] += 1
        elif not name.startswith("vision."):
            assert group["lr"] == pytest.approx(lr), name
            seen["llm"] += 1
    assert all(seen.values()), seen
    # patch embeddings 0.9^3, block 0 0.9^2 = 8.1e-4, block 1 0.9 = 9e-4, everything after the ViT: lr
    assert sorted({g["lr"] for g in groups}) == pytest.approx([7.29e-4, 8.1e-4, 9e-4, 1e-3])

    model.set_stage(1)
    stage1 = param_groups(model, TrainConfig(llm=chat_base, lr=lr, stage=1, projector_lr=5e-3))
    assert [g["lr"] for g in stage1] == [5e-3] * len(stage1)
    assert sum(len(g["params"]) for g in stage1) == len(list(model.vision.projector.parameters()))


# 6. a real learning signal ---------------------------------------------------------------------------
def _mean_loss(model, processor, records) -> float:
    batch = pack([processor.encode(r) for r in records], 256, processor.pad_id)
    with torch.no_grad():
        return causal_lm_loss(model.eval(), batch, int((batch["labels"][:, 1:] != -100).sum())).item()


def test_loss_goes_down(tmp_path, chat_base, synth_data):
    cfg = TrainConfig(
        llm=chat_base,
        vision=TINY_SIGLIP,
        data=[{"path": str(synth_data["train"])}],
        max_length=256,
        batch_size=2,
        max_steps=10,
        lr=1e-2,
        output_dir=str(tmp_path / "run"),
    )
    set_seed(cfg.seed)
    before = build_model(cfg)  # the trainer's own starting point (same seed)
    final = Trainer(cfg).run()
    after = GenieBlueForConditionalGeneration.from_pretrained(final, llm=chat_base)
    losses = _losses(tmp_path / "run")
    first, last = sum(losses[s] for s in (1, 2)) / 2, sum(losses[s] for s in (8, 9, 10)) / 3
    assert last < first - 0.1, losses
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[:2] == [0.0, pytest.approx(1e-2)] and lrs[-1] < lrs[2]  # cfg.lr after 1 warm-up step, then cosine
    processor = GenieBlueProcessor.from_model(after, load_tokenizer(chat_base), max_length=256)
    held_out = read_records(synth_data["val"])
    assert _mean_loss(after, processor, held_out) < _mean_loss(before, processor, held_out) - 0.1


# stage 0: a from-scratch vision tower learns to spell its replies in the LLM's embeddings ------------
def test_stage0_targets_leave_out_tokens_common_to_most_replies_and_repeat_each_reply():
    replies = [(1, 9), (2, 9), (3, 9), (1, 2, 9)]  # 9 ends every reply, like an end-of-turn marker
    informative = informative_tokens(replies)
    assert informative == [(1,), (2,), (3,), (1, 2)]
    assert informative_tokens([(9,), (9,), (1, 9)])[0] == (9,)  # nothing else left: kept whole
    assert torch.equal(
        cyclic_targets([(1,), (1, 2), (4, 5, 6, 7, 8)], 4), torch.tensor([[1, 1, 1, 1], [1, 2, 1, 2], [4, 5, 6, 7]])
    )


def test_stage0_loss_wants_token_k_to_say_the_replys_token_k():
    weight = torch.eye(6) * 8  # a 6-word vocabulary
    tokens = torch.stack([weight[0], weight[1]])[None]  # image token 0 says word 0, token 1 says word 1
    loss = lambda targets: caption_loss(
        tokens,
        weight,
        torch.zeros(()),
        torch.tensor([targets]),  # noqa: E731
        torch.tensor([2, 3, 4, 5]),
    ).item()
    assert loss([0, 1]) < 1e-2
    assert loss([1, 0]) > 5  # the right words in the wrong order cost as much as wrong words
    # token 0 right (~0); token 1 says word 1, no candidate here: uniform over the rows {0, 2, 3, 4, 5}
    assert loss([0, 3]) == pytest.approx(math.log(5) / 2, rel=1e-3)
    assert loss([4, 4]) == pytest.approx(math.log(4), rel=1e-3)  # the words said are no candidates: uniform


def test_stage0_stream_batches_encode_fresh_images_like_the_processor(chat_base):
    model = GenieBlueForConditionalGeneration.from_base(chat_base, TINY_SIGLIP)
    processor = GenieBlueProcessor.from_model(model, load_tokenizer(chat_base))
    images = [Image.new("RGB", (50, 40), (255, 0, 0)), Image.new("RGB", (20, 20), (0, 0, 255))]
    pixels, replies = next(stream_batches(iter(zip(images, ["a red box", "blue"])), processor, 2))
    assert pixels.shape == (2, 3, model.vision.image_size, model.vision.image_size)
    assert torch.equal(pixels[1:], image_to_tensor(images[1], model.vision.image_size))
    assert replies == [
        tuple(processor.tokenizer("a red box", add_special_tokens=False)["input_ids"]),
        tuple(processor.tokenizer("blue", add_special_tokens=False)["input_ids"]),
    ]


def test_stage0_cosine_term_pulls_image_tokens_onto_their_words(chat_base):
    def cosine_after(match: float) -> float:
        torch.manual_seed(0)
        model = GenieBlueForConditionalGeneration.from_base(chat_base, TINY_RESNET)
        g = torch.Generator().manual_seed(0)
        pixels = torch.randn(8, 3, 32, 32, generator=g)
        replies = [tuple(torch.randint(3, 100, (3,), generator=g).tolist()) for _ in range(8)]
        batches = iter(lambda: (pixels, replies), None)  # the same batch every step
        pretrain_vision(model, batches, 40, lr=1e-2, negatives=16, match=match)
        weight = model.llm.get_input_embeddings().weight
        with torch.no_grad():
            tokens = model.vision.eval()(pixels)
            return F.cosine_similarity(tokens, weight[cyclic_targets(replies, tokens.shape[1])], dim=-1).mean().item()

    ranked, matched = cosine_after(0.0), cosine_after(1.0)
    assert matched > ranked + 0.3, (ranked, matched)  # measured: 0.06 without the term, 0.69 with it


def test_stage0_trains_the_vision_tower_only(tmp_path, chat_base, synth_data):
    cfg = TrainConfig(
        llm=chat_base,
        vision=TINY_SIGLIP,
        data=[{"path": str(synth_data["train"])}],
        max_length=256,
        batch_size=2,
        max_steps=1,
        stage=1,
        stage0_steps=30,
        stage0_batch=16,
        stage0_lr=1e-2,
        output_dir=str(tmp_path / "run"),
    )
    set_seed(cfg.seed)
    before = build_model(cfg)
    final = Trainer(cfg).run()
    after = GenieBlueForConditionalGeneration.from_pretrained(final, llm=chat_base)
    losses = json.loads((tmp_path / "run" / "stage0.json").read_text())["losses"]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    vit_before, vit_after = before.vision.vit.state_dict(), after.vision.vit.state_dict()
    assert any(not torch.equal(vit_before[k], vit_after[k]) for k in vit_before)  # stage 1 alone freezes the ViT
    llm_before, llm_after = before.llm.state_dict(), after.llm.state_dict()
    assert all(torch.equal(llm_before[k], llm_after[k]) for k in llm_before)
    # the image tokens moved to the scale of the LLM's input embeddings
    pixels = torch.randn(4, 3, after.vision.image_size, after.vision.image_size)
    target = after.llm.get_input_embeddings().weight.pow(2).mean().sqrt()
    rms = lambda m: m.vision(pixels).pow(2).mean().sqrt()  # noqa: E731
    with torch.no_grad():
        assert abs(torch.log(rms(after) / target)) < abs(torch.log(rms(before) / target))


def test_one_stage_1_starts_another_strategys_stage_2_and_a_stage_2_folder_does_not(tmp_path, chat_base, synth_data):
    common = dict(llm=chat_base, vision=TINY_SIGLIP, max_length=256, batch_size=2, max_steps=1, precision="no")
    stage1 = TrainConfig(
        stage=1, data=[{"path": str(synth_data["caption"])}], output_dir=str(tmp_path / "s1"), **common
    )
    first = Trainer(stage1).run()
    full = TrainConfig(
        stage=2,
        strategy="full",
        init_from=str(first),
        data=[{"path": str(synth_data["train"])}],
        output_dir=str(tmp_path / "full"),
        **common,
    )
    model = build_model(full)
    saved = GenieBlueForConditionalGeneration.from_pretrained(first, llm=chat_base)
    assert model.strategy.name == "full" and saved.strategy.name == "genieblue-skip"
    mine, theirs = model.vision.state_dict(), saved.vision.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    second = Trainer(full).run()
    again = TrainConfig(
        stage=2, strategy="lora", init_from=str(second), data=full.data, output_dir=str(tmp_path / "x"), **common
    )
    with pytest.raises(ValueError, match="beyond stage 1"):
        build_model(again)
    # LoRA settings a full copy does not have do not make it another strategy
    assert build_model(dataclasses.replace(full, init_from=str(second), lora_rank=4)).strategy.name == "full"

    # the config's own settings of the folder's strategy: honoured from a stage-1 folder ...
    rank4 = dataclasses.replace(full, strategy="genieblue-skip", lora_rank=4, output_dir=str(tmp_path / "r4"))
    assert build_model(rank4).strategy.lora_rank == 4  # (not the stage-1 folder's 8)
    third = Trainer(rank4).run()
    # ... and from a stage-2 folder the same settings continue it, other settings are refused
    continued = build_model(dataclasses.replace(rank4, init_from=str(third)))
    trained = GenieBlueForConditionalGeneration.from_pretrained(third, llm=chat_base)
    mine, theirs = continued.state_dict(), trained.state_dict()
    assert continued.strategy.lora_rank == 4 and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    with pytest.raises(ValueError, match=r"beyond stage 1 as name genieblue-skip, fraction 0.25, lora_rank 4, "):
        build_model(dataclasses.replace(rank4, init_from=str(third), lora_rank=8))


def test_stage0_record_batches_encode_the_samples_batch_by_batch(chat_base, synth_data):
    processor = _processor(chat_base)
    records = read_records(synth_data["caption"])
    folder = Path(synth_data["caption"]).parent

    class Encoded(list):  # the records, encoded (pixels decoded) only when indexed, counting how often
        calls = 0

        def __getitem__(self, i):
            Encoded.calls += 1
            return processor.encode(records[i], folder)

    samples = Encoded(records)
    batches = sample_batches(samples, 4, probe=8)
    pixels, replies = next(batches)
    assert pixels.shape == (4, 3, processor.image_size, processor.image_size) and len(replies) == 4
    assert Encoded.calls == 8 + 4  # the probe, then one batch: never the whole data set
    probed = [processor.encode(records[i], folder) for i in range(8)]
    common = common_tokens([tuple(int(t) for t in s.labels[s.labels != -100]) for s in probed])
    assert common and all(reply and not set(reply) & common for reply in replies)
    next(batches)
    assert Encoded.calls == 8 + 8
