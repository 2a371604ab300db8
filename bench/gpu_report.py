"""The tables of a `bench/gpu.sh` run, in Markdown, each target beside its number: what a results page
records, read from the run's OUT folder (a stage without a result says why: not run, skipped, or
failed with its status and .err file).

    python bench/gpu_report.py OUT            # gpu.sh writes OUT/report.md with it at its end

Targets: the training step (genieblue-skip and LoRA everywhere against full fine-tuning, with and
without gradient checkpointing; genieblue-skip's peak memory), decode through the serving engine
(text path against the memory-bandwidth bound, image path against text, `serve` under 16 clients
against 1) and the script's own time.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

TRAIN = {  # run -> {strategy: least speed vs full}, for the runs whose ratios have targets
    "train_throughput": {"genieblue-skip": 1.3, "lora": 1.4},
    "train_throughput_ckpt": {"genieblue-skip": 1.2, "lora": 1.25},
}
SKIP_MEMORY = 0.6  # genieblue-skip's peak memory vs full's, at most, without checkpointing
TEXT_OF_BOUND, IMAGE_OF_TEXT, CLIENTS_GAIN = 0.4, 0.9, 5.0
SCRIPT_S = 360  # the whole script, at most (6 minutes)


def _json(path: Path):
    """The JSON a stage printed (the last line that parses, or the whole file), or None."""
    if not path.is_file():
        return None
    text = path.read_text()
    try:
        return json.loads(text)
    except ValueError:
        for line in reversed(text.splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _mark(value: float, target: float, at_most: bool = False) -> str:
    return "met" if (value <= target if at_most else value >= target) else "**not met**"


def _laps(out: Path) -> list[tuple[str, str, str]]:
    """(stage, status, seconds since the start) of each line of the run's summary.txt, in order."""
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").is_file() else ""
    return re.findall(r"^== (\w+): (.*) at (\d+) s$", summary, re.M)


def _absent(out: Path, name: str) -> str:
    """Why stage `name` left no result: its status in summary.txt, or that it did not run."""
    status = next((s for n, s, _ in _laps(out) if n == name), None)
    if status is None:
        return "not run"
    return f"failed ({status}; see {name}.err)" if status.startswith("rc=") else status


