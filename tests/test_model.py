"""The base is sacred: the text path equals an independently loaded base, in every family, before
and after training; the fresh delta is an identity; save/load round-trips; errors are clear."""

from __future__ import annotations

import gc
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import FAMILIES, TINY_CLIP, TINY_RESNET, TINY_SIGLIP, VOCAB, load_reference
from genieblue import GenieBlueForConditionalGeneration as GenieBlue
from genieblue import Strategy
from genieblue.model import IMAGE_TOKEN_INDEX, STRATEGIES, fingerprint
from genieblue.model.fingerprint import file_digest, tensors_fingerprint
from genieblue.model.report import parameter_report

GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def _text_batch(seed=0, batch=2, length=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def _image_batch(model, seed=0):
    """Two rows, each: 3 text tokens, one image (one tile), 5 text tokens."""
    g = torch.Generator().manual_seed(seed)
    per = model.vision.tokens_per_tile
    text = torch.randint(3, VOCAB, (2, 8), generator=g)
    ids = torch.cat([text[:, :3], torch.full((2, per), IMAGE_TOKEN_INDEX), text[:, 3:]], dim=1)
    size = model.vision.image_size
    return ids, torch.randn(2, 3, size, size, generator=g)


def _train_steps(model, steps=2):
    """AdamW steps on the image path that change every trainable parameter."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(steps):
        ids, px = _image_batch(model, seed=step)
        labels = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, -100)
        model(ids, pixel_values=px, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    unchanged = sum(torch.equal(a, p) for a, p in zip(before, params))
    assert unchanged == 0, f"{unchanged} of {len(params)} trainable tensors did not change"


def _assert_text_path_is_base(model, ref):
    ids = _text_batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    expected = ref.generate(ids, **GREEDY)[:, ids.shape[1] :]
    assert torch.equal(model.generate(ids, **GREEDY), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_path_equals_independent_base_before_and_after_training(family, base_dirs):
    model = GenieBlue.from_base(base_dirs[family], vision=TINY_SIGLIP, strategy="genieblue-skip")
    ref = load_reference(base_dirs[family])
    _assert_text_path_is_base(model.eval(), ref)
    _train_steps(model)
    _assert_text_path_is_base(model, ref)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_keeps_text_path_and_trains(strategy, base_dirs):
    model = GenieBlue.from_base(base_dirs["qwen2"], vision=TINY_SIGLIP, strategy=strategy)
    _train_steps(model, steps=1)
    _assert_text_path_is_base(model, load_reference(base_dirs["qwen2"]))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_fresh_delta_is_identity_on_text_tokens(family, strategy, base_dirs):
    """LoRA B = 0 and copies = originals: the multimodal path reproduces the base on text tokens."""
    model = GenieBlue.from_base(base_dirs[family], vision=TINY_SIGLIP, strategy=strategy).eval()
    ref = load_reference(base_dirs[family])
    ids = _text_batch(seed=3)
    with torch.no_grad():
        assert torch.equal(model(ids, shared_base=True).logits, ref(ids).logits)
        # with an image: the routed model equals the base fed the same spliced embeddings
        img_ids, px = _image_batch(model)
        embeds, _ = model.embed_multimodal(img_ids, px)
        assert torch.equal(model(img_ids, pixel_values=px).logits, ref(inputs_embeds=embeds).logits)


def test_shared_base_sends_text_through_the_trained_path(base_dirs):
    model = GenieBlue.from_base(base_dirs["llama"], vision=TINY_SIGLIP)
    _train_steps(model)
    ids = _text_batch()
    with torch.no_grad():
        assert not torch.equal(model(ids, shared_base=True).logits, model(ids).logits)


def test_save_and_reload_gives_identical_outputs(base_dirs, tmp_path):
    model = GenieBlue.from_base(base_dirs["qwen3"], vision=TINY_CLIP, strategy="cogvlm-skip")
    _train_steps(model)
    model.save_pretrained(tmp_path / "delta")
    manifest = json.loads((tmp_path / "delta" / "genieblue.json").read_text())
    assert manifest["block_indices"] == [3, 7] and manifest["base"]["llm"] == base_dirs["qwen3"]
    reloaded = GenieBlue.from_pretrained(tmp_path / "delta").eval()
    ids, px = _image_batch(model)
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=px).logits, reloaded(ids, pixel_values=px).logits)
        text = _text_batch()
        assert torch.equal(model(text).logits, reloaded(text).logits)
    assert torch.equal(
        model.generate(ids, pixel_values=px, **GREEDY), reloaded.generate(ids, pixel_values=px, **GREEDY)
    )
    # only the delta is on disk: none of the base's tensors was written (none of its names, by the
    # base's own state dict with the wrappers' levels dropped, and none of its matrices' values)
    saved = load_file(tmp_path / "delta" / "delta.safetensors")
    base = load_reference(base_dirs["qwen3"]).state_dict()
    assert not {k.removeprefix("llm.").replace(".original", "") for k in saved} & set(base)
    assert not any(
        torch.equal(t, b) for t in saved.values() for b in base.values() if t.shape == b.shape != (t.numel(),)
    )


def test_a_loaded_model_is_in_eval_mode_and_a_strategy_may_be_named(base_dirs, tmp_path):
    """As transformers loads a model (a ResNet tower's BatchNorm would otherwise use each batch's
    statistics and change its running ones in an inference call)."""
    GenieBlue.from_base(base_dirs["llama"], vision=TINY_RESNET).save_pretrained(tmp_path / "d")
    loaded = GenieBlue.from_pretrained(tmp_path / "d", device="cpu")
    assert not any(m.training for m in loaded.modules())
    assert not GenieBlue.from_pretrained(tmp_path / "d", device="cpu", weights=False).training
    lora = GenieBlue.from_pretrained(tmp_path / "d", device="cpu", strategy="lora")
    assert lora.strategy == Strategy("lora") and not lora.training


def test_a_base_named_by_a_relative_path_or_a_path_object_is_saved_absolute(base_dirs, tmp_path, monkeypatch):
    """A manifest names its base from any working folder; a path that is not there is refused as
    such, not looked up on the hub."""
    base = tmp_path / "bases" / "llama"
    shutil.copytree(base_dirs["llama"], base)
    monkeypatch.chdir(tmp_path)
    GenieBlue.from_base("bases/llama", vision=TINY_SIGLIP).save_pretrained(tmp_path / "rel")
    GenieBlue.from_base(base, vision=TINY_SIGLIP).save_pretrained(tmp_path / "obj")  # a pathlib.Path
    for folder in ("rel", "obj"):
        assert json.loads((tmp_path / folder / "genieblue.json").read_text())["base"]["llm"] == str(base)
    monkeypatch.chdir(tmp_path / "obj")
    assert GenieBlue.from_pretrained(tmp_path / "rel", device="cpu").base_spec == str(base)
    with pytest.raises(FileNotFoundError, match="base LLM not found: ./bases/llama"):
        GenieBlue.from_base("./bases/llama", vision=TINY_SIGLIP)
    with pytest.raises(FileNotFoundError, match="vision tower not found: /no/such/tower"):
        GenieBlue.from_base(str(base), vision="/no/such/tower")
    shutil.rmtree(base)
    with pytest.raises(FileNotFoundError, match=f"base LLM not found: {base}"):
        GenieBlue.from_pretrained(tmp_path / "rel", device="cpu")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: "{not json", "genieblue.json is damaged \\(Expecting"),
        (lambda m: {**m, "format": "other"}, "is not a genieblue manifest"),
        (lambda m: {**m, "version": 99}, "is version 99, written by a newer genieblue"),
        (lambda m: {**m, "strategy": {**m["strategy"], "dropout": 0.1}}, r"settings unknown here \(dropout\)"),
        (lambda m: {k: v for k, v in m.items() if k != "vision"}, "is damaged: it lacks vision: save the model again"),
        (lambda m: {**m, "base": {"llm": m["base"]["llm"]}}, "is damaged: it lacks base.fingerprint"),
        (None, "delta.safetensors is damaged \\(Error while deserializing header"),
    ],
)
def test_a_damaged_model_folder_is_refused_in_one_line(damage, message, base_dirs, tmp_path):
    GenieBlue.from_base(base_dirs["llama"], vision=TINY_SIGLIP).save_pretrained(tmp_path / "d")
    manifest_file, delta = tmp_path / "d" / "genieblue.json", tmp_path / "d" / "delta.safetensors"
    if damage is None:
        delta.write_bytes(delta.read_bytes()[:1000])  # a copy cut short
    else:
        damaged = damage(json.loads(manifest_file.read_text()))
        manifest_file.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    with pytest.raises(ValueError, match=message):
        GenieBlue.from_pretrained(tmp_path / "d", device="cpu")


def test_saved_folder_has_a_model_card(base_dirs, tmp_path):
    """README.md beside the delta: the base and its fingerprint, the strategy and its copied
    blocks, the parameter counts (counted here from the delta itself), the commands to use it."""
    model = GenieBlue.from_base(base_dirs["llama"], vision=TINY_SIGLIP, strategy="genieblue-pre")
    model.save_pretrained(tmp_path / "mllm")
    card = (tmp_path / "mllm" / "README.md").read_text()
    manifest = json.loads((tmp_path / "mllm" / "genieblue.json").read_text())
    assert card.startswith("---\nlibrary_name: genieblue\n") and "base_model:" not in card  # a local folder, no hub id
    assert (
        f"base LLM: `{base_dirs['llama']}` (llama, 8 blocks), fingerprint `{manifest['base']['fingerprint']}`" in card
    )
    assert (
        manifest["block_indices"] == [0, 1] and "strategy: `genieblue-pre`, fraction 0.25; copied blocks: 0, 1;" in card
    )
    delta = model.delta_state_dict()
    trainable = sum(t.numel() for t in delta.values())
    llm_delta = sum(t.numel() for k, t in delta.items() if not k.startswith("vision."))
    assert f"| trainable (LLM delta + ViT + connector) | {trainable / 1e6:,.2f}M |" in card
    assert f"| LLM delta (copies + experts + LoRA) | {llm_delta / 1e6:,.2f}M |" in card
    assert "## Training\n\nNot trained (as built)." in card
    mllm = tmp_path / "mllm"
    for command in (
        f"genieblue chat -m {mllm} -i photo.jpg",
        f"genieblue serve -m {mllm}",
        f"genieblue export -m {mllm}",
    ):
        assert command in card
    assert not list(tmp_path.glob(".mllm*"))  # written inside the atomic folder
    assert "a text-only request runs it untouched" in card and "with an image runs the copied blocks" in card

    experts = GenieBlue.from_base(base_dirs["llama"], vision=TINY_SIGLIP, strategy="cogvlm-skip")
    experts.shared_base = True
    experts.save_pretrained(tmp_path / "experts")
    card = (tmp_path / "experts" / "README.md").read_text()
    assert "a text-only request runs the same trained path (shared base" in card
    assert "with an image runs visual experts for the image tokens and LoRA" in card
    assert "; blocks with visual experts: 3, 7;" in card


def test_reload_refuses_a_different_base(base_dirs, tmp_path):
    GenieBlue.from_base(base_dirs["llama"], vision=TINY_SIGLIP).save_pretrained(tmp_path / "d")
    other = load_reference(base_dirs["llama"])
    with torch.no_grad():
        other.model.norm.weight[0] += 1e-3  # a base fine-tuned ever so slightly
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="not the one this delta was trained on"):
        GenieBlue.from_pretrained(tmp_path / "d", llm=str(tmp_path / "other"))
    with pytest.raises(FileNotFoundError, match="delta.safetensors is missing"):
        (tmp_path / "d" / "delta.safetensors").unlink()
        GenieBlue.from_pretrained(tmp_path / "d")


def test_generate_pads_as_the_base_does(base_dirs):
    """A finished row of a text batch is padded with the base's pad id, 0 included; a base with no pad
    id and several EOS ids (as Llama-3-Instruct ships) pads with the first, as its own generate does."""
    model = GenieBlue.from_base(base_dirs["llama"], vision=TINY_SIGLIP).eval()
    ref = load_reference(base_dirs["llama"])
    assert ref.generation_config.pad_token_id == 0
    ids = _text_batch()
    first = ref.generate(ids, **GREEDY)[:, ids.shape[1] :]
    stop = int(first[0, 0])  # the first row's first token ends it: the rest of that row is padding
    assert stop not in first[1].tolist()
    greedy = {k: v for k, v in GREEDY.items() if k != "pad_token_id"}  # each model's own
    expected = ref.generate(ids, eos_token_id=stop, **greedy)[:, ids.shape[1] :]
    assert expected[0, 1:].eq(0).all() and torch.equal(model.generate(ids, eos_token_id=stop, **greedy), expected)
    for m in (model.llm, ref):
        m.generation_config.pad_token_id, m.generation_config.eos_token_id = None, [stop, 1]
    expected = ref.generate(ids, **greedy)[:, ids.shape[1] :]
    assert expected[0, 1:].eq(stop).all() and torch.equal(model.generate(ids, **greedy), expected)
    image_ids, px = _image_batch(model)
    assert model.generate(image_ids, pixel_values=px, **greedy).shape[0] == 2  # the image path takes it too


def test_placeholder_mismatch_names_both_counts(base_dirs):
    model = GenieBlue.from_base(base_dirs["llama"], vision=TINY_SIGLIP)
    ids, px = _image_batch(model)
    per = model.vision.tokens_per_tile
    with pytest.raises(ValueError, match=rf"hold {2 * per} image placeholder tokens .* give {per} image tokens"):
        model(ids, pixel_values=px[:1])
    with pytest.raises(ValueError, match=f"{2 * per} image placeholder tokens but no pixel_values"):
        model(ids)


def test_unsupported_architecture_names_supported_ones(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unsupported LLM architecture 'gpt2'; supported: llama, qwen2"):
        GenieBlue.from_base(str(tmp_path), vision=TINY_SIGLIP)
    with pytest.raises(ValueError, match=r"unsupported LLM architecture 'gpt2'; supported: llama, qwen2"):
        GenieBlue.from_base(GPT2LMHeadModel.from_pretrained(tmp_path), vision=TINY_SIGLIP)  # a model object alike


def test_gradient_checkpointing_replays_the_image_route(base_dirs):
    """Recomputed blocks must run in the mode of their forward, or gradients would be wrong."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GenieBlue.from_base(base_dirs["llama"], vision=TINY_SIGLIP, strategy="cogvlm-skip")
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        ids, px = _image_batch(model)
        model(ids, pixel_values=px, labels=ids.masked_fill(ids < 0, -100)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def _expected_llm_delta(reference, strategy: Strategy) -> dict:
    """The LLM delta's parts counted from an independently loaded base's own modules: a copy of each
    chosen block (and the final norm for `full`), a visual expert's q/k/v and MLP, LoRA's A (r x in)
    and B (out x r) on each target linear of the other blocks."""
    layers, numel = reference.model.layers, lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    chosen, parts = strategy.block_indices(len(layers)), {"copies": 0, "experts": 0, "lora": 0}
    if strategy.family in ("genieblue", "full"):
        parts["copies"] = sum(numel(layers[i]) for i in chosen) + (
            numel(reference.model.norm) if strategy.family == "full" else 0
        )
    if strategy.family == "cogvlm":
        attention = lambda b: sum(numel(getattr(b.self_attn, f"{x}_proj")) for x in "qkv")  # noqa: E731
        parts["experts"] = sum(attention(layers[i]) + numel(layers[i].mlp) for i in chosen)
    for i in strategy.lora_indices(len(layers)):
        for name, module in layers[i].named_modules():
            if name.rpartition(".")[2] in strategy.lora_targets:
                parts["lora"] += strategy.lora_rank * (module.in_features + module.out_features)
    return parts


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_wrappers_name_the_whole_llm_delta(strategy, base_dirs, tmp_path):
    """What stage 2 trains in the LLM, what the delta file holds besides the tower and the report's parts
    are the delta counted from an independently loaded base; every base weight stays, frozen, once."""
    model = GenieBlue.from_base(base_dirs["llama"], vision=TINY_SIGLIP, strategy=strategy)
    reference = load_reference(base_dirs["llama"])
    parts = _expected_llm_delta(reference, model.strategy)
    model.set_stage(2)
    llm = dict(model.llm.named_parameters())
    assert sum(p.numel() for p in llm.values() if p.requires_grad) == sum(parts.values()) > 0
    assert sum(p.numel() for p in llm.values() if not p.requires_grad) == sum(p.numel() for p in reference.parameters())
    model.save_pretrained(tmp_path / "d")
    saved = load_file(tmp_path / "d" / "delta.safetensors")
    assert sum(t.numel() for k, t in saved.items() if not k.startswith("vision.")) == sum(parts.values())
    assert {k: v for k, v in parameter_report(model, count_bytes=False)["params"].items() if k in parts} == parts


def test_the_reports_trainable_count_is_what_stage_2_trains(base_dirs):
    """With a tower that has a token mixer (the demo's kind), which trains with the projector."""
    model = GenieBlue.from_base(base_dirs["llama"], vision=TINY_RESNET)
    assert model.vision.mixer is not None
    model.set_stage(2)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert parameter_report(model, count_bytes=False)["params"]["trainable"] == trained


def test_stage_one_trains_only_the_projector(base_dirs):
    model = GenieBlue.from_base(base_dirs["llama"], vision=TINY_SIGLIP)
    model.set_stage(1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("vision.projector.") for n in trainable)
    model.set_stage(2)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".original." in n)


@pytest.mark.parametrize(
    "name,layers,expected",
    [
        ("genieblue-skip", 24, [3, 7, 11, 15, 19, 23]),
        ("genieblue-pre", 24, [0, 1, 2, 3, 4, 5]),
        ("cogvlm-post", 30, [23, 24, 25, 26, 27, 28, 29]),
        ("genieblue-skip", 30, [3, 7, 11, 15, 19, 23, 27]),
        ("lora", 24, []),
    ],
)
def test_block_choice(name, layers, expected):
    s = Strategy(name)
    assert s.block_indices(layers) == expected
    assert sorted(s.block_indices(layers) + s.lora_indices(layers)) == list(range(layers))


def test_unknown_strategy_lists_choices():
    with pytest.raises(ValueError, match="choose one of: genieblue-skip"):
        Strategy("genieblue-middle")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(lora_rank=2.5), "lora_rank must be a whole number >= 1, got 2.5"),
        (dict(lora_rank=True), "lora_rank must be a whole number >= 1, got True"),
        (dict(fraction="0.25"), "fraction must be a number in \\(0, 1\\], got '0.25'"),
        (dict(lora_alpha=0), "lora_alpha must be a number > 0, got 0"),
        (dict(lora_targets=["q_proj", "qproj"]), "unknown lora_targets \\['qproj'\\]; choose from: q_proj"),
    ],
)
def test_strategy_settings_of_the_wrong_kind_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        Strategy("genieblue-skip", **options)


