"""Host memory of the processes of a distributed training run: DDP, and FSDP2 with the weights read
by every process or by rank 0 alone (`cpu_ram_efficient_loading`, the shipped FSDP config's setting).
Under DDP, and under FSDP2 with that setting, rank 0 alone reads the weights and the other processes
build the model's structure and take rank 0's weights (docs/training.md).

Writes a small synthetic dataset and a stage-1 config on a base (the built-in SmolLM2, or a random one
of a real shape saved as bf16 safetensors, with SmolLM2's tokenizer) and a tower (the default ResNet, or
the paper's SigLIP-so400m shape, built fresh), then runs one step of `genieblue train` in each layout:

    DDP                      accelerate launch --config_file configs/accelerate/ddp-8gpu.yaml
                             (on a machine without a GPU: torchrun --standalone)
    FSDP2, every rank reads  accelerate launch --config_file configs/accelerate/fsdp-8gpu.yaml
                             --fsdp_cpu_ram_efficient_loading false
    FSDP2, rank 0 reads      the same with --fsdp_cpu_ram_efficient_loading true

(FSDP2 without a GPU with `--fsdp_sync_module_states false`, which accelerate refuses there), each on
`--processes` processes, sampling every process's resident memory (VmRSS, /proc) every 0.1 s. Prints
each rank's peak while the run sets up (builds, places or shards and fills the model, reads the data)
and while it trains, and the run's wall time. On a GPU machine the setup's is the host's peak
(training memory is the GPU's); on CPUs the training step's memory is host memory too.

    python bench/train_memory.py [--shape qwen2.5-0.5b] [--vision resnet|siglip-so400m] [--processes 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from load import SHAPES, TOWERS
from transformers import AutoConfig, AutoModelForCausalLM

from genieblue._io import write_json
from genieblue.data.synthetic import generate_dataset, text_only_samples
from genieblue.model import load_tokenizer
from genieblue.model.sources import resolve_llm

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
ACCELERATE = (sys.executable, "-m", "accelerate.commands.launch")
LAYOUTS = ("DDP", "FSDP2, every rank reads", "FSDP2, rank 0 reads")


def _rank_of(pid: int) -> int | None:
    """The RANK a process was launched with (a training process), else None."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def _descendants(root: int) -> list[int]:
    children, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                found = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            children += found
            frontier += found
    return children


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def launch_command(layout: str, config: Path, processes: int) -> list[str]:
    """The command that starts `processes` processes in `layout` (one of `LAYOUTS`)."""
    gpu = torch.cuda.is_available()
    if layout == "DDP":
        if gpu:
            return [*ACCELERATE, "--config_file", str(CONFIGS / "ddp-8gpu.yaml"), "--num_processes", str(processes)]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    wrap = AutoConfig.from_pretrained(resolve_llm(yaml.safe_load(config.read_text())["llm"])).architectures[0]
    return [
        *(*ACCELERATE, "--config_file", str(CONFIGS / "fsdp-8gpu.yaml"), "--num_processes", str(processes)),
        *("--fsdp_cpu_ram_efficient_loading", str(layout == "FSDP2, rank 0 reads").lower()),
        *("--fsdp_transformer_layer_cls_to_wrap", wrap.replace("ForCausalLM", "DecoderLayer")),
        *(() if gpu else ("--fsdp_sync_module_states", "false", "--mixed_precision", "no")),
    ]


def measure(layout: str, config: Path, processes: int, out: Path) -> dict:
    """Peak resident MiB per rank while the run sets up (the model built, placed or sharded and given its
    weights; the data read) and while it trains (from the trainer's header line on), and its wall seconds."""
    cli = ["-m", "genieblue.cli", "train", "-c", str(config), "--max-steps", "1", "--output-dir", str(out)]
    cmd = [*launch_command(layout, config, processes), *cli]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    start, peak, lines, training = time.perf_counter(), {"setup": {}, "training": {}}, [], threading.Event()
    setup_s = []
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def read_stderr() -> None:
        for line in launcher.stderr:
            lines.append(line)
            if "trainable" in line and not training.is_set():  # the header: the model placed, the data read
                setup_s.append(time.perf_counter() - start)
                training.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    while launcher.poll() is None:
        phase = peak["training" if training.is_set() else "setup"]
        for pid in _descendants(launcher.pid):
            rank = _rank_of(pid)
            if rank is not None:
                phase[rank] = max(phase.get(rank, 0.0), _rss_mib(pid))
        time.sleep(0.1)
    reader.join()
    if launcher.returncode:
        raise SystemExit(f"the run failed:\n{''.join(lines)[-3000:]}")
    result = {f"{p}_peak_rss_MiB": {r: round(v[r]) for r in sorted(v)} for p, v in peak.items()}
    return {**result, "setup_s": round(setup_s[0], 1), "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default=None, choices=list(SHAPES), help="a random base (default: SmolLM2)")
    parser.add_argument("--vision", default="resnet", choices=list(TOWERS), help="the tower, built fresh")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        tower = TOWERS[args.vision]
        side = tower["image_size"] if tower else 64
        paths = generate_dataset(root / "data", n_train=8 * args.processes, n_val=0, n_test=0, image_size=side)
        write_json(root / "data" / "text.json", text_only_samples(4, seed=0))
        llm = None
        if args.shape:
            llm = str(root / "base")
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(SHAPES[args.shape](), dtype=torch.bfloat16).save_pretrained(llm)
            load_tokenizer(None).save_pretrained(llm)
        config = root / "stage1.yaml"
        fields = {
            "llm": llm,
            "vision": tower,
            "stage": 1,
            "data": [{"path": str(paths["train"])}, {"path": str(root / "data" / "text.json"), "ratio": 0.2}],
            "max_length": 1024,
            "batch_size": 1,
            "output_dir": str(root / "run"),
        }
        config.write_text(yaml.safe_dump(fields))
        runs = {layout: measure(layout, config, args.processes, root / f"run-{i}") for i, layout in enumerate(LAYOUTS)}
    result = {"llm": args.shape or "smollm2-135m-instruct", "vision": args.vision, "processes": args.processes}
    result["layouts"] = runs
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.processes} processes, {result['llm']} + {args.vision} tower, stage 1, one step")
    for layout, run in runs.items():
        print(f"  {layout} (set up in {run['setup_s']} s of {run['wall_s']} s), peak resident memory:")
        for phase in ("setup", "training"):
            peaks = ", ".join(f"rank {r} {mib} MiB" for r, mib in run[f"{phase}_peak_rss_MiB"].items())
            print(f"    {phase:9} {peaks}")


if __name__ == "__main__":
    main()