def train(out: Path) -> list[str]:
    lines = ["## Training step (`bench/train_throughput.py`)", ""]
    runs = [name for name, _, _ in _laps(out) if name.startswith(("train_throughput", "train_packed_"))]
    if not runs:
        return lines + ["not run", ""]
    lines += ["| run | strategy | tokens/s | vs full | target | peak GiB | vs full |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        rows = _json(out / f"{run}.log")
        if not isinstance(rows, list):
            lines.append(f"| {run} | {_absent(out, run)} | | | | | |")
            continue
        for r in rows:
            if "error" in r:
                lines.append(f"| {run} | {r['strategy']} | {r['error']} | | | | |")
                continue
            speed, memory = r.get("speed_vs_full"), r.get("memory_vs_full")
            target = TRAIN.get(run, {}).get(r["strategy"])
            mark = f">= {target}: {_mark(speed, target)}" if target and speed else ""
            if run == "train_throughput" and r["strategy"] == "genieblue-skip" and memory:
                mark += f"; memory <= {SKIP_MEMORY}: {_mark(memory, SKIP_MEMORY, at_most=True)}"
            lines.append(
                f"| {run} | {r['strategy']} | {r['tokens_per_s']:.0f} | {_ratio(speed)} | {mark} | "
                f"{r['peak_bytes'] / 2**30:.1f} | {_ratio(memory)} |"
            )
    return lines + [""]


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def decode(out: Path) -> list[str]:
    lines = ["## Decode through the serving engine (`bench/decode.py`, `bench/serve_load.py`)", ""]
    for name in ("decode", "decode_compile"):
        result = _json(out / f"{name}.log")
        if not isinstance(result, dict):
            lines += [f"{name}: {_absent(out, name)}", ""]
            continue
        bound = result["bound_tokens_per_s"]
        lines += [
            f"{name}: {result['model']} on {result['device']}: copy bandwidth {result['copy_bandwidth_GBps']} GB/s, "
            f"bound {bound['text']} tokens/s (text), {bound['image']} (image); one eager step at batch 1: "
            + ", ".join(
                f"{route} {ops['aten_calls']} aten calls" + (f" ({ops['kernels']} kernels)" if "kernels" in ops else "")
                for route, ops in result["ops_per_step"].items()
            ),
            "",
            f"| mode | text, batch 1 | of the bound (>= {TEXT_OF_BOUND:.0%}) | image, batch 1 | image / text "
            f"(>= {IMAGE_OF_TEXT:.0%}) | many at once | vs batch 1 |",
            "|---|---|---|---|---|---|---|",
        ]
        for mode, r in result["modes"].items():
            many = next(v for k, v in r.items() if k.endswith("_at_once"))
            text, image = r["text_vs_bound"], r["image_vs_text"]
            lines.append(
                f"| {mode} | {r['text_batch1']} | {text:.1%} {_mark(text, TEXT_OF_BOUND)} | {r['image_batch1']} | "
                f"{image:.1%} {_mark(image, IMAGE_OF_TEXT)} | {many} | {r['clients_vs_batch1']:.1f}x |"
            )
        lines.append("")
    served = _json(out / "serve_load.log")
    if isinstance(served, list) and len(served) >= 2:
        one, many = served[0], served[-1]
        gain = many["throughput_tokens_per_s"] / one["throughput_tokens_per_s"]
        lines += [
            f"`serve`: {one['throughput_tokens_per_s']:.1f} tokens/s with {one['clients']} client, "
            f"{many['throughput_tokens_per_s']:.1f} with {many['clients']}: {gain:.1f}x "
            f"(>= {CLIENTS_GAIN:.0f}x: {_mark(gain, CLIENTS_GAIN)})",
        ]
    else:
        lines.append(f"serve: {_absent(out, 'serve_load')}")
    return lines + [""]


def recipe(out: Path) -> list[str]:
    lines = ["## The recipe through the CLI (`genieblue train`, tokens/s a step)", ""]
    for name in ("train_plain", "train_attn"):
        path = out / f"{name}_metrics.jsonl"
        steps = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        rates = ", ".join(f"{r['tokens_per_s']:.0f}" for r in steps)
        lines.append(
            f"- {name}: "
            + (f"{rates} (loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f})" if steps else _absent(out, name))
        )
    return lines + [""]


def checks(out: Path) -> list[str]:
    lines = ["## The text path and sharded training", ""]
    for name in ("text_exact", "text_exact_compile", "fsdp_check"):
        found = _json(out / f"{name}.log")
        lines.append(f"- {name}: " + (json.dumps(found) if found is not None else _absent(out, name)))
    return lines + [""]


def script(out: Path) -> list[str]:
    laps = _laps(out)
    lines = ["## The script", ""]
    env = out / "env.txt"
    lines += [f"    {line}" for line in env.read_text().splitlines()] + [""] if env.is_file() else []
    lines += ["| stage | status | at s |", "|---|---|---|"]
    lines += [f"| {name} | {status[:60]} | {at} |" for name, status, at in laps]
    total = next((int(at) for name, _, at in laps if name == "total"), None)
    if total is None:
        return lines + [""]
    # the target is the whole script's: judged on a run of every stage, none skipped or failed
    partial = [
        name
        for name, status, _ in laps
        if status.startswith("skipped") or status.startswith("rc=") and status != "rc=0"
    ]
    if " (all)" not in (env.read_text() if env.is_file() else ""):
        partial.insert(0, "not every stage asked")
    verdict = f"not judged: {', '.join(partial)}" if partial else _mark(total, SCRIPT_S, at_most=True)
    return lines + ["", f"whole script: {total} s (< {SCRIPT_S} s: {verdict})", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the OUT folder of a bench/gpu.sh run")
    out = parser.parse_args().out
    if not out.is_dir():
        raise SystemExit(f"error: no such folder: {out}")
    print(
        "\n".join(["# bench/gpu.sh", "", *script(out), *recipe(out), *train(out), *decode(out), *checks(out)]).rstrip()
    )


if __name__ == "__main__":
    main()
