"""`genieblue eval text`: lm-eval tasks (built-in ones such as gsm8k or mmlu, or local task YAMLs
through `include_path`) on the base LLM, the non-shared text path, the shared-base path and the
deployed text path of any other checkpoint, summarised as a Table-6-style retention table."""

from __future__ import annotations

import gc
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from ..loading import load_model_and_processor
from ..model import DEFAULT_LLM, GenieBlueForConditionalGeneration, load_llm
from ..model.folder import read_manifest
from ..model.placement import resolve_placement
from .cache import ResultCache
from .harness import PATHS, GenieBlueLM
from .report import retention_table, write_report

STEM = "text"


def task_manager(tasks: list[str], include_path: list[str] | None = None) -> TaskManager:
    """lm-eval's task index. Its ~15k built-in tasks are indexed (which takes a while) only when a
    requested task is neither a YAML file nor found under `include_path`."""
    include_path = [str(p) for p in include_path or []]
    for folder in include_path:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"task folder not found: {folder}")
    local = TaskManager(include_path=include_path or None, include_defaults=False)
    if all(t in local.all_tasks or Path(t).is_file() for t in tasks):
        return local
    manager = TaskManager(include_path=include_path or None)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        raise ValueError(
            f"unknown lm-eval tasks: {', '.join(unknown)} (see `lm-eval ls tasks`, or give --include-path)"
        )
    return manager


def deployed_path(model: GenieBlueForConditionalGeneration) -> str:
    """The harness path a checkpoint is deployed with (`deploys_base_for_text`)."""
    return "non-shared" if model.deploys_base_for_text else "shared"


def _headline(results: dict) -> dict[str, dict]:
    """Per top-level task (group members folded into their group): its first reported metric."""
    members = {t for subtasks in results.get("group_subtasks", {}).values() for t in subtasks}
    out = {}
    for task, metrics in results["results"].items():
        if task in members:
            continue
        key, value = next(
            (k, v) for k, v in metrics.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))
        )
        metric = key.split(",")[0]
        out[task] = {
            "metric": key,
            "score": float(value),
            "higher_is_better": results.get("higher_is_better", {}).get(task, {}).get(metric, True),
        }
    return out


def evaluate_text(
    model_dir: str | Path,
    tasks: list[str],
    out: str | Path,
    *,
    paths: tuple[str, ...] = PATHS,
    compare: tuple[str, ...] = (),
    llm: str | None = None,
    include_path: list[str] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    chat_template: bool = False,
) -> dict:
    """Run `tasks` on each text path of `model_dir` (and the deployed path of each `compare`
    checkpoint); write text.md/json/png in `out` and return the summary. Finished requests are kept
    in `out/text.cache.jsonl`, so an interrupted run resumes. Every path runs on `device` in `dtype`
    (default: a GPU in bfloat16 when there is one, else the CPU in float32), the base too."""
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise ValueError(f"paths must be some of {', '.join(PATHS)}, got {', '.join(paths) or 'none'}")
    for folder in (model_dir, *compare):  # before any is evaluated: a mistyped --compare is found at once
        read_manifest(folder)
    manager = task_manager(tasks, include_path)
    out = Path(out)
    cache_file = out / f"{STEM}.cache.jsonl"
    settings = dict(
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        apply_chat_template=chat_template,
        log_samples=False,
    )

    def run(subject, path: str, tokenizer, name: str) -> dict:
        lm = GenieBlueLM(
            subject,
            path,
            tokenizer=tokenizer,
            device=device,
            batch_size=batch_size,
            resume_cache=ResultCache(cache_file, name, path, {"device": device, "dtype": dtype, "llm": llm}),
        )
        return _headline(simple_evaluate(model=lm, **settings))

    device, dtype = resolve_placement(device, dtype)
    model, processor = load_model_and_processor(model_dir, llm, device, dtype)
    runs = {}
    for path in paths:
        if path == "base":
            spec = llm or model.base_spec
            base = load_llm(spec, dtype, device)
            runs["base"] = run(base, "base", processor.tokenizer, str(spec or DEFAULT_LLM))
        else:
            runs[path] = run(model, path, processor.tokenizer, str(Path(model_dir).resolve()))
    del model
    for other in compare:
        gc.collect()
        model, processor = load_model_and_processor(other, llm, device, dtype)
        path = deployed_path(model)
        runs[f"{other} ({path})"] = run(model, path, processor.tokenizer, str(Path(other).resolve()))
        del model

    scores = {label: {t: r["score"] for t, r in run.items()} for label, run in runs.items()}
    lower = {t for run in runs.values() for t, r in run.items() if not r["higher_is_better"]}
    table = retention_table(scores, "base" if "base" in runs else next(iter(runs)), lower)
    metrics = {t: r["metric"] for run in runs.values() for t, r in run.items()}
    details = {
        "model": str(model_dir),
        "tasks": tasks,
        "metrics": metrics,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "chat_template": chat_template,
    }
    notes = "Metrics: " + ", ".join(f"{t}: {m}" for t, m in metrics.items()) + ". Scores x100.\n"
    files = write_report(out, STEM, "Text retention (lm-eval)", table, details, "text path", percent=True, notes=notes)
    return {"table": table, **details, "files": files}
