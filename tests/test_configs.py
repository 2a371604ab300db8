"""The shipped configs cannot rot. configs/stage1.yaml and stage2.yaml (the demo's run as configs)
train two steps per stage on the synthetic data `genieblue synth` writes, on a tiny base. The GPU
recipes: each config in configs/<base>/ trains for two steps on CPU,
stage 1 then stage 2 from stage 1's model, with its hub ids swapped for local tiny random-weight
models of the same architectures (Qwen2 / Llama shaped like the 3B bases, a SigLIP checkpoint at
384 px with 14 px patches like so400m) and small data files laid out where the config expects
LLaVA-558K, LLaVA-665K, Cambrian and text-only data. Only the batch shape is scaled down (one
packed row per step instead of 32 / 64: a 4096-token row takes seconds on a CPU); everything else
(bf16, gradient checkpointing, packing 4096, the optimiser, 729 image tokens per tile) is used as
shipped. The accelerate configs load as accelerate reads them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.state import AcceleratorState
from PIL import Image
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, SiglipConfig, SiglipModel

from genieblue._io import write_json
from genieblue.data.synthetic import generate_dataset, text_only_samples
from genieblue.model import GenieBlueForConditionalGeneration, load_tokenizer
from genieblue.train import TrainConfig, Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SO400M = "google/siglip-so400m-patch14-384"
_TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
BASES = {  # config folder -> (hub id, a tiny config of that architecture with the 3B model's other settings)
    "qwen2.5-3b": (
        "Qwen/Qwen2.5-3B-Instruct",
        lambda v: Qwen2Config(vocab_size=v, rope_theta=1e6, rms_norm_eps=1e-6, **_TINY),
    ),
    "llama3.2-3b": (
        "meta-llama/Llama-3.2-3B-Instruct",
        lambda v: LlamaConfig(
            vocab_size=v,
            rope_theta=5e5,
            rms_norm_eps=1e-5,
            **_TINY,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    ),
}
RECIPE = {
    "precision": "bf16",
    "gradient_checkpointing": True,
    "max_length": 4096,
    "betas": [0.9, 0.98],
    "eps": 1e-6,
    "weight_decay": 0.05,
    "warmup_ratio": 0.01,
    "vit_layer_decay": 0.9,
    "vision": SO400M,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def so400m_like(tmp_path_factory) -> str:
    """A full SigLIP checkpoint (text and vision towers, as on the hub) with so400m's geometry."""
    folder = tmp_path_factory.mktemp("siglip")
    torch.manual_seed(0)
    config = SiglipConfig(
        text_config={
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        vision_config={
            "image_size": 384,
            "patch_size": 14,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
    )
    SiglipModel(config).save_pretrained(folder)
    return str(folder)


def _base(folder: Path, make) -> str:
    """A tiny random-weight base that speaks through the real SmolLM2 tokenizer and chat template."""
    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    config = make(len(tokenizer))
    config.pad_token_id, config.eos_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, None
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _images(folder: Path, names: list[str]) -> None:
    for k, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (60 + 10 * (k % 3), 40), (40 * (k % 6), 200 - 30 * (k % 6), 90)).save(folder / name)


def _write_data(path: Path, image_folder: Path | None, n: int) -> None:
    """n records in the style of the data set the config names: LLaVA-558K captions, LLaVA-665K
    multi-turn questions, Cambrian JSONL (a system turn, some text-only rows) or text-only chats."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.lower()
    images = [f"{'coco/train2017' if '665k' in name else 'sub'}/{k:06d}.jpg" for k in range(n)]
    if image_folder is not None:
        _images(image_folder, images)
    rows = []
    for k in range(n):
        if "558k" in name:
            rows.append(
                {
                    "id": f"{k:09d}",
                    "image": images[k],
                    "conversations": [
                        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
                        {"from": "gpt", "value": f"a coloured rectangle number {k} on a plain background"},
                    ],
                }
            )
        elif "665k" in name:
            rows.append(
                {
                    "id": f"{k:09d}",
                    "image": images[k],
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat is the main colour?"},
                        {"from": "gpt", "value": "Green."},
                        {"from": "human", "value": "Is it wider than tall?"},
                        {"from": "gpt", "value": "Yes, it is."},
                    ],
                }
            )
        elif "cambrian" in name:
            turns = [
                {"from": "system", "value": "Answer the questions."},
                {"from": "human", "value": "<image>\nDescribe it." if k % 4 else "What is 2 + 2?"},
                {"from": "gpt", "value": "A coloured block." if k % 4 else "4"},
            ]
            rows.append({"id": f"cambrian_{k}", **({"image": images[k]} if k % 4 else {}), "conversations": turns})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Name a prime above {k}."},
                        {"role": "assistant", "content": "Seven." if k < 7 else "Eleven."},
                    ]
                }
            )
    text = "\n".join(json.dumps(r) for r in rows) if path.suffix == ".jsonl" else json.dumps(rows)
    path.write_text(text)


def _local_copy(config: Path, root: Path, llm: str, vision: str, n: int) -> Path:
    """The config, hub ids swapped for local folders, at the same place under `root` (its data
    paths resolve there), with data files where it expects them."""
    text = config.read_text()
    raw = yaml.safe_load(text)
    target = root / config.relative_to(CONFIGS.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = re.sub(r"^llm: .*$", f"llm: {llm}", text, flags=re.M)
    target.write_text(re.sub(r"^vision: .*$", f"vision: {vision}", text, flags=re.M))
    for source in raw["data"]:
        folder = (target.parent / source["image_folder"]).resolve() if source.get("image_folder") else None
        _write_data((target.parent / source["path"]).resolve(), folder, n)
    return target


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """The recipes train in bf16 in this process; accelerate keeps one global state per process:
    cleared before (after other files' fp32 runs) and after (for theirs), in any test order."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_demo_configs_train_two_steps_per_stage_on_synthetic_data(tmp_path, chat_base):
    """configs/stage1.yaml then stage2.yaml as shipped (the tower, packing, lrs, system prompt), on data
    laid out where they expect `genieblue synth data/synth`, with a tiny base and stage 0 cut to 2 steps."""
    data = tmp_path / "data" / "synth"
    generate_dataset(data, n_train=12, n_val=2, n_test=2, seed=0)
    write_json(data / "text.json", text_only_samples(2, seed=0))
    (tmp_path / "configs").mkdir()
    for k in (1, 2):
        shutil.copy(CONFIGS / f"stage{k}.yaml", tmp_path / "configs")
    run = tmp_path / "runs"
    short = dict(llm=chat_base, max_steps=2)
    final1 = Trainer(
        TrainConfig.from_yaml(tmp_path / "configs" / "stage1.yaml", output_dir=str(run / "s1"), stage0_steps=2, **short)
    ).run()
    assert len(json.loads((run / "s1" / "stage0.json").read_text())["losses"]) == 2
    final2 = Trainer(
        TrainConfig.from_yaml(
            tmp_path / "configs" / "stage2.yaml", output_dir=str(run / "s2"), init_from=str(final1), **short
        )
    ).run()
    for stage in ("s1", "s2"):
        steps = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1, 2] and all(s["loss"] > 0 for s in steps), steps
    card = (final2 / "README.md").read_text()
    assert "caption.json` (ratio 1)" in card and "train.json` (ratio 1200)" in card and "text.json` (ratio 120)" in card
    assert GenieBlueForConditionalGeneration.from_pretrained(final2).vision.tokens_per_tile == 16  # the demo's tower


@pytest.mark.parametrize("name", BASES)
def test_gpu_recipe_trains_two_steps_per_stage_on_tiny_models(tmp_path, name, so400m_like):
    hub_id, make = BASES[name]
    stages = [CONFIGS / name / f"stage{k}.yaml" for k in (1, 2)]
    for k, path in enumerate(stages, 1):
        raw = yaml.safe_load(path.read_text())
        assert raw["llm"] == hub_id and raw["stage"] == k, path
        assert {key: raw.get(key) for key in RECIPE} == RECIPE, path
    assert any(not d.get("image_folder") for d in yaml.safe_load(stages[1].read_text())["data"])  # text-only mixed in

    llm = _base(tmp_path / "llm", make)
    run = tmp_path / "runs"
    stage1 = _local_copy(stages[0], tmp_path, llm, so400m_like, n=2)
    one_row = dict(max_steps=2, batch_size=1, grad_accum=1)
    final1 = Trainer(TrainConfig.from_yaml(stage1, output_dir=str(run / "stage1"), **one_row)).run()
    stage2 = _local_copy(stages[1], tmp_path, llm, so400m_like, n=2)
    final2 = Trainer(
        TrainConfig.from_yaml(stage2, output_dir=str(run / "stage2"), init_from=str(final1), **one_row)
    ).run()
    for stage in ("stage1", "stage2"):
        steps = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1, 2] and all(s["loss"] > 0 for s in steps), steps
    card = (final2 / "README.md").read_text()  # both stages, stage 1 from the folder stage 2 started from
    assert card.index("- **stage 1** (connector only): 2 steps") < card.index("- **stage 2** (tower, connector")
    assert "blip_laion_cc_sbu_558k.json` (ratio 1)" in card and "text_only.jsonl` (ratio 0.1)" in card
    model = GenieBlueForConditionalGeneration.from_pretrained(final2)
    assert model.vision.tokens_per_tile == 27 * 27  # so400m's grid at 384 px, one token per patch
    assert model.manifest()["block_indices"] == [3, 7] and model.llm.config.model_type == make(8).model_type
    first = GenieBlueForConditionalGeneration.from_pretrained(final1)
    assert not torch.equal(
        first.vision.vit.embeddings.patch_embedding.weight, model.vision.vit.embeddings.patch_embedding.weight
    )  # stage 2 trained the ViT


@pytest.mark.parametrize("file, kind", [("ddp-8gpu.yaml", "MULTI_GPU"), ("fsdp-8gpu.yaml", "FSDP")])
def test_accelerate_configs_load_for_eight_gpus(file, kind):
    config = load_config_from_file(str(CONFIGS / "accelerate" / file))
    assert (config.distributed_type.value, config.num_processes, config.mixed_precision) == (kind, 8, "bf16")
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"
        assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"]  # rank 0 alone reads: Layout.rank0_weights
