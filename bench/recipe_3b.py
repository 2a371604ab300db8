"""The shipped Qwen2.5-3B stage-2 recipe at its real size, offline: writes a random-weight
Qwen2.5-3B-Instruct-shaped base and a SigLIP-so400m-shaped tower (384 px) to local folders, LLaVA data
(384 px images with long answers, plus text-only conversations), and configs/qwen2.5-3b/stage2.yaml as
shipped (bf16, gradient checkpointing, packing 4096) with llm / vision / data / output swapped in, no
init_from, one micro-batch a step and no checkpoints:

    ROOT/llm  ROOT/vision  ROOT/data  ROOT/stage2.yaml  ROOT/stage2-ckpt.yaml (a checkpoint every 2 steps)
    ROOT/stage0.yaml (a stage 1 that starts with stage 0, for a tower trained from scratch)

    python bench/recipe_3b.py ROOT [--tokenizer DIR] [--small]

The tokenizer is the built-in base's (or DIR). `--small` writes tiny shapes with the same files and
configs, to rehearse a GPU script on a CPU. `bench/gpu.sh` runs it first.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, SiglipConfig, SiglipModel

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "qwen2.5-3b" / "stage2.yaml"
LLM = dict(
    hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2
)
# tiny: 4 heads of 16 (grouped as the 3B's), not 16 of 4: a CPU computes a 4096-token row's attention per head
TINY_LLM = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2
)
VISION = dict(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27)
TINY_VISION = dict(image_size=384, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
WORDS = "the a red blue green small large shape left right of on under near is there two three four picture".split()


def write_models(root: Path, tokenizer, small: bool) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = Qwen2Config(
        vocab_size=len(tokenizer) if small else 151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **(TINY_LLM if small else LLM),
    )
    torch.manual_seed(0)
    with torch.device(device):  # a 3B model is initialised in ~1 s on a GPU, minutes on a CPU
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(TINY_VISION if small else VISION, num_attention_heads=2 if small else 16)
    with torch.device(device):
        siglip = SiglipModel(SiglipConfig(text_config=dict(text, max_position_embeddings=16), vision_config=vision))
    siglip.to(torch.bfloat16).save_pretrained(root / "vision")


def write_data(root: Path, images: int = 160, texts: int = 40) -> None:
    data = root / "data"
    (data / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    say = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
    rows = []
    for k in range(images):
        Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)).save(data / "img" / f"{k}.jpg")
        rows.append(
            {
                "id": str(k),
                "image": f"{k}.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the picture in detail."},
                    {"from": "gpt", "value": say(120)},
                    {"from": "human", "value": "And what is on the left?"},
                    {"from": "gpt", "value": say(40)},
                ],
            }
        )
    (data / "mm.json").write_text(json.dumps(rows))
    chats = [
        {"messages": [{"role": "user", "content": f"Tell me story {k}."}, {"role": "assistant", "content": say(300)}]}
        for k in range(texts)
    ]
    (data / "text.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))


def _swapped(text: str, swap: dict[str, str]) -> str:
    """`text` with each pattern (a line of the recipe) replaced once; a pattern that does not match
    exactly once means the shipped recipe changed under this script."""
    for pattern, value in swap.items():
        text, n = re.subn(pattern, value, text, flags=re.M)
        if n != 1:
            raise ValueError(f"{RECIPE} changed: {pattern!r} matched {n} times")
    return text


def write_configs(root: Path) -> None:
    """The shipped recipe with the base, tower, data and output swapped in (and one process per step)."""
    recipe = _swapped(
        RECIPE.read_text(),
        {
            r"^llm: .*$": f"llm: {root / 'llm'}",
            r"^vision: .*$": f"vision: {root / 'vision'}",
            r"^init_from: .*$": "",  # stage 2 straight from the base: no stage-1 folder here
            r"^grad_accum: .*$": "grad_accum: 1",
            r"^output_dir: .*$": f"output_dir: {root / 'runs'}",
            r"^save_every: .*$": "save_every: 100000",
            r"(?s)^data:.*?(?=^max_tiles)": "data:\n"
            f"  - {{path: {root / 'data' / 'mm.json'}, image_folder: {root / 'data' / 'img'}, ratio: 0.9}}\n"
            f"  - {{path: {root / 'data' / 'text.jsonl'}, ratio: 0.1}}\n",
        },
    )
    (root / "stage2.yaml").write_text(recipe)
    (root / "stage2-ckpt.yaml").write_text(_swapped(recipe, {r"^save_every: .*$": "save_every: 2"}))
    # stage 1 after a few steps of stage 0 (the tower taught to spell, as `genieblue demo` trains it)
    stage0 = {
        r"^stage: 2$": "stage: 1\nstage0_steps: 4\nstage0_batch: 8",
        r"^output_dir: .*$": f"output_dir: {root / 'stage0'}",
    }
    (root / "stage0.yaml").write_text(_swapped(recipe, stage0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the built-in base's)")
    parser.add_argument("--small", action="store_true", help="tiny shapes, for a CPU rehearsal")
    args = parser.parse_args()
    start = time.perf_counter()
    args.root.mkdir(parents=True, exist_ok=True)
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from genieblue.model import load_tokenizer

        tokenizer = load_tokenizer(None)
    write_models(args.root, tokenizer, args.small)
    write_data(args.root)
    write_configs(args.root)
    print(json.dumps({"prepared": str(args.root), "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
