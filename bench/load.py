"""Load time of a saved delta against loading its base with `transformers` alone.

Writes a random-weight base of a real shape (default: Qwen2.5-0.5B-Instruct's) as bf16 safetensors
and a fresh genieblue-skip delta on it, then times, each in a fresh process and interleaved:

  * base:   transformers' `AutoModelForCausalLM.from_pretrained(base, dtype=...)`
  * first:  `GenieBlueForConditionalGeneration.from_pretrained(delta, dtype=...)` with an empty
            fingerprint cache (the base's files are hashed)
  * later:  the same with the cache the first load left (nothing hashed)

and the process's resident memory once each has loaded (the model held).

The delta's tower is the default (a small ResNet) or, with `--vision siglip-so400m`, the paper's
SigLIP-so400m shape (400M parameters, saved in the delta as any trained tower is).

    python bench/load.py [--shape qwen2.5-0.5b] [--vision resnet] [--dtype float32] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from recipe_3b import VISION as SO400M
from train_throughput import SHAPES as TRAIN_SHAPES
from transformers import AutoModelForCausalLM

SHAPES = {name: TRAIN_SHAPES[name] for name in ("qwen2.5-0.5b", "tiny")}

SO400M_TOWER = dict(SO400M, model_type="siglip_vision_model", num_attention_heads=16, downsample=1)  # as the recipe
TOWERS = {"resnet": None, "siglip-so400m": SO400M_TOWER}

SETUP = (
    "import resource, time, torch, transformers.models.qwen2.modeling_qwen2\n"  # the same imports before either clock
    "from transformers import AutoModelForCausalLM\n"
    "from genieblue import GenieBlueForConditionalGeneration\n"
)
TIMED = {
    "base": "AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.{dtype})",
    "genieblue": "GenieBlueForConditionalGeneration.from_pretrained({delta!r}, dtype=torch.{dtype}, device='cpu')",
}

RESIDENT = "resource.getpagesize() * int(open('/proc/self/statm').read().split()[1]) / 1e9"
"""Resident memory now, in GB (Linux), including pages of files the process maps (a safetensors
file's tensors are views of its mapping)."""


def timed(kind: str, base: Path, delta: Path, dtype: str, cache: Path) -> tuple[float, float]:
    """(seconds `kind` takes to load in a fresh process, the imports, the same for both, excluded;
    the process's resident memory in GB once loaded, the model held)."""
    load = TIMED[kind].format(base=str(base), delta=str(delta), dtype=dtype)
    code = f"{SETUP}t = time.perf_counter()\nmodel = {load}\nprint(time.perf_counter() - t, {RESIDENT})"
    env = {
        **os.environ,
        "GENIEBLUE_CACHE": str(cache),
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    seconds, resident = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(resident)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=list(SHAPES))
    parser.add_argument("--vision", default="resnet", choices=list(TOWERS), help="the delta's tower")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype to load in")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from transformers.utils import logging

    from genieblue import GenieBlueForConditionalGeneration

    logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        base, delta = root / "base", root / "delta"
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(SHAPES[args.shape](), dtype=torch.bfloat16).save_pretrained(base)
        os.environ["GENIEBLUE_CACHE"] = str(root / "cache-build")
        GenieBlueForConditionalGeneration.from_base(str(base), vision=TOWERS[args.vision]).save_pretrained(delta)
        rows = {"base": [], "first": [], "later": []}
        resident = {kind: [] for kind in rows}
        for r in range(args.rounds):
            cache = root / f"cache-{r}"
            for kind, loader in (("base", "base"), ("first", "genieblue"), ("later", "genieblue")):
                seconds, gb = timed(loader, base, delta, args.dtype, cache)
                rows[kind].append(seconds)
                resident[kind].append(gb)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        delta_size = sum(f.stat().st_size for f in delta.glob("*.safetensors"))
    median = {k: statistics.median(v) for k, v in rows.items()}
    result = {
        "shape": args.shape,
        "vision": args.vision,
        "delta_file_GB": round(delta_size / 1e9, 2),
        "base_file_GB": round(size / 1e9, 2),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "seconds": {k: [round(x, 3) for x in v] for k, v in rows.items()},
        "median_s": {k: round(v, 3) for k, v in median.items()},
        "resident_GB": {k: round(statistics.median(v), 2) for k, v in resident.items()},
        "first_vs_base": round(median["first"] / median["base"], 2),
        "later_vs_base": round(median["later"] / median["base"], 2),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{args.shape} base ({result['base_file_GB']} GB bf16 safetensors) and a {args.vision} delta "
        f"({result['delta_file_GB']} GB) loaded in {args.dtype} on CPU"
    )
    for kind, label in (("base", "transformers alone"), ("first", "genieblue, first load"), ("later", "later")):
        runs = ", ".join(f"{x:.2f}" for x in rows[kind])
        print(f"  {label:24} {median[kind]:6.2f} s, {result['resident_GB'][kind]:5.2f} GB resident   (runs: {runs})")
    print(f"  first / base = {result['first_vs_base']:.2f}x, later / base = {result['later_vs_base']:.2f}x")


if __name__ == "__main__":
    main()
