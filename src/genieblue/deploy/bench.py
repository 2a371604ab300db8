"""The paper's deployment table (Table 9) on this machine: text mode vs image mode of an exported
folder under onnxruntime - load time, ViT time, prefill and decode tokens/s, storage, peak memory.

Each mode runs in a fresh worker process (`python -m genieblue.deploy.bench MODE FOLDER ...`, numpy
and onnxruntime only) so its peak RSS is its own. Both modes prefill the same number of tokens (the
image prompt's placeholders count as prompt tokens) and decode the same number of tokens, greedily.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .runtime import MODE_GRAPHS, DeployedModel

PAPER = {"storage_overhead": 0.085, "decode_ratio": 31 / 33}
"""GenieBlue's phone numbers: image mode adds 8.5% storage and decodes at 31 vs 33 tokens/s."""
DECODE_TARGET = 0.97
"""Image-mode decode speed wanted, relative to text mode."""


def _status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MiB. VmHWM, unlike
    getrusage's maxrss, starts afresh at exec, so a worker never inherits its parent's peak."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def measure(folder: str | Path, mode: str, prompt_tokens: int = 64, new_tokens: int = 32,
            threads: int | None = None, repeats: int = 3) -> dict:
    """One mode in this process: load, [ViT], prefill `prompt_tokens`, decode `new_tokens` (best of
    `repeats` for the timings; memory as this process's peak resident set)."""
    model = DeployedModel(folder, threads)
    m = model.manifest
    rng = np.random.default_rng(0)
    before_load = _status_mb("VmRSS")
    start = time.perf_counter()
    model.load(mode)
    load_s = time.perf_counter() - start
    prompt = rng.integers(0, m["vocab_size"], (1, prompt_tokens))
    features = vit_s = None
    if mode == "image":
        size = m["image_size"]
        pixels = rng.standard_normal((1, 3, size, size)).astype(np.float32)
        model.image_features(pixels)  # warm-up
        vit = []
        for _ in range(repeats):
            start = time.perf_counter()
            features = model.image_features(pixels)
            vit.append(time.perf_counter() - start)
        vit_s = min(vit)
        if prompt_tokens < len(features) + 2:
            raise ValueError(f"an image prompt needs more than {len(features) + 1} tokens, got --prompt-tokens {prompt_tokens}")
        prompt[0, 1 : 1 + len(features)] = m["image_token_index"]
    later = None if features is None else features[:1]
    prefill, decode = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        logits, cache = model.step(prompt, model.empty_cache(), features)
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits, cache = model.step(logits.argmax(-1)[:, None], cache, later)
        decode.append(time.perf_counter() - start)
    files = model.files(mode)
    return {
        "mode": mode,
        "graphs": list(MODE_GRAPHS[mode]),
        "load_s": load_s,
        "vit_s": vit_s,
        "prefill_tokens_per_s": prompt_tokens / min(prefill),
        "decode_tokens_per_s": new_tokens / min(decode),
        "storage_bytes": sum((model.folder / f).stat().st_size for f in files),
        "files": files,
        "rss_before_load_mb": before_load,
        "peak_rss_mb": _status_mb("VmHWM"),
    }


def _worker(folder, mode: str, prompt_tokens: int, new_tokens: int, threads: int | None, repeats: int) -> dict:
    command = [sys.executable, "-m", "genieblue.deploy.bench", mode, str(folder), "--prompt-tokens",
               str(prompt_tokens), "--new-tokens", str(new_tokens), "--repeats", str(repeats)]
    if threads:
        command += ["--threads", str(threads)]
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    if run.returncode:
        last = run.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the {mode}-mode benchmark worker failed: {last[0]}")
    return json.loads(run.stdout)


def _best_of(runs: list[dict]) -> dict:
    """The fastest timings over runs (other load on the machine only ever slows a run down)."""
    best = dict(runs[0])
    for key in ("load_s", "vit_s"):
        if best[key] is not None:
            best[key] = min(r[key] for r in runs)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        best[key] = max(r[key] for r in runs)
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    best["runs"] = len(runs)
    return best


def table9(folder: str | Path, prompt_tokens: int = 64, new_tokens: int = 32, threads: int | None = None,
           repeats: int = 3, rounds: int = 2) -> dict:
    """Both modes, each in its own worker process, alternating for `rounds` rounds (so that other load
    on the machine hits both alike), and the targets: image-mode storage overhead vs the paper's
    +8.5%, no second copy of the base in memory, image decode >= 97% of text decode."""
    runs = {mode: [] for mode in MODE_GRAPHS}
    for _ in range(rounds):
        for mode in MODE_GRAPHS:
            runs[mode].append(_worker(folder, mode, prompt_tokens, new_tokens, threads, repeats))
    rows = {mode: _best_of(r) for mode, r in runs.items()}
    text, image = rows["text"], rows["image"]
    manifest = DeployedModel(folder).manifest
    base_mb = manifest["bytes"][manifest["data"]["base"]] / 2**20
    storage_overhead = image["storage_bytes"] / text["storage_bytes"] - 1
    decode_ratio = image["decode_tokens_per_s"] / text["decode_tokens_per_s"]
    extra_mb = image["peak_rss_mb"] - text["peak_rss_mb"]
    return {
        "folder": str(folder),
        "precision": manifest["precision"],
        "single_tile": manifest["single_tile"],
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "threads": threads,
        "rounds": rounds,
        "modes": rows,
        "delta_bytes": manifest["delta_parts"],
        "targets": {
            "storage_overhead": {"value": storage_overhead, "paper": PAPER["storage_overhead"],
                                 "met": storage_overhead <= PAPER["storage_overhead"]},
            "decode_ratio": {"value": decode_ratio, "paper": PAPER["decode_ratio"], "target": DECODE_TARGET,
                             "met": decode_ratio >= DECODE_TARGET},
            "single_base_in_memory": {"image_minus_text_peak_rss_mb": extra_mb, "base_data_mb": base_mb,
                                      "met": extra_mb < base_mb},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="One mode of the deployment benchmark (a worker of table9).")
    parser.add_argument("mode", choices=tuple(MODE_GRAPHS))
    parser.add_argument("folder")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.folder, args.mode, args.prompt_tokens, args.new_tokens, args.threads, args.repeats)))


if __name__ == "__main__":
    main()
