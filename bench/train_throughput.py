"""Training throughput per strategy: tokens/s and peak memory of forward+backward+AdamW steps on a
random-weight model of any HF config (no download; the config is built from a name or JSON file).

    python bench/train_throughput.py                                  # SmolLM2-135M shape, CPU
    python bench/train_throughput.py --shape qwen2.5-3b --seq 4096    # the issue's GPU target shape
    python bench/train_throughput.py --json

Peak memory is torch.cuda.max_memory_allocated on a GPU and the process's peak RSS on a CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from genieblue import GenieBlueForConditionalGeneration
from genieblue.model import IMAGE_TOKEN_INDEX

SHAPES = {
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
    config = SHAPES[shape]() if shape in SHAPES else AutoConfig.from_pretrained(shape)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(config).to(device, dtype)
    model = GenieBlueForConditionalGeneration.from_base(llm, vision=VISION, strategy=strategy, dtype=dtype)
    return model.to(device)


def measure(model, seq: int, steps: int, device: str, checkpointing: bool) -> dict:
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    per = model.vision.tokens_per_tile
    ids = torch.randint(100, model.llm.config.vocab_size, (1, seq), device=device)
    ids[:, 8 : 8 + per] = IMAGE_TOKEN_INDEX
    pixels = torch.randn(1, 3, model.vision.image_size, model.vision.image_size, device=device)
    labels = ids.masked_fill(ids < 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):  # the first step warms up and is not timed
        start = time.perf_counter()
        model(ids, pixel_values=pixels, labels=labels, shared_base=True).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"tokens_per_s": seq * len(times) / sum(times), "step_s": sum(times) / len(times), "peak_bytes": peak}


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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    strategies = args.strategies.split(",")
    if device == "cpu" and len(strategies) > 1:  # peak RSS never goes down: one process per strategy
        rows = [_run_alone(strategy) for strategy in strategies]
    else:
        rows = []
        for strategy in strategies:
            model = build(args.shape, strategy, device, dtype)
            rows.append(
                {
                    "strategy": strategy,
                    "shape": args.shape,
                    "seq": args.seq,
                    "device": device,
                    **measure(model, args.seq, args.steps, device, args.checkpointing),
                }
            )
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    full = next((r for r in rows if r["strategy"] == "full"), None)
    for r in rows:
        if full:
            r["speed_vs_full"] = r["tokens_per_s"] / full["tokens_per_s"]
            r["memory_vs_full"] = r["peak_bytes"] / full["peak_bytes"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'strategy':16} {'tok/s':>9} {'step s':>8} {'peak GiB':>9} {'vs full speed':>14} {'vs full mem':>12}")
    for r in rows:
        print(
            f"{r['strategy']:16} {r['tokens_per_s']:9.0f} {r['step_s']:8.2f} {r['peak_bytes'] / 2**30:9.2f} "
            f"{r.get('speed_vs_full', float('nan')):14.2f} {r.get('memory_vs_full', float('nan')):12.2f}"
        )


if __name__ == "__main__":
    main()