def test_strategy_choices_that_once_built_nothing():
    """A single target name is that target (not its letters); a fraction whose step exceeds the blocks
    still copies k = 1 block (the last), as the placement rule says."""
    assert Strategy("lora", lora_targets="q_proj").lora_targets == ("q_proj",)
    assert Strategy("genieblue-skip", fraction=0.1).block_indices(8) == [7]
    assert Strategy("cogvlm-skip", fraction=0.03).block_indices(30) == [29]
    assert Strategy("genieblue-skip", fraction=0.5).block_indices(5) == [1, 3]  # (unchanged where a step fits)


def test_pretrained_vision_folders(base_dirs, tmp_path):
    """SigLIP / CLIP loaded from saved folders: CLIP features come from its penultimate layer
    (LLaVA's choice), SigLIP's from its last layer without the unused pooling head."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in TINY_CLIP.items() if k != "model_type"})).eval()
    clip.save_pretrained(tmp_path / "clip")
    siglip = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in TINY_SIGLIP.items() if k != "model_type"})).eval()
    siglip.save_pretrained(tmp_path / "siglip")
    pixels = torch.randn(2, 3, 32, 32)
    for folder, reference in (("clip", clip), ("siglip", siglip)):
        model = GenieBlue.from_base(base_dirs["llama"], vision=str(tmp_path / folder)).eval()
        tower = model.vision
        with torch.no_grad():
            ours = tower.vit(pixel_values=pixels).last_hidden_state
            ref = reference(pixel_values=pixels, output_hidden_states=True)
        expected = ref.hidden_states[-2] if folder == "clip" else ref.last_hidden_state
        assert torch.equal(ours, expected)
        assert not any("head" in n for n, _ in tower.vit.named_parameters())
        assert tower(pixels).shape == (2, tower.tokens_per_tile, 32)


def test_conv_backbone_tower_round_trips_and_stage1_trains_the_connector_only(base_dirs, tmp_path):
    """The demo's kind of tower: a transformers ResNet (AutoBackbone) -> token mixer -> projector."""
    model = GenieBlue.from_base(base_dirs["llama"], vision=TINY_RESNET).eval()
    tower = model.vision
    assert not tower.is_vit and tower.tokens_per_tile == 16 and tower.image_size == 32
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        cells = tower.encode(pixels)
        assert cells.shape == (3, 16, 16)  # 4x4 cells of the stage-2 feature map, 16 channels
        assert torch.equal(tower(pixels), tower.projector(cells))  # the mixer starts as the identity
        tower.mixer.mix.weight.normal_()
        mixed = tower(pixels)
    assert not torch.equal(mixed, tower.projector(cells))
    model.save_pretrained(tmp_path / "d")
    manifest = json.loads((tmp_path / "d" / "genieblue.json").read_text())
    assert manifest["vision"]["mix_tokens"] and manifest["vision"]["config"]["model_type"] == "resnet"
    loaded = GenieBlue.from_pretrained(tmp_path / "d", llm=base_dirs["llama"]).eval()
    with torch.no_grad():
        assert torch.equal(loaded.vision(pixels), mixed)
    kernels = [p for p in loaded.vision.vit.parameters() if p.dim() == 4]  # loaded as saved, then re-laid out
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    loaded.set_stage(1)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("vision.projector.", "vision.mixer.")) for n in trainable)
    loaded.set_stage(2)
    assert any(n.startswith("vision.vit.") and p.requires_grad for n, p in loaded.named_parameters())


