"""`genieblue eval mm`: multimodal benchmarks from local files, answered greedily by a GenieBlue model
(and a reference checkpoint), scored with each benchmark's standard metric and summarised per
benchmark with the average and the retention against the reference (Tables 4-5 style). Replies
are cached in `out/mm.cache.jsonl` as they are produced, so an interrupted run resumes."""

from __future__ import annotations

from pathlib import Path

from rich.progress import Progress

from ..loading import load_model_and_processor
from ..model.placement import resolve_placement
from .answers import answer_records
from .cache import ResultCache
from .report import retention_table, write_report
from .vqa_data import Benchmark, load_benchmark
from .vqa_metrics import extract_choice, score

STEM = "mm"
ROUTE = "image"  # the cache's path field: images always take the multimodal path


def _answer(
    model_dir: str,
    benchmarks: list[Benchmark],
    cache: ResultCache,
    llm: str | None,
    batch_size: int,
    max_new_tokens: int,
    progress: Progress | None,
    placement: tuple,
) -> None:
    """Reply to every item not yet in `cache`, a batch at a time, caching each batch."""
    todo = [(b, item) for b in benchmarks for item in b.items if f"{b.name}/{item['id']}" not in cache]
    if not todo:
        return
    model, processor = load_model_and_processor(model_dir, llm, *placement)
    task = progress.add_task(f"{model_dir}", total=len(todo)) if progress else None
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        replies = answer_records(
            model,
            processor,
            [item["record"] for _, item in chunk],
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )
        for (b, item), reply in zip(chunk, replies):
            cache[f"{b.name}/{item['id']}"] = reply
        if progress:
            progress.advance(task, len(chunk))


def _summary(benchmark: Benchmark, cache: ResultCache) -> dict:
    replies = [cache[f"{benchmark.name}/{item['id']}"] for item in benchmark.items]
    scores = [score(benchmark.metric, reply, item) for reply, item in zip(replies, benchmark.items)]
    out = {
        "score": sum(scores) / len(scores) if scores else None,
        "n": len(scores),
        "examples": [
            {"id": item["id"], "reply": reply, "answers": item["answers"], "score": s}
            for item, reply, s in list(zip(benchmark.items, replies, scores))[:3]
        ],
    }
    if benchmark.metric == "mc":
        out["no_choice_extracted"] = sum(
            extract_choice(r, item["options"]) is None for r, item in zip(replies, benchmark.items)
        )
    return out


def evaluate_mm(
    model_dir: str,
    data: list[str],
    out: str | Path,
    *,
    reference: str | None = None,
    llm: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    limit: int | None = None,
    progress: Progress | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> dict:
    """Score `model_dir` (and `reference`) on each benchmark spec `[NAME[:METRIC]=]FILE`; write
    mm.md/json/png in `out` and return the summary. The models run on `device` in `dtype` (default:
    a GPU in bfloat16 when there is one, else the CPU in float32). Raises ValueError for benchmarks
    with clashing names or no usable item, and what loading a model raises."""
    benchmarks = [load_benchmark(spec) for spec in data]
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark names must differ, got {', '.join(names)} (name them: NAME=FILE)")
    for b in benchmarks:
        b.items = b.items[:limit] if limit else b.items
        if not b.items:
            raise ValueError(f"{b.name}: no usable items ({b.n_skipped} skipped: {dict(b.skipped)})")
    out = Path(out)
    device, dtype = resolve_placement(device, dtype)
    settings = {"device": device, "dtype": dtype, "llm": llm, "max_new_tokens": max_new_tokens}
    models = {f"{reference} (reference)": reference} if reference else {}
    models[model_dir] = model_dir
    results = {}
    for label, folder in models.items():
        cache = ResultCache(out / f"{STEM}.cache.jsonl", str(Path(folder).resolve()), ROUTE, settings)
        _answer(folder, benchmarks, cache, llm, batch_size, max_new_tokens, progress, (device, dtype))
        results[label] = {b.name: _summary(b, cache) for b in benchmarks}
    scores = {label: {b: r["score"] for b, r in per.items()} for label, per in results.items()}
    table = retention_table(scores, next(iter(models)))
    details = {
        "model": model_dir,
        "reference": reference,
        "benchmarks": {
            b.name: {
                "metric": b.metric,
                "items": len(b.items),
                "skipped": b.n_skipped,
                "skipped_by_reason": dict(b.skipped),
            }
            for b in benchmarks
        },
        "results": results,
    }
    notes = (
        "Metrics: "
        + ", ".join(f"{b.name}: {b.metric} ({len(b.items)} items, {b.n_skipped} skipped)" for b in benchmarks)
        + ". Scores x100.\n"
    )
    files = write_report(out, STEM, "Multimodal benchmarks", table, details, "model", percent=True, notes=notes)
    return {"table": table, **details, "files": files}
