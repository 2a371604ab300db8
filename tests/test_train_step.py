"""The fast training step (issue 30) computes what the plain one did: on tiny random Llama, Qwen2 and
soft-capped Gemma3 models, a step's loss and every trainable gradient equal a reference written
here the straightforward way (LoRA as `original(x) + B(A(x)) * alpha / r` per projection, the loss
from float32 logits of every labelled position at once); sibling projections really share one LoRA A
product; the text path stays the base's, bit for bit, after fast steps; torch.compile of the blocks
changes no gradient; under bf16 autocast, the base's projections held in bf16 change no bit."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import FAMILY_CONFIGS, TINY_SIGLIP, CountOps, load_reference
from genieblue import GenieBlueForConditionalGeneration
from genieblue.model import IMAGE_TOKEN_INDEX
from genieblue.model.routing import LoRAGroup, LoRALinear
from genieblue.train import TrainConfig, Trainer
from genieblue.train.loss import causal_lm_loss
from genieblue.train.optim import build_optimizer
from genieblue.train.trainer import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _base(family: str):
    config = FAMILY_CONFIGS[family]()
    if family == "gemma3_text":
        config.final_logit_softcapping = 5.0  # logits the chunked loss must cap as Gemma's forward does
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _model(family: str, strategy: str, **options) -> GenieBlueForConditionalGeneration:
    """A model whose LoRA B is random (a fresh B is zero: A's gradient would be zero too)."""
    model = GenieBlueForConditionalGeneration.from_base(_base(family), TINY_SIGLIP, strategy, **options)
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.2)
    return model.train()


def _batch(model, seed: int = 0) -> dict:
    """Two packed rows of 40 tokens, one image each, labels on the text after it but not on all of it."""
    g = torch.Generator().manual_seed(seed)
    per = model.vision.tokens_per_tile
    ids = torch.randint(3, model.llm.config.vocab_size, (2, 40), generator=g)
    ids[:, 4 : 4 + per] = IMAGE_TOKEN_INDEX
    labels = ids.masked_fill(ids < 0, -100)
    labels[:, : 6 + per] = -100
    labels[1, 30:34] = -100
    size = model.vision.image_size
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(2, 3, size, size, generator=g)}


def _plain_lora(self, x):
    return self.original(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


def _reference_loss(model, batch: dict, num_tokens: int) -> torch.Tensor:
    """The training loss before issue 30: float32 logits of every labelled position, one cross-entropy."""
    labels = batch["labels"]
    positions = (labels[:, 1:] != -100).any(dim=0).nonzero().squeeze(-1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, shared_base=True, logits_to_keep=positions).logits
    targets = labels[:, positions + 1]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum") / (
        num_tokens
    )


def _step(model, batch: dict, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch, int((batch["labels"][:, 1:] != -100).sum()))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_step(ours, reference):
    (loss, grads), (ref_loss, ref_grads) = ours, reference
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert grad.abs().max() > 0 or name.startswith("vision."), f"{name}: a zero gradient tests nothing"
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("strategy", ["genieblue-skip", "lora", "full"])
@pytest.mark.parametrize("chunk", [1024, 7])
def test_fast_step_gives_the_plain_steps_loss_and_gradients(family, strategy, chunk, monkeypatch):
    model = _model(family, strategy)
    batch = _batch(model)
    ours = _step(model, batch, lambda m, b, n: causal_lm_loss(m, b, n, chunk=chunk))
    monkeypatch.setattr(LoRALinear, "forward", _plain_lora)
    _assert_same_step(ours, _step(model, batch, _reference_loss))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fast_step_with_gradient_checkpointing_gives_the_plain_steps_gradients(family, monkeypatch):
    """Recomputed blocks call the grouped projections again: each recompute shares A's product anew."""
    model = _model(family, "genieblue-skip")
    batch = _batch(model)
    model.gradient_checkpointing_enable()
    ours = _step(model, batch, lambda m, b, n: causal_lm_loss(m, b, n, chunk=7))
    monkeypatch.setattr(LoRALinear, "forward", _plain_lora)
    _assert_same_step(ours, _step(model, batch, _reference_loss))


def test_siblings_share_one_lora_a_product():
    """q/k/v and gate/up of every LoRA block form a group, and a step really shares their A product:
    per LoRA block, 4 A products instead of 7 forward, and 4 A gradients and 4 input gradients instead
    of 7 each backward (a group whose members recomputed it would run the plain count)."""
    model = _model("llama", "genieblue-skip")
    layers = model.llm.model.layers
    lora_blocks = [i for i in range(len(layers)) if i not in model.strategy.block_indices(len(layers))]
    for i in lora_blocks:
        attn, mlp = layers[i].self_attn, layers[i].mlp
        assert isinstance(attn.q_proj.group, LoRAGroup)
        assert attn.q_proj.group.members == [attn.q_proj, attn.k_proj, attn.v_proj]
        assert mlp.gate_proj.group.members == [mlp.gate_proj, mlp.up_proj]
        assert attn.o_proj.group.members == [attn.o_proj] and mlp.down_proj.group.members == [mlp.down_proj]
    batch = _batch(model)
    counts = {}
    for fused in (True, False):
        model.router.fused_lora = fused
        with CountOps((torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)) as counter:
            causal_lm_loss(model, batch, 10).backward()
        counts[fused] = counter.calls
    assert counts[False] - counts[True] == 9 * len(lora_blocks)


