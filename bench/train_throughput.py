"""Training throughput per strategy: tokens/s and peak memory of the trainer's training step
(forward, its chunked loss, backward, AdamW) on a random-weight model of any HF config (no download;
the config is built from a name or JSON file).

    python bench/train_throughput.py                                  # SmolLM2-135M shape, CPU
    python bench/train_throughput.py --shape qwen2.5-3b --seq 4096    # the issue's GPU target shape
    python bench/train_throughput.py --profile                        # + operator calls per step
    python bench/train_throughput.py --baseline                       # every lever off (the step before issue 30)
    python bench/train_throughput.py --json

One row of `--seq` tokens with one image; every text token is labelled. `--samples N` splits it
into N samples (the image in the first) packed by the trainer's own `data.pack`, and `--attn` sets
the LLM's attention as a config's `attn_implementation` does. `--precision`: `amp`
(float32 weights, bf16 autocast: what `genieblue train` runs on a GPU, the default there), `bf16`
(every weight and optimizer state in bf16) or `fp32` (the default on a CPU). Levers (each on by
default, off by its flag, for A/B runs): `--plain-lora` (LoRA as B(A(x)) * scale per projection,
not the fused update of `routing.LoRALinear.fused`), `--full-logits` (the loss over every
labelled position's logits at once, not `train.loss`'s chunks), `--foreach-adamw` (AdamW without
fused=True), `--fp32-base` (under amp, the base's frozen projections in float32, not in bf16 as
`cast_base_projections` holds them); `--compile` turns torch.compile of the decoder blocks on.
`--profile` counts the operator calls (aten ops; on a GPU also kernels) of one more step with
torch.profiler.

Peak memory is torch.cuda.max_memory_allocated on a GPU; on a CPU, the process's peak RSS above its
RSS before the model was built. On a CPU shared with other work, `cpu_s` (the process's CPU seconds
per step; run one thread, OMP_NUM_THREADS=1) is steadier than wall time; `cpu_time_vs_full` is its
speed ratio.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import resource
import subprocess
import sys
import time
from unittest import mock

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from genieblue import GenieBlueForConditionalGeneration
from genieblue.data import Sample, pack
from genieblue.model import IMAGE_TOKEN_INDEX, modeling
from genieblue.train import TrainConfig
from genieblue.train.loss import CHUNK, causal_lm_loss
from genieblue.train.optim import build_optimizer

SHAPES = {
    "tiny": lambda: LlamaConfig(  # the benches' own tests: the built-in tokenizer's vocabulary, 4 small blocks
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": lambda: LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
    "qwen2.5-3b": lambda: Qwen2Config(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
    "qwen2.5-0.5b": lambda: Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
}
VISION = {
    "model_type": "siglip_vision_model",
    "image_size": 224,
    "patch_size": 14,
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
}


def build(shape: str, strategy: str, device: str, dtype: torch.dtype) -> GenieBlueForConditionalGeneration:
    """A random-weight model, initialised on `device` in `dtype` (a 3B one in seconds on a GPU), without
    the base's fingerprint (a hash of every weight: seconds per model, and meaningless for random ones)."""
    config = SHAPES[shape]() if shape in SHAPES else AutoConfig.from_pretrained(shape)
    torch.manual_seed(0)
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with mock.patch.object(modeling, "fingerprint", lambda _: "random weights"):
        model = GenieBlueForConditionalGeneration.from_base(llm, vision=VISION, strategy=strategy, dtype=dtype)
    return model.to(device)


OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::mul", "aten::add", "aten::add_", "aten::copy_", "aten::cat")
"""Operators whose calls `--profile` lists one by one (the rest count in the total)."""