def test_pretrained_backbone_folder_loads_its_weights(base_dirs, tmp_path):
    from transformers import AutoBackbone, AutoConfig

    options = ("downsample", "mix_tokens", "model_type")
    torch.manual_seed(0)
    config = AutoConfig.for_model("resnet", **{k: v for k, v in TINY_RESNET.items() if k not in options})
    reference = AutoBackbone.from_config(config).eval()
    reference.save_pretrained(tmp_path / "resnet")
    tower = GenieBlue.from_base(base_dirs["llama"], vision=str(tmp_path / "resnet")).eval().vision
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            tower.encode(pixels), reference(pixels).feature_maps[-1].flatten(2).transpose(1, 2), atol=1e-6
        )
    assert tower.tokens_per_tile == 4  # the default 2x2 downsampler over the 4x4 cells
    folder = str(tmp_path / "resnet")  # a pretrained tower's downsample comes from from_base's argument
    assert GenieBlue.from_base(base_dirs["llama"], vision=folder, downsample=1).vision.tokens_per_tile == 16
    with pytest.raises(ValueError, match=r"4x4 token grid cannot be downsampled by 3: pass a downsample that divides"):
        GenieBlue.from_base(base_dirs["llama"], vision=folder, downsample=3)


def test_unknown_vision_type_lists_the_choices(base_dirs):
    with pytest.raises(ValueError, match="supported: siglip_vision_model, clip_vision_model, .*resnet"):
        GenieBlue.from_base(base_dirs["llama"], vision={"model_type": "no-such-tower"})


