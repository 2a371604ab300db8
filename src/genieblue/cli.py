"""The `genieblue` command line: one sub-command per job, each a thin shell over its room.

Imports of the heavy rooms happen inside the commands, so `genieblue --help` answers at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="GenieBlue: give a frozen LLM eyes without costing it a point of language ability.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

LLM_HELP = "Base LLM: HF hub id, local folder or .gguf file (default: built-in SmolLM2-135M-Instruct)."
VISION_HELP = "Vision tower: SigLIP/CLIP hub id or folder, or a JSON config for a new ViT (default: tiny SigLIP)."


@app.callback()
def main():
    """GenieBlue: train, chat with, serve, evaluate and deploy multimodal LLMs whose text path is
    the untouched base model. Start with `genieblue demo`."""


def _vision_arg(vision: Optional[str]):
    if vision and vision.lstrip().startswith("{"):
        return json.loads(vision)
    return vision


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@app.command()
def info(
    strategy: list[str] = typer.Option(["genieblue-skip"], "--strategy", "-s", help="Strategy (repeatable)."),
    llm: Optional[str] = typer.Option(None, help=LLM_HELP),
    vision: Optional[str] = typer.Option(None, help=VISION_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
):
    """Trainable parameters per strategy (the paper's #Param column) and the delta's size on disk.

    Example: genieblue info -s genieblue-skip -s lora -s full --json
    """
    from .model import DEFAULT_LLM, GenieBlueForConditionalGeneration
    from .model.report import parameter_report

    try:
        reports = [
            parameter_report(GenieBlueForConditionalGeneration.from_base(llm, vision=_vision_arg(vision), strategy=name))
            for name in strategy
        ]
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(str(err))
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


@app.command()
def train(
    config: str = typer.Option(..., "--config", "-c", help="YAML training config (see configs/)."),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in output_dir."),
    output_dir: Optional[str] = typer.Option(None, help="Override output_dir."),
    max_steps: Optional[int] = typer.Option(None, help="Override max_steps."),
):
    """Train stage 1 (projector) or stage 2 (ViT + projector + copies + LoRA) on LLaVA JSON/JSONL.

    Multi-process: `accelerate launch -m genieblue.cli train -c cfg.yaml` (DDP, or FSDP with an
    accelerate config). Interrupted? Run the same command with --resume.
    """
    from .train import BadDataError, TrainConfig, Trainer

    try:
        cfg = TrainConfig.from_yaml(config, output_dir=output_dir, max_steps=max_steps)
        Trainer(cfg, console).run(resume=resume)
    except (ValueError, FileNotFoundError, BadDataError) as err:
        _fail(str(err))


@app.command()
def synth(
    out: str = typer.Argument(..., help="Folder to write train/val/test JSON + PNG images into."),
    n_train: int = typer.Option(2000, help="Training samples."),
    n_val: int = typer.Option(200, help="Validation samples."),
    n_test: int = typer.Option(300, help="Test samples."),
    seed: int = typer.Option(0, help="Seed: the same seed writes byte-identical files."),
    image_size: int = typer.Option(64, help="Image side in pixels."),
):
    """Write the built-in synthetic multimodal dataset (colour, shape, count, position, reading,
    bar charts) in LLaVA format, ready for `genieblue train`."""
    from ._io import write_json
    from .data.synthetic import generate_dataset, text_only_samples

    paths = generate_dataset(out, n_train, n_val, n_test, seed, image_size)
    paths["text"] = Path(out) / "text.json"
    write_json(paths["text"], text_only_samples(max(1, n_train // 10), seed))
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


if __name__ == "__main__":
    app()
