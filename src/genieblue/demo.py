"""`genieblue demo`: the whole method offline on a laptop CPU. It writes the synthetic dataset,
trains stage 1 and stage 2 of GenieBlue (and any baselines asked for) on the built-in
SmolLM2-135M-Instruct, evaluates per-task accuracy against chance and text retention (logit equality,
text QA, perplexity: base vs non-shared vs shared path), and writes report.md, report.json and charts.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from ._io import write_json
from .data import load_model_and_processor, read_records
from .data.synthetic import TASKS, generate_dataset, task_info, text_only_samples
from .eval.answers import answer_records, exact_match
from .eval.text import logit_equality, perplexity, text_qa
from .model import load_llm
from .plots import grouped_bars
from .train import DataSource, TrainConfig, Trainer

MAIN = "genieblue-skip"
SYSTEM_PROMPT = "Answer briefly."


@dataclass
class DemoConfig:
    out: str = "demo_out"
    llm: str | None = None
    compare: list[str] = field(default_factory=list)
    n_train: int = 1200
    n_test: int = 240
    text_fraction: float = 0.1  # text-only samples mixed into stage 2
    stage0_steps: int = 200  # vision tower alignment before stage 1 (see train.vision_pretrain)
    stage1_steps: int = 25
    stage2_epochs: float = 1.0
    max_length: int = 640  # ~12 samples per packed row: one optimizer step
    lr: float = 2e-4  # copies / experts / LoRA / full weights
    vision_lr: float = 2e-3  # from-scratch ViT (top block) and projector
    image_size: int = 64
    seed: int = 0


class Demo:
    def __init__(self, cfg: DemoConfig, console: Console | None = None):
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        self.out = Path(cfg.out)
        self.timings: dict[str, float] = {}

    def _timed(self, name: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.timings[name] = round(time.perf_counter() - start, 1)
        return result

    # steps ------------------------------------------------------------------------------------
    def make_data(self) -> dict[str, Path]:
        cfg = self.cfg
        self.console.rule("synthetic data")
        paths = generate_dataset(self.out / "data", cfg.n_train, max(1, cfg.n_test // 4), cfg.n_test, cfg.seed, cfg.image_size)
        paths["text"] = self.out / "data" / "text.json"
        write_json(paths["text"], text_only_samples(max(1, round(cfg.n_train * cfg.text_fraction)), cfg.seed))
        return paths

    def train(self, strategy: str, data: dict[str, Path]) -> Path:
        cfg, root = self.cfg, self.out / "runs" / strategy
        shutil.rmtree(root, ignore_errors=True)  # a demo run always starts fresh
        common = dict(llm=cfg.llm, strategy=strategy, max_length=cfg.max_length, system_prompt=SYSTEM_PROMPT,
                      seed=cfg.seed, save_every=50, keep_last=1, projector_lr=cfg.vision_lr, vit_lr=cfg.vision_lr, lr=cfg.lr)
        self.console.rule(f"{strategy}: stage 0 (vision tower) + stage 1 (projector)")
        stage1 = TrainConfig(stage=1, data=[DataSource(str(data["caption"]))], max_steps=cfg.stage1_steps,
                             stage0_steps=cfg.stage0_steps, output_dir=str(root / "stage1"), **common)
        first = self._timed(f"{strategy}/stage1_s", Trainer(stage1, self.console).run)
        self.console.rule(f"{strategy}: stage 2 (ViT + projector + {strategy} delta)")
        sources = [DataSource(str(data["train"]), 1 - cfg.text_fraction), DataSource(str(data["text"]), cfg.text_fraction)]
        stage2 = TrainConfig(stage=2, init_from=str(first), data=sources, epochs=cfg.stage2_epochs,
                             output_dir=str(root / "stage2"), **common)
        return self._timed(f"{strategy}/stage2_s", Trainer(stage2, self.console).run)

    def evaluate(self, strategy: str, model_dir: Path, data: dict[str, Path]) -> dict:
        """Test accuracy per task, and text QA / perplexity on the path this strategy deploys for text.
        For the main strategy, also the retention comparison against an independently loaded base."""
        self.console.rule(f"{strategy}: evaluation")
        start = time.perf_counter()
        model, processor = load_model_and_processor(model_dir, self.cfg.llm)
        tok = processor.tokenizer
        test = read_records(data["test"])
        mm = exact_match(test, answer_records(model, processor, test, max_new_tokens=4))
        non_shared = strategy.startswith("genieblue")  # only GenieBlue keeps a separate text path
        qa = text_qa(model, processor, shared_base=not non_shared)
        result = {
            "multimodal": mm,
            "deployed_text_path": "non-shared base" if non_shared else "shared (fine-tuned) model",
            "text_qa_deployed": qa["accuracy"],
            "perplexity_deployed": perplexity(model, tok, shared_base=not non_shared),
        }
        if strategy == MAIN:
            result["retention"] = self.retention(model, processor, qa, test)
        self.timings[f"{strategy}/eval_s"] = round(time.perf_counter() - start, 1)
        self.console.print(f"{strategy}: multimodal accuracy {mm['accuracy']:.3f} · text QA (deployed) {qa['accuracy']:.3f}")
        return result

    def retention(self, model, processor, qa_non_shared: dict, test: list[dict]) -> dict:
        """The non-shared and shared text paths against an independently loaded base, three ways,
        plus sample conversations with and without an image."""
        base = load_llm(self.cfg.llm).eval()
        tok = processor.tokenizer
        qa = {"base": text_qa(base, processor), "non_shared": qa_non_shared,
              "shared": text_qa(model, processor, shared_base=True)}
        report = {
            "logit_equality_non_shared": logit_equality(model, base, tok, shared_base=False),
            "logit_equality_shared": logit_equality(model, base, tok, shared_base=True),
            "text_qa": {k: v["accuracy"] for k, v in qa.items()},
            "text_qa_replies_identical": qa["base"]["replies"] == qa["non_shared"]["replies"],
            "perplexity": {"base": perplexity(base, tok), "non_shared": perplexity(model, tok, False),
                           "shared": perplexity(model, tok, True)},
        }
        picks = [next(r for r in test if r["task"] == t) for t in TASKS]
        replies = answer_records(model, processor, picks, max_new_tokens=8)
        report["samples"] = [
            {"image": r["images"][0], "question": r["conversations"][0]["value"].replace("<image>\n", ""),
             "reference": r["conversations"][1]["value"], "reply": reply}
            for r, reply in zip(picks, replies)
        ] + [{"image": None, "question": x["question"], "reference": x["reference"], "reply": x["reply"]}
             for x in qa["non_shared"]["replies"][:3]]
        return report

    # whole run --------------------------------------------------------------------------------
    def run(self) -> dict:
        torch.manual_seed(self.cfg.seed)
        start = time.perf_counter()
        data = self._timed("data_s", self.make_data)
        strategies = [MAIN] + [s for s in self.cfg.compare if s != MAIN]
        results = {s: self.evaluate(s, self.train(s, data), data) for s in strategies}
        self.timings["total_s"] = round(time.perf_counter() - start, 1)
        report = {"config": asdict(self.cfg), "tasks": {t: asdict(task_info(t)) for t in TASKS},
                  "results": results, "retention": results[MAIN].pop("retention"), "timings": self.timings,
                  "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__}}
        write_json(self.out / "report.json", report)
        self._chart(report)
        (self.out / "report.md").write_text(render_markdown(report))
        self.console.print(f"[bold green]done[/bold green] in {self.timings['total_s'] / 60:.1f} min · {self.out / 'report.md'}")
        return report

    def _chart(self, report: dict) -> None:
        series = {s: [r["multimodal"]["per_group"].get(t, 0.0) for t in TASKS] for s, r in report["results"].items()}
        grouped_bars(list(TASKS), series, self.out / "accuracy.png", "test accuracy per task vs chance", "accuracy",
                     reference=[report["tasks"][t]["chance"] for t in TASKS])


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def comparison_rows(results: dict) -> list[dict]:
    """Table-5/6-style rows: multimodal score, retention vs full fine-tuning, text score, text retention."""
    full = results.get("full", {}).get("multimodal", {}).get("accuracy")
    base_qa = results[MAIN]["text_qa_deployed"]  # GenieBlue's text path is the base itself
    rows = []
    for name, r in results.items():
        mm = r["multimodal"]["accuracy"]
        rows.append({
            "strategy": name, "multimodal": mm, "mm_vs_full": mm / full if full else None,
            "text_qa": r["text_qa_deployed"], "text_retention": r["text_qa_deployed"] / base_qa if base_qa else None,
            "perplexity": r["perplexity_deployed"], "text_path": r["deployed_text_path"],
        })
    return rows


def render_markdown(report: dict) -> str:
    ret, tasks = report["retention"], report["tasks"]
    main = report["results"][MAIN]["multimodal"]
    lines = [
        "# GenieBlue demo report", "",
        f"Base LLM: `{report['config']['llm'] or 'SmolLM2-135M-Instruct (built-in)'}` · vision: tiny SigLIP trained "
        f"from scratch · {report['config']['n_train']} training images · total time {report['timings']['total_s'] / 60:.1f} min.", "",
        "## Multimodal accuracy (genieblue-skip, test split)", "",
        "| task | accuracy | chance |", "|---|---|---|",
        *(f"| {t} | {_pct(main['per_group'].get(t, 0))} | {_pct(tasks[t]['chance'])} |" for t in tasks),
        f"| **all** | **{_pct(main['accuracy'])}** | |", "",
        "![accuracy per task](accuracy.png)", "",
        "## Text retention: base vs non-shared text path vs shared-base path", "",
        "| measure | base | non-shared (GenieBlue) | shared base |", "|---|---|---|---|",
        f"| logits bit-identical to base | - | {ret['logit_equality_non_shared']['bit_identical']}/{ret['logit_equality_non_shared']['prompts']} "
        f"| {ret['logit_equality_shared']['bit_identical']}/{ret['logit_equality_shared']['prompts']} "
        f"(max diff {ret['logit_equality_shared']['max_abs_diff']:.3g}) |",
        f"| text QA accuracy | {_pct(ret['text_qa']['base'])} | {_pct(ret['text_qa']['non_shared'])} | {_pct(ret['text_qa']['shared'])} |",
        f"| held-out perplexity | {ret['perplexity']['base']:.3f} | {ret['perplexity']['non_shared']:.3f} | {ret['perplexity']['shared']:.3f} |",
        "", f"Text QA replies identical to the base's: {ret['text_qa_replies_identical']}.", "",
    ]
    if len(report["results"]) > 1:
        lines += ["## Strategies on the same data and budget (Table 5/6 style)", "",
                  "| strategy | multimodal acc | vs full FT | text QA (deployed path) | text retention | perplexity | text path |",
                  "|---|---|---|---|---|---|---|"]
        for row in comparison_rows(report["results"]):
            vs = _pct(row["mm_vs_full"]) if row["mm_vs_full"] is not None else "-"
            tr = _pct(row["text_retention"]) if row["text_retention"] is not None else "-"
            lines.append(f"| {row['strategy']} | {_pct(row['multimodal'])} | {vs} | {_pct(row['text_qa'])} | {tr} | "
                         f"{row['perplexity']:.3f} | {row['text_path']} |")
        lines.append("")
    lines += ["## Sample conversations", "", "| image | question | reference | reply |", "|---|---|---|---|"]
    for s in ret["samples"]:
        image = f"![]({Path(s['image']).relative_to(Path(report['config']['out']).resolve())})" if s["image"] else "(none)"
        lines.append(f"| {image} | {s['question']} | {s['reference']} | {s['reply'].strip()} |")
    lines += ["", "## Timings (seconds)", "", "```", json.dumps(report["timings"], indent=2), "```", ""]
    return "\n".join(lines)
