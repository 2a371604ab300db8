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
`--processes` processes (`large_data.train_run`). Prints each rank's peak resident memory (VmHWM,
/proc) by the run's first step, that is while it set up (built, placed or sharded and filled the
model, read the data), and by its end; the seconds to its first step and its wall time. On a GPU
machine the setup's is the host's peak (training memory is the GPU's); on CPUs the training step's
memory is host memory too.

    python bench/train_memory.py [--shape qwen2.5-0.5b] [--vision resnet|siglip-so400m] [--processes 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from large_data import train_run
from load import SHAPES, TOWERS
from transformers import AutoConfig, AutoModelForCausalLM

from genieblue._io import write_json
from genieblue.data.synthetic import generate_dataset, text_only_samples
from genieblue.model import load_tokenizer
from genieblue.model.sources import resolve_llm

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
ACCELERATE = (sys.executable, "-m", "accelerate.commands.launch")
LAYOUTS = ("DDP", "FSDP2, every rank reads", "FSDP2, rank 0 reads")


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
    """Peak resident MiB per rank by the run's first step (the model built, placed or sharded and given
    its weights; the data read) and by its end, the seconds to its first step and its wall seconds."""
    cli = ["-m", "genieblue.cli", "train", "-c", str(config), "--max-steps", "1", "--output-dir", str(out)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    setup_s, wall_s, ready, end = train_run([*launch_command(layout, config, processes), *cli], env)
    by_rank = lambda peaks: {int(k[5:]): round(v) for k, v in peaks.items() if k.startswith("rank ")}  # noqa: E731
    return {
        "setup_peak_rss_MiB": dict(sorted(by_rank(ready).items())),
        "run_peak_rss_MiB": dict(sorted(by_rank(end).items())),
        "setup_s": round(setup_s, 1),
        "wall_s": round(wall_s, 1),
    }


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
        for phase, label in (("setup", "by its first step"), ("run", "by its end")):
            peaks = ", ".join(f"rank {r} {mib} MiB" for r, mib in run[f"{phase}_peak_rss_MiB"].items())
            print(f"    {label:17} {peaks}")


if __name__ == "__main__":
    main()