# device, dtype and the base's fingerprint ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_delta_loads_in_any_dtype_and_its_text_path_is_the_base_loaded_alike(family, dtype, base_dirs, tmp_path):
    """Saved from a float32 model, loaded in `dtype`: logits and greedy tokens equal those of the base
    loaded by transformers in the same dtype on the same device."""
    model = GenieBlue.from_base(base_dirs[family], vision=TINY_SIGLIP)
    _train_steps(model)
    model.save_pretrained(tmp_path / "d")
    loaded = GenieBlue.from_pretrained(tmp_path / "d", device="cpu", dtype=dtype).eval()
    assert loaded.llm.dtype == dtype and loaded.device.type == "cpu"
    assert all(p.dtype == dtype for p in loaded.parameters())  # the delta too, converted on load
    ref = AutoModelForCausalLM.from_pretrained(base_dirs[family], dtype=dtype).eval()
    _assert_text_path_is_base(loaded, ref)
    # the tower, built without initialising its weights, holds every saved tensor (cast to dtype)
    saved = {k: v.to(dtype) for k, v in model.vision.state_dict().items()}
    assert all(torch.equal(v, saved[k]) for k, v in loaded.vision.state_dict().items())
    ids, px = _image_batch(loaded)
    with torch.no_grad():
        logits = loaded(ids, pixel_values=px).logits
        assert logits.dtype == dtype  # float32 pixels are cast by the tower
        if dtype == torch.float32:
            assert torch.equal(logits, model.eval()(ids, pixel_values=px).logits)