def training_step(
    model,
    seq: int,
    device: str,
    chunk: int | None = CHUNK,
    fused_adamw: bool = True,
    fused_lora: bool = True,
    autocast: bool = False,
    samples: int = 1,
):
    """One training step of `model` as the trainer takes it (`causal_lm_loss`, `build_optimizer`, under
    bf16 autocast with `autocast`), as a function: a row of `seq` tokens with one image, every text
    token labelled; `samples` > 1 splits the row into that many samples packed by `data.pack`, as the
    trainer packs them (positions restart at each, whose first token is not labelled), the image in the first."""
    per, size = model.vision.tokens_per_tile, model.vision.image_size
    ids = torch.randint(100, model.llm.config.vocab_size, (seq,))
    ids[8 : 8 + per] = IMAGE_TOKEN_INDEX
    rows = [
        Sample(chunk, chunk.masked_fill(chunk < 0, -100), torch.randn(1, 3, size, size) if i == 0 else None)
        for i, chunk in enumerate(ids.tensor_split(samples))
    ]
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in pack(rows, seq).items()}
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    opt, _ = build_optimizer(model, TrainConfig(lr=1e-5), 1000, fused=fused_adamw)

    def step():
        model.router.fused_lora = fused_lora
        with torch.autocast(device, torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = causal_lm_loss(model, batch, n_tokens, chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def rss() -> int:
    """This process's resident memory now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(
    model,
    seq: int,
    steps: int,
    device: str,
    checkpointing: bool,
    profile: bool = False,
    rss_before: int = 0,
    **levers,
) -> dict:
    """tokens/s, seconds and peak memory of `steps` training steps (`training_step` with `levers`) after
    one untimed warm-up step; with `profile`, the operator calls of one more step. On a CPU the peak
    is the peak RSS above `rss_before` (the RSS before the model was built)."""
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    step = training_step(model, seq, device, **levers)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    for i in range(steps + 1):  # the first step warms up and is not timed
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        if i:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    )
    row = {
        "tokens_per_s": seq * len(times) / sum(times),
        "step_s": sum(times) / len(times),
        "cpu_s": sum(cpu) / len(cpu),  # this process's CPU seconds per step: steadier than wall time on a shared CPU
        "peak_bytes": peak,
    }
    return {**row, **(count_ops(step, device) if profile else {})}


def count_ops(step, device: str) -> dict:
    """Operator calls of one `step()` by torch.profiler: every aten op (nested calls too: a linear
    counts with the mm inside it), the `OPS` one by one, and on a GPU the kernels launched."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
    events = prof.events()
    counts = collections.Counter(e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU)
    aten = {name: n for name, n in counts.items() if name.startswith("aten::")}
    out = {"aten_calls": sum(aten.values()), "ops": {name: aten.get(name, 0) for name in OPS}}
    if device == "cuda":
        out["kernels"] = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return out


def _run_alone(strategy: str) -> dict:
    """This script again, for one strategy, in a fresh process."""
    argv = [a for a in sys.argv[1:] if a != "--json"]
    if "--strategies" in argv:
        i = argv.index("--strategies")
        del argv[i : i + 2]
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--strategies", strategy, "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", help=f"one of {list(SHAPES)} or an HF config id/folder")
    parser.add_argument("--strategies", default="full,lora,genieblue-skip")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--profile", action="store_true", help="count the operator calls of one step")
    parser.add_argument("--plain-lora", action="store_true", help="LoRA as B(A(x)) * scale per projection")
    parser.add_argument("--full-logits", action="store_true", help="all labelled positions' logits at once")
    parser.add_argument("--foreach-adamw", action="store_true", help="AdamW without fused=True")
    parser.add_argument("--fp32-base", action="store_true", help="amp: the base's projections in float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder blocks (image path)")
    parser.add_argument("--samples", type=int, default=1, help="samples packed into the row (positions restart)")
    parser.add_argument("--attn", help="the LLM's attention: sdpa, flex_attention (GPU), ... (default: transformers')")
    parser.add_argument("--baseline", action="store_true", help="every lever off")
    parser.add_argument("--precision", choices=("amp", "bf16", "fp32"), help="default: amp on a GPU, fp32 on a CPU")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.baseline:
        args.plain_lora = args.full_logits = args.foreach_adamw = args.fp32_base = True
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision or ("amp" if device == "cuda" else "fp32")
    strategies = args.strategies.split(",")
    if device == "cpu" and len(strategies) > 1:  # peak RSS never goes down: one process per strategy
        rows = [_run_alone(strategy) for strategy in strategies]
    else:
        rows = []
        for strategy in strategies:
            try:
                rows.append(_row(args, strategy, device, precision))
            except torch.OutOfMemoryError:  # e.g. full fine-tuning of the 3B shape on an 80 GB card
                rows.append({"strategy": strategy, "error": "out of memory"})
            if device == "cuda":
                torch.cuda.empty_cache()
    full = next((r for r in rows if r["strategy"] == "full" and "error" not in r), None)
    for r in rows:
        if full and "error" not in r:
            r["speed_vs_full"] = r["tokens_per_s"] / full["tokens_per_s"]
            r["memory_vs_full"] = r["peak_bytes"] / full["peak_bytes"]
            r["cpu_time_vs_full"] = full["cpu_s"] / r["cpu_s"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    _print(rows)


def _row(args, strategy: str, device: str, precision: str) -> dict:
    """The measured row of one strategy (a fresh model)."""
    rss_before = rss() if device == "cpu" else 0
    model = build(args.shape, strategy, device, torch.bfloat16 if precision == "bf16" else torch.float32)
    if precision == "amp" and not args.fp32_base:
        model.cast_base_projections(torch.bfloat16)
    if args.attn:
        model.llm.set_attn_implementation(args.attn)
    if args.compile:
        model.compile_blocks()
    result = measure(
        model,
        args.seq,
        args.steps,
        device,
        args.checkpointing,
        args.profile,
        rss_before,
        chunk=None if args.full_logits else CHUNK,
        fused_adamw=not args.foreach_adamw,
        fused_lora=not args.plain_lora,
        autocast=precision == "amp",
        samples=args.samples,
    )
    names = ("plain_lora", "full_logits", "foreach_adamw", "fp32_base", "compile")
    levers = {k: getattr(args, k) for k in names if k != "fp32_base" or precision == "amp"}
    return {
        "strategy": strategy,
        "shape": args.shape,
        "seq": args.seq,
        "samples": args.samples,
        "attn": model.llm.config._attn_implementation,
        "device": device,
        "precision": precision,
        "checkpointing": args.checkpointing,
        "levers_off": [k for k, v in levers.items() if v and k != "compile"],
        "compile": args.compile,
        **result,
    }


def _print(rows: list[dict]) -> None:
    measured = [r for r in rows if "error" not in r]
    first = measured[0] if measured else {}
    if first:
        off = ", ".join(first["levers_off"]) or "none"
        print(f"{first['shape']} · seq {first['seq']} · {first['device']} {first['precision']} · ", end="")
        print(f"checkpointing {first['checkpointing']} · levers off: {off} · compile {first['compile']}")
    print(f"{'strategy':16} {'tok/s':>9} {'step s':>8} {'cpu s':>7} {'peak GiB':>9} {'vs full speed':>14} ", end="")
    print(f"{'(cpu time)':>10} {'vs full mem':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['strategy']:16} {r['error']}")
            continue
        print(
            f"{r['strategy']:16} {r['tokens_per_s']:9.0f} {r['step_s']:8.2f} {r['cpu_s']:7.2f} "
            f"{r['peak_bytes'] / 2**30:9.2f} {r.get('speed_vs_full', float('nan')):14.2f} "
            f"{r.get('cpu_time_vs_full', float('nan')):10.2f} {r.get('memory_vs_full', float('nan')):12.2f}"
        )
    if "aten_calls" not in first:
        return
    kernels = "kernels" in first
    print("\noperator calls per step (torch.profiler; aten ops nested ones included)")
    header = f"{'strategy':16} {'aten ops':>9}" + (f" {'kernels':>8}" if kernels else "")
    print(header + "".join(f" {name.removeprefix('aten::'):>7}" for name in OPS))
    for r in measured:
        line = f"{r['strategy']:16} {r['aten_calls']:9d}" + (f" {r['kernels']:8d}" if kernels else "")
        print(line + "".join(f" {r['ops'][name]:7d}" for name in OPS))


if __name__ == "__main__":
    main()
