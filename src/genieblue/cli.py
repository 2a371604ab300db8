"""The `genieblue` command line: one sub-command per job, each a thin shell over its room.

Imports of the heavy rooms happen inside the commands, so `genieblue --help` answers at once.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .demo_config import DemoConfig
from .deploy import activations as activations_setting

app = typer.Typer(
    help="GenieBlue: give a frozen LLM eyes without costing it a point of language ability. Start with "
    "`genieblue demo`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

# option types the commands share
MODEL_HELP = "A saved GenieBlue folder (e.g. demo_out/runs/genieblue-skip/stage2/final)."
ModelDir = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
BaseLLM = Annotated[
    str | None,
    typer.Option(help="Base LLM: HF hub id, local folder or .gguf file (default: built-in SmolLM2-135M-Instruct)."),
]
ManifestLLM = Annotated[str | None, typer.Option(help="Base LLM, if not the one named in the model's manifest.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
Device = Annotated[
    str | None,
    typer.Option(
        "--device",
        show_default=False,
        help="Where the model runs: cpu, cuda, cuda:1, ... (default: cuda when a GPU is visible, else cpu).",
    ),
]
DType = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        show_default=False,
        help="bfloat16, float16 or float32 (default: bfloat16 on a GPU, float32 on a CPU). Text-only requests "
        "stay the base's own in every dtype: what the base itself replies when loaded the same way.",
    ),
]


def _a_folder(path: str) -> str:
    """An output folder option: refused at once when it names a file (not after a model has loaded)."""
    if Path(path).is_file():
        raise typer.BadParameter(f"{path} is a file; give a folder")
    return path


EvalOut = Annotated[str, typer.Option(help="Output folder.", callback=_a_folder)]
VISION_HELP = (
    "Vision tower: SigLIP / CLIP / AutoBackbone (ResNet, ConvNeXt, ...) hub id or folder, or a JSON config "
    "for a new one (default: the small from-scratch ResNet of the demo)."
)


@app.callback()
def main():
    """The command group (`genieblue --help` shows the Typer's own help above)."""


def _vision_arg(vision: str | None):
    if vision and vision.lstrip().startswith("{"):
        try:
            return json.loads(vision)
        except ValueError as err:
            raise ValueError(f"--vision is not valid JSON ({err}): give a hub id, a folder or a JSON config") from None
    return vision


def _fail(message: str) -> None:
    typer.echo(f"error: {' '.join(message.split())}", err=True)  # one plain line, never wrapped
    raise typer.Exit(2)


def _extra_installing(module: str) -> str | None:
    """The optional extra of this package (pyproject's `optional-dependencies`, less `test`) that
    installs `module`."""
    from importlib.metadata import PackageNotFoundError, metadata, requires

    from packaging.requirements import Requirement

    try:
        specs, extras = requires("genieblue") or [], metadata("genieblue").get_all("Provides-Extra") or []
    except PackageNotFoundError:  # run from a source tree that was never installed
        return None
    for req in map(Requirement, specs):
        if req.name.replace("-", "_").lower() == module and req.marker is not None:
            return next((e for e in extras if e != "test" and req.marker.evaluate({"extra": e})), None)
    return None


@contextlib.contextmanager
def _failures(*more: type[Exception]):
    """The commands' one error handler: a ValueError, FileNotFoundError or one of `more` ends the
    command with `error: <its message on one line>` and exit status 2, and so does a missing module
    that one of the package's extras installs (the message names the extra)."""
    try:
        yield
    except (ValueError, FileNotFoundError, *more) as err:
        _fail(str(err))
    except ModuleNotFoundError as err:
        module = (err.name or "").partition(".")[0]
        extra = _extra_installing(module)
        if extra is None:
            raise
        _fail(f"this command needs {module}, which genieblue's [{extra}] extra installs: pip install -e '.[{extra}]'")


@app.command()
def info(
    strategy: list[str] = typer.Option(
        ["genieblue-skip"],
        "--strategy",
        "-s",
        help="Strategy (repeatable): genieblue-skip, genieblue-pre, genieblue-post, cogvlm-skip, cogvlm-pre, "
        "cogvlm-post, lora or full.",
    ),
    llm: BaseLLM = None,
    vision: str | None = typer.Option(None, help=VISION_HELP),
    as_json: AsJson = False,
):
    """Trainable parameters per strategy (the paper's #Param column) and the delta's size on disk,
    from each strategy's structure alone: no weight is read or downloaded (once a GGUF base has been
    converted), so a 3B base takes seconds.

    Example: genieblue info -s genieblue-skip -s lora -s full --json
    """
    from .model import DEFAULT_LLM, GenieBlueForConditionalGeneration
    from .model.report import parameter_report

    with _failures(OSError):
        reports = [
            parameter_report(
                GenieBlueForConditionalGeneration.from_base(  # the structure only: no weight read
                    llm, vision=_vision_arg(vision), strategy=name, weights=False
                )
            )
            for name in strategy
        ]
    if as_json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
        return
    first = reports[0]
    table = Table(title=f"GenieBlue delta on {llm or DEFAULT_LLM} ({first['num_layers']} blocks)")
    for col in ("strategy", "blocks", "LLM delta", "ViT+proj", "trainable", "% of base", "on disk"):
        table.add_column(col, justify="left" if col in ("strategy", "blocks") else "right")
    for r in reports:
        p = r["params"]
        table.add_row(
            r["strategy"],
            ",".join(map(str, r["block_indices"])) or "-",
            f"{(p['copies'] + p['experts'] + p['lora']) / 1e6:.1f}M",
            f"{(p['vit'] + p['projector']) / 1e6:.1f}M",
            f"{p['trainable'] / 1e6:.1f}M",
            f"{100 * r['trainable_vs_base_llm']:.1f}%",
            f"{r['delta_bytes'] / 2**20:.0f} MiB",
        )
    Console(width=max(Console().width, 110)).print(table)


@app.command(short_help="Train stage 1 or 2 from a YAML config (one process, DDP or FSDP2).")
def train(
    config: str = typer.Option(..., "--config", "-c", help="YAML training config (see configs/)."),
    resume: bool = typer.Option(
        False, help="Continue from the newest checkpoint in output_dir (a folder holding one is refused without it)."
    ),
    output_dir: str | None = typer.Option(None, help="Override output_dir."),
    max_steps: int | None = typer.Option(
        None, min=1, help="Override max_steps: the run's optimiser steps, in place of epochs (the schedule spans them)."
    ),
):
    """Train stage 1 (the connector: token mixer + projector; first stage 0 when the config sets
    stage0_steps) or stage 2 (vision encoder + connector + copies + LoRA) on JSON/JSONL in the LLaVA,
    ShareGPT or OpenAI format (docs/training.md). Writes OUTPUT_DIR/final (the model: give it to -m),
    checkpoints/, metrics.jsonl, loss.png and train_config.json.

    Example: genieblue train -c configs/stage1.yaml (after `genieblue synth data/synth ...`, see synth).
    Multi-process (DDP): `accelerate launch -m genieblue.cli train -c cfg.yaml` on GPUs, or
    `torchrun --nproc_per_node N -m genieblue.cli train -c cfg.yaml` on CPUs (gloo). Sharded (FSDP2):
    `accelerate launch --config_file configs/accelerate/fsdp-8gpu.yaml -m genieblue.cli train -c cfg.yaml`.
    Interrupted? Run the same command with --resume.
    """
    from .train import BadDataError, TrainConfig, Trainer

    with _failures(BadDataError):
        cfg = TrainConfig.from_yaml(config, output_dir=output_dir, max_steps=max_steps)
        Trainer(cfg, console).run(resume=resume)


@app.command(short_help="Write the built-in synthetic image-question dataset (LLaVA format).")
def synth(
    out: str = typer.Argument(..., help="Folder to write train/val/test JSON + PNG images into."),
    n_train: int = typer.Option(2000, min=1, help="Training samples."),
    n_val: int = typer.Option(200, min=0, help="Validation samples."),
    n_test: int = typer.Option(300, min=0, help="Test samples."),
    seed: int = typer.Option(0, help="Seed: the same seed writes byte-identical files."),
    image_size: int = typer.Option(64, min=16, max=1024, help="Image side in pixels."),
):
    """Write the built-in synthetic multimodal dataset (colour, shape, count, position, reading,
    bar charts) in LLaVA format, ready for `genieblue train`: train/val/test questions, caption.json
    (a description of every training image, for stage 1) and text.json (text-only samples to mix in).

    Example: genieblue synth data/synth --n-train 1200 --n-val 120 --n-test 480 (what configs/stage*.yaml read)
    """
    from ._io import write_json
    from .data.synthetic import generate_dataset, text_only_samples

    folder = Path(out)
    if folder.is_file() or folder.is_dir() and any(folder.iterdir()):
        _fail(f"{out} is a file or a folder that holds files already: write the dataset to a new or empty folder")
    paths = generate_dataset(out, n_train, n_val, n_test, seed, image_size)
    paths["text"] = Path(out) / "text.json"
    write_json(paths["text"], text_only_samples(max(1, n_train // 10), seed))
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


@app.command(
    short_help="Train and measure a model on the built-in SmolLM2-135M, offline (7-12 min on 2 CPU cores with bf16 "
    "units)."
)
def demo(
    out: str = typer.Option(
        DemoConfig.out,
        help="Output folder (data/, runs/, report.md, report.json, accuracy.png; a rerun replaces them).",
    ),
    compare: str = typer.Option(
        "",
        help="Comma-separated baselines to train on the same data and budget, "
        "e.g. full,lora,cogvlm-skip,genieblue-pre,genieblue-post.",
    ),
    llm: BaseLLM = None,
    n_train: int = typer.Option(DemoConfig.n_train, help="Training images (and their captions)."),
    n_test: int = typer.Option(DemoConfig.n_test, help="Test questions (a sixth per task)."),
    seeds: int = typer.Option(
        DemoConfig.seeds,
        min=1,
        help="Training seeds per strategy (seed, seed+1, ...) on the same data; with more "
        "than one the report adds mean +- sd per task and, when --compare includes full, the ratio to it.",
    ),
    stage0_steps: int = typer.Option(
        DemoConfig.stage0_steps,
        help="Stage-0 steps: the from-scratch vision tower learns "
        "to spell captions of freshly drawn images in the LLM's embeddings (0: skip).",
    ),
    stage1_steps: int = typer.Option(
        DemoConfig.stage1_steps, help="Stage-1 optimizer steps (token mixer + projector only)."
    ),
    stage2_epochs: float = typer.Option(
        DemoConfig.stage2_epochs,
        help="Stage-2 epochs over the mix: the training questions, text-only samples and exercises, each once.",
    ),
    exercises: int = typer.Option(
        DemoConfig.exercises,
        help="Text-only caption-reading exercises mixed into stage 2 (a caption in words, then a question "
        "about it; the position task), teaching the LLM side to answer from what the tower spells (0: none).",
    ),
    full_lr: float = typer.Option(
        DemoConfig.full_lr,
        help="Learning rate of every weight when full fine-tuning is compared (the copies and LoRA "
        f"train at {DemoConfig.lr:g}, too high for full fine-tuning: docs/method.md).",
    ),
    seed: int = typer.Option(DemoConfig.seed, help="Seed for data and training."),
    device: Device = None,
    dtype: DType = None,
):
    """Train a real GenieBlue MLLM on the built-in SmolLM2-135M offline and prove the retention claim:
    synthetic data -> stages 0, 1, 2 -> per-task accuracy vs chance, text retention (bit-exact logits,
    text QA, perplexity) for base vs non-shared vs shared path -> report.md/json + accuracy.png. The defaults
    take 7-12 minutes on 2 CPU cores with bf16 matrix units (docs/results/). --dtype is the dtype the
    models are evaluated in (against the base loaded in it); training runs in bf16 autocast where the
    device has bf16 units, else float32."""
    from .demo import Demo
    from .model import STRATEGIES

    baselines = [s.strip() for s in compare.split(",") if s.strip()]
    unknown = [s for s in baselines if s not in STRATEGIES]
    if unknown:
        _fail(f"unknown strategies {unknown}; choose from: {', '.join(STRATEGIES)}")
    cfg = DemoConfig(
        out=out,
        llm=llm,
        compare=baselines,
        seeds=seeds,
        seed=seed,
        n_train=n_train,
        n_test=n_test,
        stage0_steps=stage0_steps,
        stage1_steps=stage1_steps,
        stage2_epochs=stage2_epochs,
        exercises=exercises,
        full_lr=full_lr,
        device=device,
        dtype=dtype,
    )
    with _failures():
        Demo(cfg, console).run()


@app.command()
def chat(
    model: ModelDir,
    question: Annotated[str | None, typer.Argument(help="One question; leave out for an interactive chat.")] = None,
    image: str | None = typer.Option(None, "--image", "-i", help="Image file to ask about."),
    llm: ManifestLLM = None,
    max_new_tokens: int = typer.Option(128, help="Longest reply."),
    shared_base: bool = typer.Option(
        False,
        help="Send text-only turns through the multimodal path too: how a full, lora or cogvlm model deploys "
        "text, and GenieBlue's shared-base ablation.",
    ),
    device: Device = None,
    dtype: DType = None,
):
    """Ask a trained model about an image, or chat with it (greedy replies). Text-only turns run the
    untouched base until an image is attached; from then on the conversation holds the image and runs the
    multimodal path (/reset starts over).

    Example: genieblue chat -m demo_out/runs/genieblue-skip/stage2/final -i cat.png "What colour is it?"
    """
    from .infer.chat import ChatSession

    with _failures():
        session = ChatSession.load(
            model, llm=llm, device=device, dtype=dtype, max_new_tokens=max_new_tokens, shared_base=shared_base
        )
        if question is not None:
            print(session.ask(question, image))
        else:
            session.interactive(Console(), image)


@app.command(short_help="Serve an OpenAI-compatible API (a saved model, or an export with --onnx).")
def serve(
    model: Annotated[str | None, typer.Option("--model", "-m", show_default=False, help=MODEL_HELP)] = None,
    onnx: str | None = typer.Option(
        None,
        show_default=False,
        help="Serve a folder written by `genieblue export` under onnxruntime instead of a saved model (not with -m).",
    ),
    threads: int | None = typer.Option(
        None, min=1, show_default=False, help="With --onnx: onnxruntime threads (default: one per core)."
    ),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on (0: any free one)."),
    allow_local_images: bool = typer.Option(False, help="Accept local file paths as image URLs (never http)."),
    llm: ManifestLLM = None,
    api_key: str | None = typer.Option(
        None,
        envvar="GENIEBLUE_API_KEY",
        show_default=False,
        help="Require `Authorization: Bearer KEY` on every /v1 route (401 without).",
    ),
    max_body_mb: float = typer.Option(32, min=0.001, help="Largest request body in MiB (413 above it)."),
    max_images: int = typer.Option(8, min=0, help="Most images in one request (400 above it)."),
    max_queue: int = typer.Option(64, min=1, help="Most requests waiting for the model (503 when full)."),
    device: Device = None,
    dtype: DType = None,
):
    """Serve an OpenAI-compatible API: POST /v1/chat/completions (streaming too), GET /v1/models,
    GET /health. Give -m (a saved model) or --onnx (an export; with it --llm, --device and --dtype are
    refused). Text-only requests run the untouched base; concurrent requests are batched (with --onnx:
    the quantised base, one request at a time). As in OpenAI's API, requests sample (temperature 1)
    unless they set temperature 0. Binding a --host other than loopback without --api-key prints a
    warning.

    Example: GENIEBLUE_API_KEY=secret genieblue serve -m demo_out/runs/genieblue-skip/stage2/final --port 8000
    """
    from .infer.server import serve as run_server

    with _failures():
        run_server(
            model,
            onnx=onnx,
            threads=threads,
            host=host,
            port=port,
            allow_local_images=allow_local_images,
            llm=llm,
            api_key=api_key,
            max_body_bytes=int(max_body_mb * 2**20),
            max_images=max_images,
            max_queue=max_queue,
            device=device,
            dtype=dtype,
        )


# genieblue eval ---------------------------------------------------------------------------------
eval_app = typer.Typer(
    help="Retention tables on real benchmarks: lm-eval text tasks, VQA benchmarks from local files, judged "
    "chat. Each writes OUT/<kind>.md, .json and .png and caches finished items in OUT/<kind>.cache.jsonl, "
    "so running the same command again after an interruption resumes (with other --device, --dtype, --llm or "
    "--max-new-tokens every item runs again), and adds its table to the model's card (MODEL/README.md, "
    "MODEL/evals.json).",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval", short_help="Retention tables: lm-eval text tasks, VQA benchmarks, judged chat.")
EVAL_PATHS_HELP = (
    "Comma-separated text paths: base (the base LLM loaded on its own), non-shared (the untouched base "
    "inside the model: GenieBlue's deployed text path), shared (text through copies + LoRA: a full / lora / "
    "cogvlm model's deployed text path). Retention is against base, or the first path without it."
)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _print_report(result: dict, as_json: bool, model: str, kind: str) -> None:
    """Print the report and keep its table in the model's card (README.md: a read-only folder
    only gets a warning)."""
    from .model.card import add_evaluation

    try:
        add_evaluation(model, kind, result["table"])
    except OSError as err:
        console.print(f"[yellow]model card not updated: {' '.join(str(err).split())}[/yellow]")
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    print(Path(result["files"]["md"]).read_text(), end="")
    console.print("wrote " + ", ".join(result["files"].values()))


@eval_app.command("text")
def eval_text(
    model: ModelDir,
    tasks: str = typer.Option(
        ..., "--tasks", "-t", help="Comma-separated lm-eval tasks or task YAML files, e.g. gsm8k,mmlu."
    ),
    paths: str = typer.Option("base,non-shared,shared", help=EVAL_PATHS_HELP),
    compare: list[str] = typer.Option(
        [],
        help="Another checkpoint (repeatable), scored on the text path it deploys "
        "with: non-shared for GenieBlue, shared for full / lora / cogvlm.",
    ),
    include_path: list[str] = typer.Option([], help="Folder of extra lm-eval task YAMLs (repeatable)."),
    limit: int | None = typer.Option(None, min=1, help="At most this many documents per task (a quick look)."),
    num_fewshot: int | None = typer.Option(None, min=0, help="Few-shot examples (default: each task's own)."),
    batch_size: int = typer.Option(8, min=1, help="Requests per forward pass."),
    device: Device = None,
    dtype: DType = None,
    chat_template: bool = typer.Option(False, help="Wrap prompts in the tokenizer's chat template."),
    llm: ManifestLLM = None,
    out: EvalOut = "eval_out",
    as_json: AsJson = False,
):
    """Run lm-eval tasks on the base, the non-shared and the shared text path (and other checkpoints)
    and print a Table-6-style table: score per task, average and retention vs the base.

    Built-in tasks such as gsm8k download their datasets (lm-eval, in the [eval] extra); offline, give
    task YAMLs over local files with --include-path.

    Example: genieblue eval text -m demo_out/runs/genieblue-skip/stage2/final -t arc_easy --limit 200

    lm-eval's own CLI knows the same model as "genieblue":
    python -m genieblue.eval.harness --model genieblue --model_args pretrained=DIR,path=shared --tasks gsm8k
    """
    with _failures(OSError):  # offline dataset downloads too
        from .eval.text_tasks import evaluate_text

        result = evaluate_text(
            model,
            _csv(tasks),
            out,
            paths=tuple(_csv(paths)),
            compare=tuple(compare),
            llm=llm,
            include_path=include_path or None,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            chat_template=chat_template,
        )
    _print_report(result, as_json, model, "text")


@eval_app.command("mm")
def eval_mm(
    model: ModelDir,
    data: list[str] = typer.Option(
        ...,
        "--data",
        "-d",
        help="Benchmark file (repeatable), as FILE or NAME=FILE or "
        "NAME:METRIC=FILE: LLaVA-style JSON/JSONL or VLMEvalKit-style TSV (base64 images).",
    ),
    reference: str | None = typer.Option(
        None, help="Reference checkpoint for the retention column (e.g. full fine-tuning)."
    ),
    batch_size: int = typer.Option(8, min=1, help="Questions per generate call."),
    max_new_tokens: int = typer.Option(32, help="Longest reply."),
    limit: int | None = typer.Option(None, min=1, help="At most this many items per benchmark."),
    llm: ManifestLLM = None,
    device: Device = None,
    dtype: DType = None,
    out: EvalOut = "eval_out",
    as_json: AsJson = False,
):
    """Score VQA benchmarks from local files with their standard metrics and print a Table-4/5-style
    table: score per benchmark, average and retention vs --reference.

    Metrics (picked from the benchmark name, e.g. MMBench_DEV_EN -> mc, or given as NAME:METRIC=FILE):
    mc (AI2D, ScienceQA, MMBench: option extracted from free text), vqa (TextVQA), anls (DocVQA),
    relaxed (ChartQA), ocr (OCRBench), exact; an unknown name gets mc when its items have options, else
    exact. Malformed rows are skipped and counted. Without --reference, retention is the model's own (100%).

    Example: genieblue eval mm -m demo_out/runs/genieblue-skip/stage2/final -d demo=demo_out/data/test.json
    """
    from rich.progress import Progress

    from .eval.vqa import evaluate_mm

    with _failures():
        with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
            result = evaluate_mm(
                model,
                data,
                out,
                reference=reference,
                llm=llm,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                limit=limit,
                progress=progress,
                device=device,
                dtype=dtype,
            )
    _print_report(result, as_json, model, "mm")


@eval_app.command("chat")
def eval_chat(
    model: ModelDir,
    questions: str = typer.Option(
        ...,
        "--questions",
        "-q",
        help="Question JSONL: MT-Bench (turns, reference) or AlignBench (question, reference) lines.",
    ),
    judge_url: str = typer.Option(
        ...,
        help="OpenAI-compatible base URL of the judge, e.g. https://api.openai.com/v1 "
        "or http://127.0.0.1:8000/v1 (a `genieblue serve`).",
    ),
    judge_model: str | None = typer.Option(None, help="Judge model name (default: the endpoint's first model)."),
    judge_api_key: str | None = typer.Option(
        None, envvar="OPENAI_API_KEY", show_default=False, help="API key for the judge (default: $OPENAI_API_KEY)."
    ),
    judge_max_tokens: int = typer.Option(1024, help="Longest judgment."),
    paths: str = typer.Option("base,non-shared,shared", help=EVAL_PATHS_HELP),
    batch_size: int = typer.Option(8, min=1, help="Questions per generate call."),
    max_new_tokens: int = typer.Option(512, help="Longest answer."),
    llm: ManifestLLM = None,
    device: Device = None,
    dtype: DType = None,
    out: EvalOut = "eval_out",
    as_json: AsJson = False,
):
    """Answer chat questions on each text path and have a judge rate every answer 1-10 (MT-Bench
    single-answer grading); print mean rating per category, average and retention vs the base.
    Judgments without a rating count as failures and stay out of the averages.

    Example: genieblue eval chat -m demo_out/runs/genieblue-skip/stage2/final -q mt_bench.jsonl --judge-url https://api.openai.com/v1 --judge-model gpt-4o
    """  # noqa: E501 (the example is one command line)
    from rich.progress import Progress

    with _failures():  # the judge's client comes with the [eval] extra
        from .eval.judge import Judge, JudgeUnavailable, evaluate_chat
    with _failures(JudgeUnavailable):
        judge = Judge(judge_url, judge_model, judge_api_key, judge_max_tokens)
        with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
            result = evaluate_chat(
                model,
                questions,
                out,
                judge=judge,
                paths=tuple(_csv(paths)),
                llm=llm,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                progress=progress,
                device=device,
                dtype=dtype,
            )
    _print_report(result, as_json, model, "chat")


# genieblue export / bench deploy ----------------------------------------------------------------
EXPORT_FORMATS = ("onnx",)
ActivationsOption = typer.Option(
    activations_setting.DEFAULT,
    help="With w4a16: what the 4-/8-bit matmuls compute with. float (default): float32 activations, "
    "exact (text mode is the quantised base); int8: each row quantised to int8 per block inside the op "
    "(onnxruntime MatMulNBits accuracy_level 4, as llama.cpp does): faster decode, text mode no longer "
    "exactly the base (bench deploy measures the cost). Recorded in deploy.json.",
)


@app.command()
def export(
    model: ModelDir,
    out: str = typer.Option(
        "deploy_out",
        "--out",
        "-o",
        help="Folder to write: a new or empty one, or an earlier export (replaced whole, atomically).",
    ),
    format: str = typer.Option("onnx", "--format", "-f", help=f"Output format: {', '.join(EXPORT_FORMATS)}."),
    precision: str = typer.Option(
        "w4a16",
        help="w4a16: LLM weights 4-bit (embedding and LM head 8-bit), LoRA and the vision tower's linear "
        "layers 8-bit (a convolutional encoder's convolutions stay float), one scale per 32 weights "
        "(onnxruntime MatMulNBits), activations as --activations; fp32: float weights.",
    ),
    single_tile: bool = typer.Option(
        False,
        help="Fix the vision graph to one tile (1x3xSxS), the phone's single-patch "
        "mode; by default it takes any number of tiles.",
    ),
    llm: ManifestLLM = None,
    keep_gguf: bool = typer.Option(
        True,
        "--keep-gguf/--requantize",
        help="With w4a16 and a GGUF base (the built-in "
        "default is one): keep the file's own Q4_0 / Q4_1 / Q8_0 blocks, so text mode is "
        "the user's model; --requantize quantises the base's weights anew.",
    ),
    copy_bits: int = typer.Option(
        4,
        help="With w4a16: bits of the block copies' weights, 4 or 8 (8 doubles their size for image-mode "
        "logits closer to the float model's).",
    ),
    activations: str = ActivationsOption,
    as_json: bool = typer.Option(False, "--json", help="Print the export manifest as JSON."),
):
    """Export for on-device inference (onnxruntime, or a phone toolchain that takes ONNX): genieblue-*, lora
    and full models (cogvlm's per-token experts are refused). The model is read on the CPU in float32.

    Writes OUT/text.onnx (a decoder step of the untouched base with a KV cache), OUT/image.onnx (the same step
    with block copies and LoRA, image features spliced in at the placeholders), OUT/vision.onnx (the vision
    tower: encoder, downsampler, token mixer, projector), OUT/base.onnx.data (the base weights, ONE copy,
    read by both decoder graphs), OUT/delta.onnx.data (copies, LoRA, vision tower), OUT/deploy.json, and
    OUT/tokenizer/ + OUT/processor.json
    (for `genieblue serve --onnx OUT`). Static dense ops only: no routing, no data-dependent control flow;
    with w4a16, q/k/v and gate/up (and their LoRA) run as one op each.

    Example: genieblue export -m demo_out/runs/genieblue-skip/stage2/final -o phone --single-tile
    """
    if format not in EXPORT_FORMATS:
        _fail(f"unknown format {format!r}; supported: {', '.join(EXPORT_FORMATS)}")
    with _failures():
        from .deploy.onnx_export import export_saved_model
        from .deploy.report import export_table

        manifest = export_saved_model(
            model,
            out,
            precision=precision,
            single_tile=single_tile,
            llm=llm,
            keep_gguf=keep_gguf,
            copy_bits=copy_bits,
            activations=activations,
        )
    if as_json:
        print(json.dumps(manifest, indent=2))
    else:
        Console().print(export_table(manifest, out))


bench_app = typer.Typer(help="Measurements on this machine.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("deploy")
def bench_deploy(
    model: ModelDir,
    onnx: str | None = typer.Option(
        None,
        help="Exported folder to measure (genieblue export); exported there "
        "first if it holds no export. Default: a W4A16 export in a temporary folder.",
    ),
    single_tile: bool = typer.Option(True, help="With a fresh export: the vision graph fixed to one tile."),
    prompt_tokens: int = typer.Option(64, min=1, help="Prompt length (an image prompt's placeholders count)."),
    new_tokens: int = typer.Option(32, min=1, help="Tokens decoded greedily per measurement."),
    threads: int | None = typer.Option(None, min=1, help="onnxruntime threads (default: one per core)."),
    repeats: int = typer.Option(
        3,
        min=1,
        help="Runs per worker process (ViT, prefill: the best run; load: once a worker; decode: every step counts).",
    ),
    rounds: int = typer.Option(
        2, min=1, help="Rounds of worker processes: text mode, image mode, then both modes' decode steps interleaved."
    ),
    accuracy: bool = typer.Option(
        True,
        "--accuracy/--no-accuracy",
        help="Also measure what W4A16 costs: logit "
        "error vs the float model, held-out perplexity and text QA, ONNX vs PyTorch.",
    ),
    vqa: str | None = typer.Option(
        None,
        help="With --accuracy: a LLaVA JSON of short-answer image questions "
        "(e.g. demo_out/data/test.json) scored float vs W4A16.",
    ),
    llm: ManifestLLM = None,
    keep_gguf: bool = typer.Option(
        True,
        "--keep-gguf/--requantize",
        help="With a fresh export of a GGUF base: keep the file's own quantisation (see genieblue export).",
    ),
    activations: str = typer.Option(
        activations_setting.DEFAULT,
        help="With a fresh export: float or int8 activations in the quantised matmuls (see genieblue export).",
    ),
    llama_bench: str | None = typer.Option(
        None,
        help="llama.cpp's llama-bench binary, run on the base's GGUF file with the same prompt, new tokens "
        "and threads, its speed printed beside text mode's (default: llama-bench on PATH, if any).",
    ),
    as_json: AsJson = False,
):
    """The paper's deployment table (Table 9) on this machine: text mode vs image mode under onnxruntime -
    load time, ViT time, prefill and decode tokens/s, storage, peak memory (each mode in its own process;
    decode from one process alternating the modes' steps, tokens/s = 1 / median step) - with image-mode
    storage by part against its floor (the copied blocks at the base's precision) and the targets: one
    copy of the base in memory, image-mode decode >= 97% of text-mode decode.

    Example: genieblue bench deploy -m demo_out/runs/genieblue-skip/stage2/final --json
    """
    with _failures(RuntimeError):
        from .deploy.bench_deploy import bench_deploy as measure
        from .deploy.report import bench_report

        result = measure(
            model,
            onnx,
            single_tile=single_tile,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            threads=threads,
            repeats=repeats,
            rounds=rounds,
            accuracy=accuracy,
            vqa=vqa,
            llm=llm,
            keep_gguf=keep_gguf,
            activations=activations,
            llama_bench=llama_bench,
        )
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out = Console(width=max(Console().width, 110))
    for item in bench_report(result):
        out.print(item)


if __name__ == "__main__":
    app()