def test_a_delta_that_lacks_a_tensor_is_refused_whichever_strategy_it_starts(base_dirs, tmp_path):
    GenieBlue.from_base(base_dirs["llama"], vision=TINY_SIGLIP).save_pretrained(tmp_path / "d")
    tensors = load_file(tmp_path / "d" / "delta.safetensors")
    del tensors[next(k for k in tensors if k.startswith("vision.vit."))]
    save_file(tensors, tmp_path / "d" / "delta.safetensors")
    for strategy in (None, Strategy("lora")):  # the saved one; another (its tower only)
        with pytest.raises(ValueError, match=r"does not match the strategy: missing 1 \(e.g. vision.vit."):
            GenieBlue.from_pretrained(tmp_path / "d", strategy=strategy)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_structure_without_weights_is_the_model_with_nothing_read(family, base_dirs, tmp_path):
    """`weights=False` (a process of a sharded run that takes rank 0's weights) builds the model's
    tensors by name, shape and dtype with every parameter on the meta device, the buffers the model
    computes itself (rotary frequencies, ...) as it does, and tied weights tied, from a base folder
    holding no weight file and a model folder whose delta is unreadable; the base's fingerprint is asked
    only when needed (rank 0 may still be fetching the files) and then names the files as ever."""
    model = GenieBlue.from_base(base_dirs[family], vision=TINY_RESNET)
    model.save_pretrained(tmp_path / "d")
    (tmp_path / "d" / "delta.safetensors").write_bytes(b"not read")
    bare = tmp_path / "config-only"
    bare.mkdir()
    shutil.copy(os.path.join(base_dirs[family], "config.json"), bare)
    held = model.state_dict()
    unsaved = {k: b for k, b in model.named_buffers() if k not in held}
    tied = lambda m: m.llm.get_output_embeddings().weight is m.llm.get_input_embeddings().weight  # noqa: E731
    for structure in (
        GenieBlue.from_base(str(bare), vision=TINY_RESNET, weights=False),
        GenieBlue.from_pretrained(tmp_path / "d", llm=str(bare), device="cpu", weights=False),
    ):
        built = structure.state_dict()
        assert built.keys() == held.keys()
        assert all(built[k].shape == held[k].shape and built[k].dtype == held[k].dtype for k in held)
        assert {p.device.type for p in structure.parameters()} == {"meta"}
        buffers = dict(structure.named_buffers())
        assert unsaved and all(torch.equal(buffers[k], b) for k, b in unsaved.items())
        assert tied(structure) == tied(model)
        with pytest.raises(FileNotFoundError, match="no weight files found"):
            _ = structure.base_fingerprint


