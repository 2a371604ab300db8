"""Decode speed through the serving engine (`genieblue.infer.Engine`, what `genieblue serve` runs), per
decode mode: batch-1 tokens/s of the text path (the untouched base) and of the image path (copies +
LoRA), the text path against the memory-bandwidth bound (the weight bytes one step reads over the
measured copy bandwidth) and the image path against the text path, and the throughput of `--clients`
requests submitted at once against batch 1.

    python bench/decode.py                                             # built-in SmolLM2-135M, CPU
    python bench/decode.py --shape qwen2.5-3b --tokenizer DIR          # random 3B-shaped base, GPU, bf16
    python bench/decode.py --modes generate,graph,compile --json

Decode speed leaves the prefill out: (n - 1) tokens / (time for n tokens - time for 1), best of two.
Operator calls of one decode step per route (aten ops; on a GPU also kernels) are counted by
torch.profiler on the eager loop at batch 1: (calls of a 6-token decode - those of a 2-token one) / 4.
Modes: "generate" (transformers' generate), and the static-cache loop's "eager", "graph", "compile"
(see genieblue.infer.decode). Each request decodes exactly `--tokens` tokens (end of turn ignored).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import numpy as np
import torch
from PIL import Image
from prompts import QUESTIONS
from train_throughput import SHAPES, VISION, count_ops

from genieblue import GenieBlueForConditionalGeneration
from genieblue.data import GenieBlueProcessor, collate_prompts
from genieblue.infer.decode import StaticDecoder
from genieblue.infer.engine import Engine
from genieblue.model import load_tokenizer
from genieblue.model.placement import resolve_placement
from genieblue.model.routing import Switch


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second moved by a large tensor copy on `device` (each byte read once, written once)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model: GenieBlueForConditionalGeneration) -> dict[str, int]:
    """Bytes of LLM weights one decode step reads on each path (tied embeddings counted once, the
    input embedding not at all: a step reads one row of it; the vision tower runs in the prefill)."""
    delta = {id(p) for p in model.llm_delta_parameters()}
    switched = {id(p) for m in model.modules() if isinstance(m, Switch) for p in m.original.parameters()}
    embedding = model.llm.get_input_embeddings().weight
    tied = embedding is model.llm.get_output_embeddings().weight
    params = [p for p in model.llm.parameters() if tied or p is not embedding]  # deduplicated by parameters()
    text = sum(p.nbytes for p in params if id(p) not in delta)
    image = sum(p.nbytes for p in params if id(p) not in switched)
    return {"text": text, "image": image}


def build(shape: str, device: torch.device, dtype: torch.dtype, tokenizer: str | None):
    """(model, processor): the built-in SmolLM2 or a random-weight base of `shape`, a fresh delta."""
    torch.manual_seed(0)
    if shape == "builtin":
        model = GenieBlueForConditionalGeneration.from_base(None, device=device, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        with torch.device(device):
            llm = AutoModelForCausalLM.from_config(SHAPES[shape](), dtype=dtype)
        model = GenieBlueForConditionalGeneration.from_base(llm.eval(), vision=VISION, dtype=dtype)
    from transformers import AutoTokenizer

    tok = load_tokenizer(None) if tokenizer is None else AutoTokenizer.from_pretrained(tokenizer)
    return model.eval(), GenieBlueProcessor.from_model(model, tok)


def engine_rate(engine: Engine, image, rows: int, tokens: int) -> float:
    """Tokens per second of `rows` requests submitted together, each `tokens` long, prefill excluded."""

    def timed(n: int) -> float:
        start = time.perf_counter()
        requests = [
            engine.submit(
                [{"role": "user", "content": ("<image>\n" if image else "") + QUESTIONS[i % len(QUESTIONS)]}],
                [image] if image else [],
                max_tokens=n,
            )
            for i in range(rows)
        ]
        for r in requests:
            r.result()
        elapsed = time.perf_counter() - start
        if any(len(r.tokens) != n for r in requests):  # the rate would count tokens never decoded
            raise RuntimeError(f"a request stopped before its {n} tokens")
        return elapsed

    timed(tokens)  # warm-up: captures / compiles this shape
    return max(rows * (tokens - 1) / (timed(tokens) - timed(1)) for _ in range(2))


def ops_per_step(model, processor: GenieBlueProcessor, image) -> dict[str, dict]:
    """Operator calls of one eager decode step at batch 1, per route (see the module's docstring)."""
    decoder, out = StaticDecoder(model), {}
    for route, images in (("text", []), ("image", [image])):
        content = ("<image>\n" if images else "") + QUESTIONS[0]
        batch = collate_prompts([processor.prompt([{"role": "user", "content": content}], images)], processor.pad_id)
        decoder.generate(**batch, max_new_tokens=2)  # warm-up
        two, six = (count_ops(partial(decoder.generate, **batch, max_new_tokens=n), model.device.type) for n in (2, 6))
        out[route] = {k: (six[k] - two[k]) // 4 for k in ("aten_calls", "kernels") if k in six}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="builtin", help=f"builtin (SmolLM2-135M) or one of {list(SHAPES)}")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the built-in base's)")
    parser.add_argument("--device", help="default: cuda when present")
    parser.add_argument("--dtype", help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--modes", help="comma-separated decode modes (default: generate, and graph on a GPU)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--clients", type=int, default=16, help="requests submitted at once")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()

    device, dtype = resolve_placement(args.device, args.dtype)
    modes = args.modes.split(",") if args.modes else ["generate", *(["graph"] if device.type == "cuda" else [])]
    model, processor = build(args.shape, device, dtype, args.tokenizer)
    model.llm.generation_config.eos_token_id = None  # generate, too, decodes every request to its max_tokens
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    bandwidth = copy_bandwidth(device)
    weights = weight_bytes(model)
    result = {
        "model": f"{args.shape} + genieblue-skip (fresh delta), {str(dtype).removeprefix('torch.')}, {device}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "new_tokens": args.tokens,
        "copy_bandwidth_GBps": round(bandwidth / 1e9, 1),
        "weight_MB": {k: round(v / 1e6, 1) for k, v in weights.items()},
        "bound_tokens_per_s": {k: round(bandwidth / v, 1) for k, v in weights.items()},
        "ops_per_step": ops_per_step(model, processor, image),
        "modes": {},
    }
    for mode in modes:
        engine = Engine(model, processor, decode=mode)
        engine.eos_ids = set()  # every request decodes exactly its max_tokens
        start = time.perf_counter()
        row = {
            "text_batch1": engine_rate(engine, None, 1, args.tokens),
            "image_batch1": engine_rate(engine, image, 1, args.tokens),
            f"text_{args.clients}_at_once": engine_rate(engine, None, args.clients, args.tokens),
        }
        engine.close()
        row["warmup_and_runs_s"] = time.perf_counter() - start
        row["text_vs_bound"] = row["text_batch1"] / result["bound_tokens_per_s"]["text"]
        row["image_vs_text"] = row["image_batch1"] / row["text_batch1"]
        row["clients_vs_batch1"] = row[f"text_{args.clients}_at_once"] / row["text_batch1"]
        result["modes"][mode] = {k: round(v, 3 if "_vs_" in k else 1) for k, v in row.items()}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{result['model']} on {result['device']}: copy bandwidth {result['copy_bandwidth_GBps']} GB/s, "
        f"bound {result['bound_tokens_per_s']['text']} tok/s (text), {result['bound_tokens_per_s']['image']} (image)"
    )
    text, image = result["ops_per_step"]["text"], result["ops_per_step"]["image"]
    kernels = f", {text['kernels']} / {image['kernels']} kernels" if "kernels" in text else ""
    print(
        f"one decode step, eager, batch 1: text / image {text['aten_calls']} / {image['aten_calls']} aten ops{kernels}"
    )
    for mode, r in result["modes"].items():
        print(
            f"{mode:>9}: text {r['text_batch1']:7.1f} tok/s ({100 * r['text_vs_bound']:.0f}% of bound), image "
            f"{r['image_batch1']:7.1f} ({100 * r['image_vs_text']:.0f}% of text), {args.clients} at once "
            f"{r[f'text_{args.clients}_at_once']:8.1f} ({r['clients_vs_batch1']:.1f}x batch 1)"
        )


if __name__ == "__main__":
    main()