def test_text_path_is_the_base_after_fast_training_steps(base_dirs):
    """Steps as the trainer takes them (fused LoRA, chunked loss, fused AdamW) leave the text path the
    base's, bit for bit, against an independently loaded base."""
    model = GenieBlueForConditionalGeneration.from_base(base_dirs["qwen2"], TINY_SIGLIP, "genieblue-skip").train()
    opt, schedule = build_optimizer(model, TrainConfig(lr=1e-2), 3)
    assert opt.defaults["fused"]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for seed in range(2):
        causal_lm_loss(model, _batch(model, seed), 20, chunk=7).backward()
        opt.step()  # the first step has the warm-up's lr 0, the second lr 1e-2
        schedule.step()
        opt.zero_grad(set_to_none=True)
    unchanged = [n for n, p in model.named_parameters() if n in before and torch.equal(before[n], p)]
    assert not unchanged, unchanged
    model.eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_reference(base_dirs["qwen2"])(ids).logits)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("checkpointing", ["none", "before", "after"])
def test_compiled_blocks_give_the_eager_gradients_and_leave_text_mode_eager(checkpointing):
    """`compile_blocks` with gradient checkpointing enabled before or after it: the gradients are the
    eager ones, a checkpointed block really recomputes its (compiled) attention, and the text path
    stays the independently built base's, bit for bit, and compiles nothing."""
    model = _model("llama", "genieblue-skip")
    batch = _batch(model)
    eager = _step(model, batch, causal_lm_loss)
    calls = []
    model.llm.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    if checkpointing == "before":
        model.gradient_checkpointing_enable()
    model.compile_blocks()
    if checkpointing == "after":
        model.gradient_checkpointing_enable()
    _assert_same_step(_step(model, batch, causal_lm_loss), eager)
    assert len(calls) == (1 if checkpointing == "none" else 2)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model.eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _base("llama").eval()(ids).logits)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


def test_fast_step_under_bf16_autocast_is_as_close_to_float32_as_the_plain_one(monkeypatch):
    """The trainer's bf16 autocast: the fused update casts B to the activations' dtype itself (an in-place
    addmm_ is not autocast); its loss and gradients stay as near the float32 step as the plain step's."""
    model = _model("qwen2", "genieblue-skip")
    batch = _batch(model)
    exact = _step(model, batch, causal_lm_loss)
    with torch.autocast("cpu", torch.bfloat16):
        fast = _step(model, batch, causal_lm_loss)
        monkeypatch.setattr(LoRALinear, "forward", _plain_lora)
        plain = _step(model, batch, _reference_loss)

    def error(step) -> float:
        flat = [torch.cat([g.flatten() for _, g in sorted(s[1].items())]) for s in (step, exact)]
        return ((flat[0] - flat[1]).norm() / flat[1].norm()).item()

    assert {g.dtype for g in fast[1].values()} == {torch.float32}
    assert 0 < error(fast) < 1.25 * error(plain) < 0.1
    assert abs(fast[0] - exact[0]) < 1e-2 * exact[0]


def _train(out, chat_base, synth_data, steps: int, precision: str, **fields) -> tuple[list[float], dict]:
    """The losses and saved delta of a short run of the trainer, with gradient checkpointing."""
    cfg = TrainConfig(
        llm=chat_base,
        vision=TINY_SIGLIP,
        data=[{"path": str(synth_data["train"])}],
        max_length=256,
        batch_size=2,
        max_steps=steps,
        lr=1e-3,
        precision=precision,
        gradient_checkpointing=True,
        output_dir=str(out),
        **fields,
    )
    final = Trainer(cfg).run()
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in log], load_file(final / "delta.safetensors")


@pytest.mark.slow
@pytest.mark.integration
def test_a_compiled_checkpointed_training_run_takes_the_eager_runs_steps(tmp_path, chat_base, synth_data, monkeypatch):
    """`compile: true` in a training config (with gradient checkpointing): the trainer compiles the
    blocks, and its losses and final delta are the eager run's (up to the compiled kernels' rounding)."""
    compiled = []
    monkeypatch.setattr(
        GenieBlueForConditionalGeneration,
        "compile_blocks",
        lambda self, _original=GenieBlueForConditionalGeneration.compile_blocks: compiled.append(_original(self)),
    )
    runs = {
        compile_: _train(tmp_path / f"run-{compile_}", chat_base, synth_data, 3, "no", compile=compile_)
        for compile_ in (False, True)
    }
    assert len(compiled) == 1
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for name, tensor in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def _base_projection_values(family: str) -> int:
    """The values of an independently built base's `nn.Linear`s, less a head tied to the embeddings."""
    base = _base(family)
    tied = base.get_input_embeddings().weight
    linears = [m for m in base.modules() if isinstance(m, torch.nn.Linear) and m.weight is not tied]
    return sum(p.numel() for m in linears for p in m.parameters())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])  # untied head; q/k/v biases; tied head