def test_info_counts_a_base_it_does_not_read(base_dirs, tmp_path):
    """`genieblue info` builds each strategy's structure only: from a base folder holding just its
    config it reports the counts of the model built with its weights, and as the delta's bytes the
    saved delta file's size less its header."""
    from typer.testing import CliRunner

    from genieblue.cli import app

    bare = tmp_path / "config-only"
    bare.mkdir()
    shutil.copy(os.path.join(base_dirs["llama"], "config.json"), bare)
    result = CliRunner().invoke(app, ["info", "--llm", str(bare), "--vision", "{bad"])
    assert result.exit_code == 2 and "error: --vision is not valid JSON (" in result.output, result.output
    result = CliRunner().invoke(app, ["info", "--llm", str(bare), "-s", "genieblue-skip", "-s", "full", "--json"])
    assert result.exit_code == 0, result.output
    for report in json.loads(result.stdout):
        model = GenieBlue.from_base(base_dirs["llama"], strategy=report["strategy"])
        assert report["params"] == parameter_report(model, count_bytes=False)["params"]
        model.save_pretrained(tmp_path / report["strategy"])
        file = tmp_path / report["strategy"] / "delta.safetensors"
        header = 8 + int.from_bytes(file.read_bytes()[:8], "little")  # safetensors: its length, then JSON
        assert report["delta_bytes"] == file.stat().st_size - header


