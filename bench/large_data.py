"""Time to first step and peak memory of `genieblue train` on a large JSONL file: writes N synthetic
text-ish records (LLaVA and LLaMA-Factory rows, a few with images), trains one step on the built-in
SmolLM2-135M in a subprocess and reports when that step began (the trainer prints its plan: data
read, checked, measured and packed, model built) and the subprocess's peak RSS; then trains again on
the same file, which reads back the scan the first run stored (`genieblue.data.scans`) instead of
every record. With `--processes N` training runs in N processes (DDP under torch's launcher), which
read a new file together, each its part of the records (`genieblue.data.scans`).

    python bench/large_data.py                       # 1,000,000 records, 100 of them with an image
    python bench/large_data.py --images 1000000 --processes 2
    python bench/large_data.py --records 100000 --json
    python bench/large_data.py --pythonpath /tmp/old/src   # the same file through another checkout

Records are read and checked before the first step, and measured: token counts exact for a
sample (the first 4096 and every 256th record) and estimated for the rest (`genieblue.data.lengths`);
pixels are decoded per step, so memory grows with the record count only by a few bytes per record.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from PIL import Image

WORDS = (
    "the of and a to in is you that it he was for on are as with his they I at be this have from or one had "
    "by word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write"
).split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_records(path: Path, n: int, with_images: int, llava_only: bool = False, seed: int = 0) -> None:
    """n records of 1-3 turns, alternating LLaVA and LLaMA-Factory rows (or LLaVA only, which
    older checkouts read); `with_images` of them (spread over the file) show one of 8 small PNGs."""
    rng = random.Random(seed)
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    for k in range(8):
        Image.new("RGB", (64, 48), (30 * k, 255 - 30 * k, 90)).save(path.parent / "images" / f"{k}.png")
    every = n // with_images if with_images else 0
    with path.open("w") as f:
        for i in range(n):
            turns = [
                (_sentence(rng, rng.randint(5, 30)) + "?", _sentence(rng, rng.randint(5, 60)))
                for _ in range(rng.randint(1, 3))
            ]
            image = f"images/{i % 8}.png" if every and i % every == 0 else None
            if i % 2 or llava_only:
                record = {
                    "id": f"r{i}",
                    "conversations": [{"from": s, "value": v} for q, a in turns for s, v in (("human", q), ("gpt", a))],
                }
                if image:
                    record["image"] = image
            else:
                record = {
                    "id": f"r{i}",
                    "messages": [
                        {"role": r, "content": c} for q, a in turns for r, c in (("user", q), ("assistant", a))
                    ],
                }
                if image:
                    record["images"] = [image]
            f.write(json.dumps(record) + "\n")


def peak_rss_mib(pid: int) -> dict[str, float]:
    """The peak RSS so far (VmHWM) of a process and of each of its descendants (a launcher's workers, of
    any of its threads), in MiB, named "rank N" for a process launched with a RANK, else "pid N"; {} for
    a process gone meanwhile."""
    proc = Path(f"/proc/{pid}")
    try:
        status = (proc / "status").read_text().splitlines()
        ranks = [e[5:].decode() for e in (proc / "environ").read_bytes().split(b"\0") if e.startswith(b"RANK=")]
        children = [int(c) for t in (proc / "task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        return {}
    name = f"rank {ranks[0]}" if ranks else f"pid {pid}"
    peaks = {name: next((int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:")), 0.0)}
    for child in children:
        peaks |= peak_rss_mib(child)
    return peaks


def train_run(cmd: list[str], env: dict) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """Run a `genieblue train` command (under a launcher or not) to its end: (seconds to its first step,
    to its end, the peak RSS of each of its processes by its first step, and by its end: `peak_rss_mib`).
    The trainer prints its plan ("... samples in ... rows") as its first step begins: the model built
    and placed, the data read, checked, measured and packed. Peaks are sampled every 0.1 s."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ready, ready_peaks, end_peaks, lines = [], {}, {}, []

    def sample() -> None:
        while proc.poll() is None:
            end_peaks.update(peak_rss_mib(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stderr:
        lines.append(line)
        if not ready and " samples in " in line:
            ready.append(time.perf_counter() - start)
            ready_peaks = peak_rss_mib(proc.pid)
    proc.wait()
    sampler.join()
    if proc.returncode or not ready:
        raise SystemExit(f"training failed ({proc.returncode}):\n{''.join(lines)[-3000:]}")
    return ready[0], time.perf_counter() - start, ready_peaks, end_peaks


def _train(config: Path, env: dict, processes: int) -> tuple[float, float, float]:
    """One `genieblue train -c config` in a subprocess (under torch's launcher for several processes):
    (seconds to its first step, to its end, largest peak RSS of a process in MiB by its first step)."""
    launch = (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    )
    cmd = [sys.executable, *launch, "-m", "genieblue.cli", "train", "-c", str(config)]
    ready, end, ready_peaks, _ = train_run(cmd, env)
    return ready, end, max(ready_peaks.values(), default=0.0)


def _private_scans(folder: Path) -> Path:
    """A cache folder that shares everything of genieblue's cache (the built-in base converted once)
    but its stored data scans, so that the first run here reads every record."""
    from genieblue.model.cache import cache_dir

    cache = folder / "cache"
    cache.mkdir(exist_ok=True)
    for entry in cache_dir().iterdir() if cache_dir().is_dir() else ():
        if entry.name != "scans" and not (cache / entry.name).exists():
            (cache / entry.name).symlink_to(entry)
    return cache


def run(
    records: int, images: int, folder: Path, pythonpath: str | None, max_length: int, llava_only: bool, processes: int
) -> dict:
    data = folder / "large.jsonl"
    t0 = time.perf_counter()
    write_records(data, records, images, llava_only)
    written = time.perf_counter() - t0
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), COLUMNS="200")
    env["GENIEBLUE_CACHE"] = str(_private_scans(folder))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    times = {}
    for run_name in ("run", "rerun"):  # the rerun finds the first one's stored scan
        config = folder / f"{run_name}.yaml"
        settings = {"data": [{"path": str(data)}], "stage": 2, "max_steps": 1, "batch_size": 1, "precision": "no"}
        settings |= {"output_dir": str(folder / run_name), "save_every": 10**9, "max_length": max_length}
        config.write_text(yaml.safe_dump(settings))
        times[run_name] = _train(config, env, processes)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "records": records,
        "with_images": images,
        "processes": processes,
        "file_mib": data.stat().st_size / 2**20,
        "write_s": written,
        "time_to_first_step_s": times["run"][0],
        "first_step_done_s": times["run"][1],
        "peak_rss_before_first_step_mib": times["run"][2],
        "rerun_time_to_first_step_s": times["rerun"][0],
        "rerun_peak_rss_before_first_step_mib": times["rerun"][2],
        "peak_rss_mib": peak_kib / 1024,
        "pythonpath": pythonpath,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--images", type=int, default=100, help="records that show an image")
    parser.add_argument("--folder", help="where to write the data and the run (default: a temporary folder)")
    parser.add_argument("--max-length", type=int, default=1024, help="packing length (the one step's cost)")
    parser.add_argument("--pythonpath", help="PYTHONPATH of the training subprocess (another checkout)")
    parser.add_argument("--llava-only", action="store_true", help="only LLaVA rows (what older checkouts read)")
    parser.add_argument("--processes", type=int, default=1, help="training processes (DDP), reading the data together")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        result = run(
            args.records,
            args.images,
            Path(args.folder or scratch),
            args.pythonpath,
            args.max_length,
            args.llava_only,
            args.processes,
        )
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{result['records']:,} records ({result['with_images']} with an image, {result['file_mib']:.0f} MiB), "
        f"{result['processes']} process(es): "
        f"first step after {result['time_to_first_step_s']:.1f} s (peak RSS by then "
        f"{result['peak_rss_before_first_step_mib']:.0f} MiB), peak RSS {result['peak_rss_mib']:.0f} MiB "
        f"(step done and model saved after {result['first_step_done_s']:.1f} s); run again on the same file "
        f"(its scan stored): first step after {result['rerun_time_to_first_step_s']:.1f} s"
    )


if __name__ == "__main__":
    main()
