"""The model card: `README.md` in a saved model folder (the Hugging Face Hub's convention), rendered
from what the folder holds: the manifest (base and fingerprint, strategy, copied blocks, parameter
counts), the delta file, `training.json` (the stages, data and steps it was trained on, written by
training) and `evals.json` (evaluation tables, added by `genieblue eval`), plus the commands to
chat with, serve and export the model."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .._io import write_json, write_text
from .folder import DELTA, TRAINING, read_manifest
from .strategy import Strategy

CARD = "README.md"
EVALS = "evals.json"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_BUILT_IN = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the built-in default base (None in the manifest)
_IMAGE_PATH = {  # what a request with an image runs, per strategy family; and what its chosen blocks get
    "genieblue": ("the copied blocks and LoRA on the others", "copied blocks"),
    "cogvlm": ("visual experts for the image tokens and LoRA", "blocks with visual experts"),
    "lora": ("LoRA on every block", "copied blocks"),
    "full": ("a trained copy of every block", "copied blocks"),
}


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M"


def _front_matter(base: str | None) -> str:
    base = base or _BUILT_IN
    lines = ["---", "library_name: genieblue", "pipeline_tag: image-text-to-text", "tags: [genieblue, multimodal]"]
    if _HUB_ID.fullmatch(base) and not Path(base).exists():
        lines.insert(1, f"base_model: {base}")
    return "\n".join(lines + ["---", ""])


def _parameters(manifest: dict, delta_bytes: int | None) -> list[str]:
    p = manifest["params"]
    delta = p["copies"] + p["experts"] + p["lora"]
    rows = [
        ("frozen base LLM (shared with text-only requests)", p["base_llm"]),
        ("block copies", p["copies"]),
        ("visual experts", p["experts"]),
        ("LoRA", p["lora"]),
        ("LLM delta (copies + experts + LoRA)", delta),
        ("ViT", p["vit"]),
        ("connector (projector, token mixer if any)", p["projector"]),
        ("trainable (LLM delta + ViT + connector)", p["trainable"]),
    ]
    out = ["| parameters | count |", "|---|---|"] + [
        f"| {name} | {_millions(n)} |" for name, n in rows if n or "LLM" in name
    ]
    if delta_bytes is not None:
        out.append(f"\nThe delta file (`{DELTA}`) holds {delta_bytes / 2**20:,.1f} MiB; the base is never copied.")
    return out


def _count(value, spec: str = ",") -> str:
    """A number of the training record, or "unknown" where its run's log lacked steps."""
    return "unknown" if value is None else format(value, spec)


def _training(stages: list[dict]) -> list[str]:
    out = []
    for s in stages:
        out.append(
            f"- **stage {s['stage']}** ({'connector only' if s['stage'] == 1 else 'tower, connector, LLM delta'}):"
            f" {s['steps']:,} steps, {s['samples']:,} samples per epoch, {_count(s['tokens'])} tokens seen, final loss "
            f"{_count(s['final_loss'], '.4f')}; lr {s['lr']:g}, packing {s['max_length']}, precision {s['precision']}"
        )
        for d in s["data"]:
            out.append(f"  - `{d['path']}` (ratio {d['ratio']:g}): {d['samples']:,} samples in the mixture")
        if s.get("bad_records"):
            out.append(f"  - {s['bad_records']:,} unusable records skipped (listed in that run's bad_records.json)")
    return out


def _evaluations(evals: dict) -> list[str]:
    out = []
    for kind, table in evals.items():
        columns = table["columns"]
        out += [
            f"\n**{kind}** (reference row: {table['reference']})\n",
            "| | " + " | ".join(columns) + " | average | retention |",
            "|---" * (len(columns) + 3) + "|",
        ]
        for label, row in table["rows"].items():
            cells = [row["scores"].get(c) for c in columns] + [row["average"], row["retention"]]
            out.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.4g}" for v in cells) + " |")
    return out


def render_card(folder: str | Path, name: str | None = None) -> str:
    """The card of a saved model folder; `name` is how commands refer to it (default: the folder)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    delta = folder / DELTA
    name = name or str(folder)
    base, strategy = manifest["base"], manifest["strategy"]
    blocks = ", ".join(map(str, manifest["block_indices"])) or "none"
    vision = manifest["vision"]["config"]
    image_path, chosen = _IMAGE_PATH[Strategy(**strategy).family]
    text_path = (
        "runs the same trained path (shared base, the paper's ablation)"
        if manifest["shared_base"]
        else "runs it untouched (logits bit-identical to the base)"
    )
    lines = [
        _front_matter(base["llm"]),
        f"# {Path(name).name}: a GenieBlue multimodal model on {base['llm'] or _BUILT_IN}",
        "",
        f"Made with [genieblue](https://arxiv.org/abs/2503.06019): the base LLM is frozen and a text-only request "
        f"{text_path}; a request with an image runs {image_path}. This folder holds only the delta and loads onto "
        "the base named here.",
        "",
        "## Model",
        "",
        f"- base LLM: `{base['llm'] or _BUILT_IN}` ({base['model_type']}, {base['num_layers']} blocks), fingerprint "
        f"`{base['fingerprint']}` (loading refuses any other weights)",
        f"- strategy: `{strategy['name']}`, fraction {strategy['fraction']:g}; {chosen}: {blocks}; LoRA rank "
        f"{strategy['lora_rank']} (alpha {strategy['lora_alpha']:g}) on {len(manifest['lora_indices'])} blocks",
        f"- vision: {vision['model_type']} at {manifest['image_size']} px, {manifest['tokens_per_tile']} image tokens "
        f"per tile ({manifest['vision']['downsample']}x{manifest['vision']['downsample']} merge), shared base: "
        f"{manifest['shared_base']}",
        "",
        *(_parameters(manifest, delta.stat().st_size if delta.is_file() else None) if "params" in manifest else []),
    ]
    training = _read(folder / TRAINING)
    lines += ["", "## Training", ""] + (_training(training["stages"]) if training else ["Not trained (as built)."])
    evals = _read(folder / EVALS)
    if evals:
        lines += ["", "## Evaluation"] + _evaluations(evals)
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        f'genieblue chat -m {name} -i photo.jpg "What is in this picture?"',
        f'genieblue chat -m {name} "A text-only question runs the untouched base."',
        f"genieblue serve -m {name} --port 8000  # OpenAI-compatible /v1/chat/completions",
        f"genieblue export -m {name} -o {name}-onnx  # W4A16 ONNX graphs for on-device inference",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_card(folder: str | Path, name: str | None = None) -> Path:
    path = Path(folder) / CARD
    write_text(path, render_card(folder, name))
    return path


def add_evaluation(folder: str | Path, kind: str, table: dict) -> Path:
    """Keep an evaluation's retention table (`eval.report.retention_table`) in the folder and
    re-render its card."""
    folder = Path(folder)
    evals = _read(folder / EVALS) or {}
    evals[kind] = table
    write_json(folder / EVALS, evals)
    return write_card(folder)