def test_the_fingerprint_names_the_files_not_how_they_were_loaded(base_dirs, tmp_path):
    """The same files elsewhere are the same base, a copy with one weight changed is refused, the
    digests are remembered by path, size and mtime, and the hub cache's blob names are used as they are."""
    GenieBlue.from_base(base_dirs["llama"], vision=TINY_SIGLIP).save_pretrained(tmp_path / "d")
    copy = tmp_path / "copy"
    shutil.copytree(base_dirs["llama"], copy)
    assert GenieBlue.from_pretrained(tmp_path / "d", llm=str(copy), device="cpu").base_spec == str(copy)
    weights = copy / "model.safetensors"
    stat = weights.stat()
    tensors = load_file(weights)
    tensors["model.norm.weight"][0] += 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == stat.st_size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same path, size and mtime: the cached digest
    assert fingerprint(str(copy)) == fingerprint(base_dirs["llama"])
    weights.touch()  # a new mtime: hashed again, and refused
    with pytest.raises(ValueError, match="not the one this delta was trained on"):
        GenieBlue.from_pretrained(tmp_path / "d", llm=str(copy), device="cpu")
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    digest = "ab" * 32  # not the bytes' real digest: a hub blob's name is taken, never recomputed
    (blobs / digest).write_bytes(b"weights")
    (tmp_path / "hub" / "model.safetensors").symlink_to(blobs / digest)
    assert file_digest(tmp_path / "hub" / "model.safetensors") == digest


