"""Decode-speed benchmark on the built-in SmolLM2-135M with a fresh GenieBlue delta.

Prints batch-1 decode tokens/s of the text path (the untouched base) and of the image path (block
copies + LoRA), each next to its memory-bandwidth bound: the weight bytes one decode step reads
divided by the measured copy bandwidth (a large tensor copy, read + write). Also prints batch-8
throughput. Decode speed excludes the prefill: (n - 1) tokens / (time for n tokens - time for 1).

    python bench/decode.py [--tokens 32] [--batch 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image
from prompts import QUESTIONS

from genieblue.data import GenieBlueProcessor, collate_prompts
from genieblue.model import GenieBlueForConditionalGeneration, load_tokenizer
from genieblue.model.routing import Switch


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes per second moved by a large tensor copy (each byte read once and written once)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def weight_bytes(model: GenieBlueForConditionalGeneration) -> dict[str, int]:
    """Bytes of LLM weights one decode step reads on each path (tied embeddings counted once;
    the vision tower runs only in the prefill)."""
    delta = {id(p) for p in model.llm_delta_parameters()}
    switched = {id(p) for m in model.modules() if isinstance(m, Switch) for p in m.original.parameters()}
    params = list(model.llm.parameters())  # deduplicated: tied weights appear once
    text = sum(p.nbytes for p in params if id(p) not in delta)
    image = sum(p.nbytes for p in params if id(p) not in switched)
    return {"text": text, "image": image}


def decode_rate(model, batch: dict, tokens: int, repeats: int = 2) -> float:
    """Generated tokens per second over all rows, prefill excluded (best of `repeats`)."""

    def timed(n: int) -> float:
        start = time.perf_counter()
        model.generate(**batch, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        return time.perf_counter() - start

    rows = batch["input_ids"].shape[0]
    return max(rows * (tokens - 1) / (timed(tokens) - timed(1)) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per measurement")
    parser.add_argument("--batch", type=int, default=8, help="rows in the batched measurement")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GenieBlueForConditionalGeneration.from_base(None).eval()
    processor = GenieBlueProcessor.from_model(model, load_tokenizer(None))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))

    def batch(n: int, with_image: bool) -> dict:
        messages = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]
        prompts = [processor.prompt(m, [image] if with_image else []) for m in messages]
        return collate_prompts(prompts, processor.pad_id)

    bandwidth = copy_bandwidth()
    weights = weight_bytes(model)
    result = {
        "model": "SmolLM2-135M-Instruct + genieblue-skip (fresh delta), float32, CPU",
        "threads": torch.get_num_threads(),
        "new_tokens": args.tokens,
        "copy_bandwidth_GBps": round(bandwidth / 1e9, 2),
    }
    for path in ("text", "image"):
        with_image = path == "image"
        result[path] = {
            "weight_MB": round(weights[path] / 1e6, 1),
            "batch1_tokens_per_s": round(decode_rate(model, batch(1, with_image), args.tokens), 1),
            "bandwidth_bound_tokens_per_s": round(bandwidth / weights[path], 1),
            f"batch{args.batch}_tokens_per_s": round(decode_rate(model, batch(args.batch, with_image), args.tokens), 1),
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']}, {result['threads']} threads, copy bandwidth {result['copy_bandwidth_GBps']} GB/s")
    for path in ("text", "image"):
        r = result[path]
        print(
            f"{path:>5} path: {r['batch1_tokens_per_s']:7.1f} tok/s at batch 1 "
            f"(bound {r['bandwidth_bound_tokens_per_s']:.1f}, "
            f"{r['weight_MB']} MB/token), {r[f'batch{args.batch}_tokens_per_s']:7.1f} tok/s at batch {args.batch}"
        )


if __name__ == "__main__":
    main()