@pytest.mark.parametrize("strategy", ["genieblue-skip", "lora", "full", "cogvlm-skip"])
def test_base_projections_held_in_bf16_change_nothing_under_bf16_autocast(family, strategy):
    """What the trainer does under bf16 autocast (`cast_base_projections`): the base's projections go
    to bf16, embeddings, norms and the whole delta stay float32, and a step's loss and every gradient,
    and the text path's logits (against an independently built base under the same autocast), are
    bit for bit what they were with the float32 projections."""
    model = _model(family, strategy)
    batch = _batch(model)
    delta = {k: v.clone() for k, v in model.delta_state_dict().items()}
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", torch.bfloat16):
        before = _step(model, batch, causal_lm_loss)
        assert model.cast_base_projections(torch.bfloat16) == _base_projection_values(family)
        after = _step(model, batch, causal_lm_loss)
        with torch.no_grad():
            text = model.eval()(ids).logits
            reference = _base(family).eval()(ids).logits
    assert torch.equal(after[0], before[0])
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][name], grad) for name, grad in before[1].items())
    assert torch.equal(text, reference)
    held = {p.dtype for m in model.llm.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
    assert torch.bfloat16 in held
    assert model.llm.get_input_embeddings().weight.dtype == torch.float32
    now = model.delta_state_dict()
    assert all(now[k].dtype == torch.float32 and torch.equal(now[k], v) for k, v in delta.items())


@pytest.mark.integration
def test_the_trainer_under_bf16_autocast_trains_as_with_float32_base_projections(tmp_path, chat_base, synth_data):
    """The trainer holds the base's projections in bf16 under bf16 autocast (here on a CPU, with gradient
    checkpointing): its losses and saved delta are bit for bit those of the same run with them in float32."""
    runs, cast = {}, []
    original = GenieBlueForConditionalGeneration.cast_base_projections
    for held in (True, False):

        def spy(self, dtype, held=held):
            cast.append((dtype, original(self, dtype) if held else 0))
            return cast[-1][1]

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(GenieBlueForConditionalGeneration, "cast_base_projections", spy)
            runs[held] = _train(tmp_path / f"run-{held}", chat_base, synth_data, 2, "bf16")
    assert [dtype for dtype, _ in cast] == [torch.bfloat16, torch.bfloat16] and cast[0][1] > 0
    assert runs[True][0] == runs[False][0]
    assert runs[True][1].keys() == runs[False][1].keys()
    assert all(torch.equal(runs[True][1][k], v) for k, v in runs[False][1].items())


def test_the_attention_a_config_names_runs_in_every_block_and_copy(tmp_path, chat_base):
    """`attn_implementation` reaches the block copies too (they share the base's config), so a packed
    row's samples stay apart under it on the image path: flex_attention's logits and loss (forward on
    this CPU; its BlockMask would break a copy left on sdpa) are sdpa's, and without the restarting
    positions the second sample's logits move. Refused before the first step: flex_attention on a CPU,
    and a flash implementation with more than one row a batch (transformers finds packed samples in the
    positions of a lone row only)."""
    cfg = TrainConfig(llm=chat_base, vision=TINY_SIGLIP, attn_implementation="eager", output_dir=str(tmp_path / "a"))
    model = build_model(cfg).eval()
    attention = [m for m in model.llm.modules() if type(m).__name__.endswith("Attention")]
    assert len(attention) > model.llm.config.num_hidden_layers  # the copies' own attention modules
    assert {m.config._attn_implementation for m in attention} == {"eager"}
    batch = _batch(model)
    batch["position_ids"] = torch.cat([torch.arange(28), torch.arange(12)]).expand(2, -1)  # two samples a row
    out = {}
    with torch.no_grad():
        for attn in ("sdpa", "flex_attention"):
            model.llm.set_attn_implementation(attn)
            out[attn] = model(**batch, use_cache=False)
        leaky = model(**dict(batch, position_ids=torch.arange(40).expand(2, -1)), use_cache=False).logits
    torch.testing.assert_close(out["flex_attention"].loss, out["sdpa"].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["flex_attention"].logits, out["sdpa"].logits, rtol=1e-4, atol=1e-4)
    # one long sample: the first is as packed, the second sees the first (its logits move: ~0.6 at 8 seeds)
    torch.testing.assert_close(leaky[:, :28], out["sdpa"].logits[:, :28], rtol=1e-4, atol=1e-4)
    assert (leaky[:, 28:] - out["sdpa"].logits[:, 28:]).abs().amax() > 0.1
    with pytest.raises(ValueError, match="flex_attention trains on a GPU only"):
        Trainer(
            TrainConfig(llm=chat_base, attn_implementation="flex_attention", device="cpu", output_dir=str(tmp_path))
        )
    flash = TrainConfig(llm=chat_base, attn_implementation="flash_attention_2", batch_size=2, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="keeps packed samples apart only with batch_size 1"):
        Trainer(flash)
