"""`genieblue demo`: the whole method offline on a laptop CPU. It writes the synthetic dataset,
trains stages 0, 1 and 2 of GenieBlue (and any baselines asked for) on the built-in
SmolLM2-135M-Instruct, evaluates per-task accuracy against chance and text retention (logit equality,
text QA, perplexity: base vs non-shared vs shared path), and writes report.md, report.json and a chart.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console

from ._io import write_json
from .data import read_records
from .data.synthetic import (
    TASKS,
    caption_stream,
    generate_dataset,
    reading_exercises,
    task_info,
    text_only_samples,
)
from .demo_config import DemoConfig
from .eval.answers import answer_loss, answer_records, exact_match
from .eval.text import logit_equality, perplexity, text_qa
from .loading import load_model_and_processor
from .model import load_llm
from .plots import grouped_bars
from .train import DataSource, TrainConfig, Trainer

MAIN = "genieblue-skip"
LOSS_SAMPLE = 240  # test questions whose answer loss is measured with real and with shuffled images
SYSTEM_PROMPT = "Answer briefly."


class Demo:
    def __init__(self, cfg: DemoConfig, console: Console | None = None):
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        self.out = Path(cfg.out)
        self.timings: dict[str, float] = {}
        self.stage1_models: dict[int, Path] = {}  # training seed offset -> its stage-1 model folder
        self.stage2_sizes: dict[str, int] = {}  # stage-2 data source -> its record count (make_data)

    def _timed(self, name: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.timings[name] = round(time.perf_counter() - start, 1)
        return result

    # steps ------------------------------------------------------------------------------------
    def make_data(self) -> dict[str, Path]:
        cfg = self.cfg
        self.console.rule("synthetic data")
        paths = generate_dataset(
            self.out / "data", cfg.n_train, max(1, cfg.n_test // 4), cfg.n_test, cfg.seed, cfg.image_size
        )
        paths["text"] = self.out / "data" / "text.json"
        n_text = max(1, round(cfg.n_train * cfg.text_fraction))
        write_json(paths["text"], text_only_samples(n_text, cfg.seed))
        self.stage2_sizes = {"train": cfg.n_train, "text": n_text}
        if cfg.exercises:
            paths["exercises"] = self.out / "data" / "exercises.json"
            write_json(paths["exercises"], reading_exercises(cfg.exercises, cfg.seed, cfg.exercise_tasks))
            self.stage2_sizes["exercises"] = cfg.exercises
        return paths

    def run_name(self, strategy: str, k: int) -> str:
        return strategy if k == 0 else f"{strategy}-seed{self.cfg.seed + k}"

    def _common(self, strategy: str, seed: int, vision_lr: float) -> dict:
        cfg = self.cfg
        return dict(
            llm=cfg.llm,
            strategy=strategy,
            max_length=cfg.max_length,
            system_prompt=SYSTEM_PROMPT,
            seed=seed,
            save_every=50,
            keep_last=1,
            projector_lr=vision_lr,
            vit_lr=vision_lr,
            lr=cfg.full_lr if strategy == "full" else cfg.lr,
            device=cfg.device,
        )

    def stage1(self, data: dict[str, Path], k: int = 0) -> Path:
        """Stages 0 and 1 of training seed k, run once: the LLM is frozen there, so every strategy's
        stage 2 starts from the same tower and connector (as in the paper's comparison)."""
        if k in self.stage1_models:
            return self.stage1_models[k]
        cfg, name = self.cfg, self.run_name("stage1", k)
        root = self.out / "runs" / name
        shutil.rmtree(root, ignore_errors=True)  # a demo run always starts fresh
        self.console.rule(f"seed {cfg.seed + k}: stage 0 (vision tower) + stage 1 (connector)")
        stage1 = TrainConfig(
            stage=1,
            data=[DataSource(str(data["caption"]))],
            max_steps=cfg.stage1_steps,
            stage0_steps=cfg.stage0_steps,
            output_dir=str(root),
            **self._common(MAIN, cfg.seed + k, cfg.vision_lr),
        )
        tasks = tuple(t for t, n in cfg.stage0_weights.items() for _ in range(n))
        fresh = caption_stream(cfg.seed + k, cfg.image_size, tasks)
        self.stage1_models[k] = self._timed(f"{name}_s", Trainer(stage1, self.console, stage0_source=fresh).run)
        return self.stage1_models[k]

    def train(self, strategy: str, data: dict[str, Path], k: int = 0) -> Path:
        cfg, name = self.cfg, self.run_name(strategy, k)
        first = self.stage1(data, k)
        root = self.out / "runs" / name
        shutil.rmtree(root, ignore_errors=True)
        self.console.rule(f"{name}: stage 2 (ViT + connector + {strategy} delta)")
        # ratios = record counts: every record once per epoch
        sources = [DataSource(str(data[k]), n) for k, n in self.stage2_sizes.items()]
        stage2 = TrainConfig(
            stage=2,
            init_from=str(first),
            data=sources,
            epochs=cfg.stage2_epochs,
            output_dir=str(root / "stage2"),
            **self._common(strategy, cfg.seed + k, cfg.stage2_vision_lr),
        )
        return self._timed(f"{name}/stage2_s", Trainer(stage2, self.console).run)

    def evaluate(self, strategy: str, model_dir: Path, data: dict[str, Path], k: int = 0) -> dict:
        """Test accuracy per task, and text QA / perplexity on the path this strategy deploys for text.
        For the main strategy's first seed, also the test loss with real vs shuffled images and the
        retention comparison against an independently loaded base."""
        name = self.run_name(strategy, k)
        self.console.rule(f"{name}: evaluation")
        start = time.perf_counter()
        model, processor = load_model_and_processor(model_dir, self.cfg.llm, self.cfg.device, self.cfg.dtype)
        tok = processor.tokenizer
        test = read_records(data["test"])
        mm = exact_match(test, answer_records(model, processor, test, batch_size=48, max_new_tokens=4))
        non_shared = model.deploys_base_for_text  # only GenieBlue keeps a separate text path
        qa = text_qa(model, processor, shared_base=not non_shared)
        result = {
            "multimodal": mm,
            "deployed_text_path": "non-shared base" if non_shared else "shared (fine-tuned) model",
            "text_qa_deployed": qa["accuracy"],
            "perplexity_deployed": perplexity(model, tok, shared_base=not non_shared),
        }
        if strategy == MAIN and k == 0:
            sample = test[:LOSS_SAMPLE]  # tasks round-robin: every task alike
            result["test_loss"] = {
                "real_images": answer_loss(model, processor, sample, batch_size=48),
                "shuffled_images": answer_loss(model, processor, sample, shuffle_images=True, batch_size=48),
                "n": len(sample),
            }
            result["retention"] = self.retention(model, processor, qa, test)
        self.timings[f"{name}/eval_s"] = round(time.perf_counter() - start, 1)
        self.console.print(
            f"{name}: multimodal accuracy {mm['accuracy']:.3f} · text QA (deployed) {qa['accuracy']:.3f}"
        )
        return result

    def retention(self, model, processor, qa_non_shared: dict, test: list[dict]) -> dict:
        """The non-shared and shared text paths against an independently loaded base, three ways,
        plus sample conversations with and without an image."""
        base = load_llm(self.cfg.llm, model.llm.dtype, model.device).eval()  # the same device and dtype
        tok = processor.tokenizer
        qa = {
            "base": text_qa(base, processor),
            "non_shared": qa_non_shared,
            "shared": text_qa(model, processor, shared_base=True),
        }
        report = {
            "logit_equality_non_shared": logit_equality(model, base, tok, shared_base=False),
            "logit_equality_shared": logit_equality(model, base, tok, shared_base=True),
            "text_qa": {k: v["accuracy"] for k, v in qa.items()},
            "text_qa_replies_identical": qa["base"]["replies"] == qa["non_shared"]["replies"],
            "perplexity": {
                "base": perplexity(base, tok),
                "non_shared": perplexity(model, tok, False),
                "shared": perplexity(model, tok, True),
            },
        }
        picks = [next(r for r in test if r["task"] == t) for t in TASKS]
        replies = answer_records(model, processor, picks, max_new_tokens=8)
        report["samples"] = [
            {
                "image": r["images"][0],
                "question": r["conversations"][0]["value"].replace("<image>\n", ""),
                "reference": r["conversations"][1]["value"],
                "reply": reply,
            }
            for r, reply in zip(picks, replies)
        ] + [
            {"image": None, "question": x["question"], "reference": x["reference"], "reply": x["reply"]}
            for x in qa["non_shared"]["replies"][:3]
        ]
        return report

    # whole run --------------------------------------------------------------------------------
    def run(self) -> dict:
        torch.manual_seed(self.cfg.seed)
        start = time.perf_counter()
        data = self._timed("data_s", self.make_data)
        strategies = [MAIN] + [s for s in self.cfg.compare if s != MAIN]
        runs = {
            s: [self.evaluate(s, self.train(s, data, k), data, k) for k in range(self.cfg.seeds)] for s in strategies
        }
        results = {s: r[0] for s, r in runs.items()}
        self.timings["total_s"] = round(time.perf_counter() - start, 1)
        report = {
            "config": asdict(self.cfg),
            "tasks": {t: asdict(task_info(t)) for t in TASKS},
            "results": results,
            "retention": results[MAIN].pop("retention"),
            "timings": self.timings,
            "seeds": seed_summary(runs) if self.cfg.seeds > 1 else None,
            "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
        }
        write_json(self.out / "report.json", report)
        self._chart(report)
        (self.out / "report.md").write_text(render_markdown(report))
        self.console.print(
            f"[bold green]done[/bold green] in {self.timings['total_s'] / 60:.1f} min · {self.out / 'report.md'}"
        )
        return report

    def _chart(self, report: dict) -> None:
        series = {s: [r["multimodal"]["per_group"].get(t, 0.0) for t in TASKS] for s, r in report["results"].items()}
        grouped_bars(
            list(TASKS),
            series,
            self.out / "accuracy.png",
            "test accuracy per task vs chance",
            "accuracy",
            reference=[report["tasks"][t]["chance"] for t in TASKS],
        )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _mean_sd(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    return {"mean": mean, "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def seed_summary(runs: dict[str, list[dict]]) -> dict:
    """Per strategy, mean and sd over seeds of each task's accuracy, overall accuracy and the deployed
    text path's perplexity; and each strategy's overall accuracy as a ratio to full fine-tuning's,
    with its standard error (delta method over the two means)."""
    out = {}
    for name, results in runs.items():
        accuracy = [r["multimodal"]["accuracy"] for r in results]
        out[name] = {
            "seeds": len(results),
            "accuracy": _mean_sd(accuracy),
            "per_task": {t: _mean_sd([r["multimodal"]["per_group"].get(t, 0.0) for r in results]) for t in TASKS},
            "perplexity_deployed": _mean_sd([r["perplexity_deployed"] for r in results]),
            "text_qa_deployed": _mean_sd([r["text_qa_deployed"] for r in results]),
        }
    full = out.get("full", {}).get("accuracy")
    for summary in out.values():
        if full and full["mean"] > 0:
            mine, n = summary["accuracy"], summary["seeds"]
            ratio = mine["mean"] / full["mean"]
            rel = math.sqrt(
                (mine["sd"] / mine["mean"]) ** 2 / n + (full["sd"] / full["mean"]) ** 2 / out["full"]["seeds"]
            )
            summary["vs_full"] = {"ratio": ratio, "se": ratio * rel}
    return out


def comparison_rows(results: dict) -> list[dict]:
    """Table-5/6-style rows: multimodal score, retention vs full fine-tuning, text score, text retention."""
    full = results.get("full", {}).get("multimodal", {}).get("accuracy")
    base_qa = results[MAIN]["text_qa_deployed"]  # GenieBlue's text path is the base itself
    rows = []
    for name, r in results.items():
        mm = r["multimodal"]["accuracy"]
        rows.append(
            {
                "strategy": name,
                "multimodal": mm,
                "mm_vs_full": mm / full if full else None,
                "text_qa": r["text_qa_deployed"],
                "text_retention": r["text_qa_deployed"] / base_qa if base_qa else None,
                "perplexity": r["perplexity_deployed"],
                "text_path": r["deployed_text_path"],
            }
        )
    return rows


def _interval(bounds) -> str:
    return f"{100 * bounds[0]:.1f}-{100 * bounds[1]:.1f}%"


def _seed_lines(seeds: dict) -> list[str]:
    n = max(s["seeds"] for s in seeds.values())
    lines = [
        f"## Over {n} training seeds (same data): mean +- sd",
        "",
        "| strategy | " + " | ".join(TASKS) + " | all | vs full FT | perplexity (deployed text path) |",
        "|---|" + "---|" * (len(TASKS) + 3),
    ]
    for name, s in seeds.items():
        cells = [f"{100 * s['per_task'][t]['mean']:.1f} +- {100 * s['per_task'][t]['sd']:.1f}" for t in TASKS]
        vs = f"{100 * s['vs_full']['ratio']:.1f}% +- {100 * s['vs_full']['se']:.1f}" if "vs_full" in s else "-"
        ppl = s["perplexity_deployed"]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | **{100 * s['accuracy']['mean']:.1f} +- "
            f"{100 * s['accuracy']['sd']:.1f}** | {vs} | {ppl['mean']:.2f} +- {ppl['sd']:.2f} |"
        )
    return lines + [""]


def render_markdown(report: dict) -> str:
    ret, tasks = report["retention"], report["tasks"]
    eq, eq_shared = ret["logit_equality_non_shared"], ret["logit_equality_shared"]
    qa, ppl = ret["text_qa"], ret["perplexity"]
    main, loss = report["results"][MAIN]["multimodal"], report["results"][MAIN]["test_loss"]
    lines = [
        "# GenieBlue demo report",
        "",
        f"Base LLM: `{report['config']['llm'] or 'SmolLM2-135M-Instruct (built-in)'}` · vision: small ResNet trained "
        f"from scratch · {report['config']['n_train']} training images · "
        f"total time {report['timings']['total_s'] / 60:.1f} min.",
        "",
        f"## Multimodal accuracy (genieblue-skip, test split, n = {main['n']})",
        "",
        "| task | accuracy | 95% interval | n | chance |",
        "|---|---|---|---|---|",
        *(
            f"| {t} | {_pct(main['per_group'].get(t, 0))} | {_interval(main['per_group_interval'][t])} | "
            f"{main['per_group_n'][t]} | {_pct(tasks[t]['chance'])} |"
            for t in tasks
            if t in main["per_group"]
        ),
        f"| **all** | **{_pct(main['accuracy'])}** | {_interval(main['interval'])} | {main['n']} | |",
        "",
        f"Test loss per answer token on {loss['n']} questions (does the model use the image?): "
        f"{loss['real_images']:.3f} with each question's own image, {loss['shuffled_images']:.3f} with another "
        "question's image.",
        "",
        "![accuracy per task](accuracy.png)",
        "",
        "## Text retention: base vs non-shared text path vs shared-base path",
        "",
        "| measure | base | non-shared (GenieBlue) | shared base |",
        "|---|---|---|---|",
        f"| logits bit-identical to base | - | {eq['bit_identical']}/{eq['prompts']} "
        f"| {eq_shared['bit_identical']}/{eq_shared['prompts']} (max diff {eq_shared['max_abs_diff']:.3g}) |",
        f"| text QA accuracy | {_pct(qa['base'])} | {_pct(qa['non_shared'])} | {_pct(qa['shared'])} |",
        f"| held-out perplexity | {ppl['base']:.3f} | {ppl['non_shared']:.3f} | {ppl['shared']:.3f} |",
        "",
        f"Text QA replies identical to the base's: {ret['text_qa_replies_identical']}.",
        "",
    ]
    if len(report["results"]) > 1:
        lines += [
            "## Strategies on the same data and budget (Table 5/6 style)",
            "",
            "| strategy | multimodal acc | vs full FT | text QA (deployed path) | text retention | perplexity "
            "| text path |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in comparison_rows(report["results"]):
            vs = _pct(row["mm_vs_full"]) if row["mm_vs_full"] is not None else "-"
            tr = _pct(row["text_retention"]) if row["text_retention"] is not None else "-"
            lines.append(
                f"| {row['strategy']} | {_pct(row['multimodal'])} | {vs} | {_pct(row['text_qa'])} | {tr} | "
                f"{row['perplexity']:.3f} | {row['text_path']} |"
            )
        lines.append("")
    if report.get("seeds"):
        lines += _seed_lines(report["seeds"])
    lines += ["## Sample conversations", "", "| image | question | reference | reply |", "|---|---|---|---|"]
    for s in ret["samples"]:
        image = (
            f"![]({Path(s['image']).relative_to(Path(report['config']['out']).resolve())})" if s["image"] else "(none)"
        )
        lines.append(f"| {image} | {s['question']} | {s['reference']} | {s['reply'].strip()} |")
    lines += ["", "## Timings (seconds)", "", "```", json.dumps(report["timings"], indent=2), "```", ""]
    return "\n".join(lines)