def test_a_delta_of_an_earlier_version_still_loads_and_is_checked_once(base_dirs, tmp_path, monkeypatch):
    """Earlier versions named the base by its float32 tensors: such a delta loads (in bfloat16 too),
    the match is remembered, and a different base is still refused."""
    monkeypatch.setenv("GENIEBLUE_CACHE", str(tmp_path / "cache"))
    GenieBlue.from_base(base_dirs["qwen2"], vision=TINY_SIGLIP).save_pretrained(tmp_path / "old")
    manifest_file = tmp_path / "old" / "genieblue.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["base"]["fingerprint"] = tensors_fingerprint(load_reference(base_dirs["qwen2"]))
    manifest_file.write_text(json.dumps(manifest))
    # a stage-1 folder of an earlier version continues (`init_from`): its base named by the tensors of a
    # freshly built model's base, the delta's wrappers already installed in it
    GenieBlue.from_base(base_dirs["qwen2"], vision=TINY_SIGLIP).check_continues(tmp_path / "old")
    monkeypatch.setenv("GENIEBLUE_CACHE", str(tmp_path / "cache"))  # (nothing remembered by the check above)
    shutil.rmtree(tmp_path / "cache")
    loaded = GenieBlue.from_pretrained(tmp_path / "old", device="cpu", dtype=torch.bfloat16)
    assert loaded.base_fingerprint.startswith("files-sha256:")  # saved again, it carries the new name
    cache = json.loads((tmp_path / "cache" / "fingerprints.json").read_text())
    assert cache[f"tensors:{loaded.base_fingerprint}"] == manifest["base"]["fingerprint"]
    with pytest.raises(ValueError, match="not the one this delta was trained on"):
        GenieBlue.from_pretrained(tmp_path / "old", llm=base_dirs["llama"], device="cpu")


def test_a_base_given_as_a_model_object_is_named_by_its_own_tensors(base_dirs, tmp_path):
    """A base built in Python (no files behind it) is named by its tensors, not by the delta installed
    in it: the saved delta loads onto an equal model, is refused by a different one, and a model built
    on it sees its folder as its own to continue."""
    config = load_reference(base_dirs["llama"]).config
    config.name_or_path = ""  # built from it, a model has no files behind it
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    twins = [AutoModelForCausalLM.from_config(config) for _ in range(2)]
    for twin in twins:
        twin.load_state_dict(base.state_dict())
    model = GenieBlue.from_base(base, vision=TINY_SIGLIP)
    _train_steps(model)
    model.save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="trained on a base given as a model object .* pass an equal one with llm="):
        GenieBlue.from_pretrained(tmp_path / "d")  # (not the built-in base the manifest's empty name would load)
    GenieBlue.from_base(twins[0], vision=TINY_SIGLIP).check_continues(tmp_path / "d")
    with pytest.raises(ValueError, match="already carries a GenieBlue delta .* pass a fresh base"):
        GenieBlue.from_pretrained(tmp_path / "d", llm=twins[0], device="cpu")  # the wrappers are in it now
    loaded = GenieBlue.from_pretrained(tmp_path / "d", llm=twins[1], device="cpu").eval()
    ids, px = _image_batch(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixel_values=px).logits, model.eval()(ids, pixel_values=px).logits)
    with pytest.raises(ValueError, match="not the one this delta was trained on"):
        GenieBlue.from_pretrained(tmp_path / "d", llm=AutoModelForCausalLM.from_config(config), device="cpu")


def _mapped(file) -> bool:
    """Whether this process maps `file` (Linux: /proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(str(file.resolve())) for line in maps)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_a_delta_loaded_in_another_dtype_leaves_no_part_of_its_file_mapped(base_dirs, tmp_path):
    """In its saved dtype (float32) the model's delta tensors are the file's mapped pages themselves;
    cast on load, nothing keeps the file mapped (one tensor left in it would keep all of it resident)."""
    GenieBlue.from_base(base_dirs["llama"], vision=TINY_RESNET).save_pretrained(tmp_path / "d")
    file = tmp_path / "d" / "delta.safetensors"
    as_saved = GenieBlue.from_pretrained(tmp_path / "d", device="cpu", dtype=torch.float32)
    assert _mapped(file)
    del as_saved
    gc.collect()
    assert not _mapped(file)
    cast = GenieBlue.from_pretrained(tmp_path / "d", device="cpu", dtype=torch.bfloat16)
    gc.collect()
    assert not _mapped(file) and cast.vision.state_dict()  # (held until here)


def test_unknown_devices_and_dtypes_are_refused_in_one_line(base_dirs, tmp_path):
    GenieBlue.from_base(base_dirs["llama"], vision=TINY_SIGLIP).save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="unknown dtype 'float8'; choose one of: bfloat16"):
        GenieBlue.from_pretrained(tmp_path / "d", dtype="float8")
    with pytest.raises(ValueError, match="unknown device 'nope': use cpu, cuda or cuda:N"):
        GenieBlue.from_pretrained(tmp_path / "d", device="nope")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        with pytest.raises(ValueError, match=f"device cuda:{count} asked for, but torch sees {count} GPU"):
            GenieBlue.from_pretrained(tmp_path / "d", device=f"cuda:{count}")
    else:
        with pytest.raises(ValueError, match="torch sees no CUDA GPU here: use --device cpu"):
            GenieBlue.from_pretrained(tmp_path / "d", device="cuda")
