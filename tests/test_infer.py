"""Serving: the batching engine (text rows stay bit-identical to the base, stop strings, streaming,
context overflow), the OpenAI-compatible server driven by the official `openai` client over a
real uvicorn socket (text, image, streaming, every bad input, a concurrent mixed load) and
`genieblue chat`. The model is saved with a training system prompt, and every text reply is
checked against the base loaded on its own: its own tokenizer's chat template, `generate`."""

from __future__ import annotations

import base64
import io
import itertools
import json
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from conftest import FAMILIES, TINY_SIGLIP, CountOps, load_reference, serving
from genieblue.cli import app as cli
from genieblue.data import GenieBlueProcessor, collate_prompts, save_processor_settings
from genieblue.infer.chat import ChatSession
from genieblue.infer.decode import StaticDecoder
from genieblue.infer.engine import ContextOverflow, Engine
from genieblue.infer.server import create_app
from genieblue.model import IMAGE_TOKEN_INDEX, GenieBlueForConditionalGeneration, load_tokenizer
from genieblue.model.routing import LoRAGroup, LoRALinear, held_lora, lora_groups, share_sibling_bases

QUESTIONS = ["Hi!", "What is the capital of France?", "Name three colours of the rainbow, please.", "2+2?"]
N = 8  # max_tokens in most tests
TRAINING_SYSTEM = "Answer briefly."  # the system prompt the model was "trained" with (processor.json)


def _png(size=(40, 40), seed=0, noise=True) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (
        rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) if noise else np.zeros((*size[::-1], 3), np.uint8)
    )
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def model_dir(chat_base, tmp_path_factory):
    """A tiny GenieBlue model whose delta was trained a little on the image path."""
    torch.manual_seed(0)
    model = GenieBlueForConditionalGeneration.from_base(chat_base, vision=TINY_SIGLIP)
    processor = GenieBlueProcessor.from_model(model, load_tokenizer(chat_base))
    ids, pixels = processor.prompt(_user("What is in the picture?"), [_png()])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        model(ids, pixel_values=pixels, labels=ids.masked_fill(ids == IMAGE_TOKEN_INDEX, -100)).loss.backward()
        opt.step()
        opt.zero_grad()
    folder = model.save_pretrained(tmp_path_factory.mktemp("served") / "tiny")
    save_processor_settings(folder, system_prompt=TRAINING_SYSTEM)
    return folder


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = Engine.load(model_dir)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def base(chat_base):
    return load_reference(chat_base)


@pytest.fixture(scope="module")
def base_tok(chat_base):
    """The base's own tokenizer, loaded on its own."""
    return AutoTokenizer.from_pretrained(chat_base)


def _base_prompt(tok, messages: list[dict]) -> torch.Tensor:
    """(1, T): the base's own rendering of a conversation, assistant turn opened."""
    return torch.tensor([tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)])


def _base_tokens(base, prompts: list[torch.Tensor], pad_id: int, n: int = N) -> list[list[int]]:
    """Greedy tokens of the independently loaded base on the left-padded batch, cut at end of turn."""
    batch = collate_prompts([(p, None) for p in prompts], pad_id)
    out = base.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        do_sample=False,
        max_new_tokens=n,
        pad_token_id=pad_id,
    )[:, batch["input_ids"].shape[1] :]
    eos = base.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    return [list(itertools.takewhile(lambda t: t not in eos, row)) for row in out.tolist()]


def _base_text(base, tok, messages: str | list[dict], n: int = N) -> str:
    """The base's greedy reply to a question (or a conversation), as its tokenizer decodes it."""
    messages = _user(messages) if isinstance(messages, str) else messages
    tokens = _base_tokens(base, [_base_prompt(tok, messages)], tok.pad_token_id, n)[0]
    return tok.decode(tokens, skip_special_tokens=True)


# engine -------------------------------------------------------------------------------------------
def test_text_prompts_are_the_base_template_and_only_images_get_the_training_system_prompt(engine, base_tok):
    """A text-only conversation is exactly the base tokenizer's own rendering, whatever the model
    was trained with; an image request without a system turn gets the training system prompt, and
    a system turn of its own replaces it."""
    processor = engine.processor
    assert processor.system_prompt == TRAINING_SYSTEM  # read back from processor.json
    conversations = [
        _user(QUESTIONS[1]),
        [*_user("Hi!"), {"role": "assistant", "content": "Hello."}, *_user(QUESTIONS[2])],
        [{"role": "system", "content": "Be a poet."}, *_user(QUESTIONS[0])],
        _user("What is <image> in text?"),  # a literal placeholder in a text request is just text
    ]
    for messages in conversations:
        ids, pixels = processor.prompt(messages)
        assert pixels is None and torch.equal(ids, _base_prompt(base_tok, messages))
        assert TRAINING_SYSTEM not in base_tok.decode(ids[0])
    ids, _ = processor.prompt(_user("What is this?"), [_png()])
    assert TRAINING_SYSTEM in base_tok.decode(ids[0][ids[0] >= 0])
    own = [{"role": "system", "content": "Be a poet."}, *_user("What is this?")]
    text = base_tok.decode(processor.prompt(own, [_png()])[0][0].clamp(min=0))
    assert "Be a poet." in text and TRAINING_SYSTEM not in text


def test_batched_text_rows_equal_the_base_on_the_same_padded_batch(engine, base, base_tok):
    """Requests queued together run as one text batch and one image batch; the text rows' greedy
    tokens equal the independently loaded base's on the same left-padded batch of its own prompts."""
    batcher = Engine(engine.model, engine.processor, start=False)
    texts = [batcher.submit(_user(q), max_tokens=N) for q in QUESTIONS]
    images = [batcher.submit(_user("What is this?"), [_png(seed=s)], max_tokens=N) for s in range(2)]
    batcher.start()
    results = [r.result() for r in texts + images]
    batcher.close()
    prompts = [_base_prompt(base_tok, _user(q)) for q in QUESTIONS]
    assert all(torch.equal(r.ids, p) for r, p in zip(texts, prompts))
    assert [r.tokens for r in texts] == _base_tokens(base, prompts, base_tok.pad_token_id)
    assert all(c.completion_tokens > 0 for c in results)


def test_static_cache_decoding_keeps_the_text_path_the_base_decoded_alike(engine, base, base_tok):
    """The engine's static-cache loop (eager here; a CUDA graph per shape on a GPU): text rows give the
    tokens of the independently loaded base decoded by the same loop on the same padded batch (and,
    in float32, of `generate` too); image rows those of the model's own image-path `generate`; a
    batch of a shape decoded before (its cache reused) gives the same tokens again."""
    static = Engine(engine.model, engine.processor, decode="eager", start=False)
    assert static.decoder is not None and Engine(engine.model, engine.processor).decoder is None  # CPU: generate
    static.eos_ids = set()  # every row decodes N tokens: nothing stops early
    texts = [static.submit(_user(q), max_tokens=N) for q in QUESTIONS]
    images = [static.submit(_user("What is this?"), [_png(seed=s)], max_tokens=N) for s in range(2)]
    static.start()
    for r in texts + images:
        r.result()
    static.close()
    prompts = [_base_prompt(base_tok, _user(q)) for q in QUESTIONS]
    batch = collate_prompts([(p, None) for p in prompts], base_tok.pad_token_id)
    expected = StaticDecoder(base).generate(**batch, max_new_tokens=N).tolist()
    assert [r.tokens for r in texts] == expected
    hf = base.generate(**batch, do_sample=False, max_new_tokens=N, min_new_tokens=N, pad_token_id=0)
    assert hf[:, batch["input_ids"].shape[1] :].tolist() == expected
    pictures = collate_prompts([(r.ids, r.pixels) for r in images], static.processor.pad_id)
    own = engine.model.generate(**pictures, do_sample=False, max_new_tokens=N, min_new_tokens=N)
    assert [r.tokens for r in images] == own.tolist()
    again = static.decoder.generate(**pictures, max_new_tokens=N)
    assert again.tolist() == own.tolist() and static.decoder.generate(**batch, max_new_tokens=N).tolist() == expected
    with pytest.raises(ValueError, match="'graph' needs a CUDA GPU"):
        StaticDecoder(engine.model, "graph")


def test_a_shared_base_model_decodes_text_on_its_multimodal_path_in_the_static_decoder_too(model_dir, chat_base):
    """A model saved with `shared_base` (the paper's ablation) answers text through copies and LoRA in
    `generate`; the static decoder (a GPU's greedy default) gives the same tokens, not the base's."""
    model = GenieBlueForConditionalGeneration.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.5)  # (a fresh B is zero: the path would equal the base's)
    model.shared_base = True
    processor = GenieBlueProcessor.from_model(model, load_tokenizer(chat_base))
    batch = collate_prompts([processor.prompt(_user(q)) for q in ("Hello!", "Name a colour.")], 0)
    run = lambda **kw: model.generate(**batch, do_sample=False, max_new_tokens=N, min_new_tokens=N, **kw)  # noqa: E731
    shared = run().tolist()
    assert shared != run(shared_base=False).tolist()
    assert StaticDecoder(model).generate(**batch, max_new_tokens=N).tolist() == shared


def test_an_image_decode_makes_each_lora_weight_once_and_takes_up_changed_weights(model_dir, chat_base, monkeypatch):
    """A decode makes each LoRA group's weights once, not at every step, and on the base the decoder
    shares computes each group's outputs in two products: per LoRA block and step, the ops that launch
    kernels (mm, addmm, addmm_, cat, mul) fall from 24 (the A of each sibling set stacked and scaled
    anew, then a product and an in-place B product per projection) to 18 (A held) to 8 (one product of
    the shared base with A's rows below it and one B product per group: q/k/v, o, gate/up, down; the
    text path takes 7; asserted as the steps between them, 6 and 10 per LoRA block). It gives the
    tokens of the model's own image-path `generate`, and takes up
    changed weights at its next decode, in the same tensors (a CUDA graph captured in one decode reads
    the next's)."""
    model = GenieBlueForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = GenieBlueProcessor.from_model(model, load_tokenizer(chat_base))
    batch = collate_prompts([processor.prompt(_user("What is this?"), [_png(seed=s)]) for s in range(2)], 0)
    decoder = StaticDecoder(model)
    decoder.generate(**batch, max_new_tokens=2)  # the shape's cache is made once
    kernels = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.cat, torch.ops.aten.mul)

    def per_step() -> float:
        counts = []
        for n in (2, 6):
            with CountOps(kernels) as counter:
                decoder.generate(**batch, max_new_tokens=n)
            counts.append(counter.calls)
        return (counts[1] - counts[0]) / 4

    shared = per_step()
    groups = lora_groups(model)
    lora_blocks = len(model.strategy.lora_indices(len(model.llm.model.layers)))
    with monkeypatch.context() as patch:
        patch.setattr(LoRAGroup, "_shares", lambda self: False)  # as after a move: each base weight apart
        apart = per_step()
        patch.setattr(LoRAGroup, "hold", lambda self: None)  # and every step makes the weights anew
        assert per_step() - apart == 6 * lora_blocks
    assert apart - shared == 10 * lora_blocks
    assert share_sibling_bases(model.llm) == len(groups)  # laid out anew: q/k/v, o, gate/up, down
    before = decoder.generate(**batch, max_new_tokens=N)
    tensors = [(g._held, g._held_b) for g in groups]
    own = lambda: model.generate(**batch, do_sample=False, max_new_tokens=N, min_new_tokens=N)  # noqa: E731
    assert before.tolist() == own().tolist()
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.normal_(std=0.5)
                m.lora_B.normal_(std=0.5)
    after = decoder.generate(**batch, max_new_tokens=N)
    assert after.tolist() == own().tolist() != before.tolist()
    assert all(g._held is a and g._held_b is b for g, (a, b) in zip(groups, tensors))


def test_compiled_decoding_keeps_the_text_path_the_base_compiled_alike(model_dir, chat_base):
    """decode="compile" (torch.compile; inductor's C++ kernels on this CPU, CUDA graphs too on a GPU):
    text rows give the tokens of the independently loaded base compiled and decoded alike; in float64,
    where fused kernels' rounding cannot flip a greedy token, text and image rows give the eager loop's
    tokens, and the compiled image path takes up changed LoRA weights at its next decode."""
    model = GenieBlueForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float64).eval()
    base = AutoModelForCausalLM.from_pretrained(chat_base, dtype=torch.float64).eval()
    processor = GenieBlueProcessor.from_model(model, load_tokenizer(chat_base))
    texts = collate_prompts([processor.prompt(_user(q)) for q in QUESTIONS[:2]], processor.pad_id)
    images = collate_prompts([processor.prompt(_user("What is this?"), [_png(seed=s)]) for s in range(2)], 0)
    compiled, eager = StaticDecoder(model, "compile"), StaticDecoder(model)
    text = compiled.generate(**texts, max_new_tokens=N)
    assert text.tolist() == StaticDecoder(base, "compile").generate(**texts, max_new_tokens=N).tolist()
    assert text.tolist() == eager.generate(**texts, max_new_tokens=N).tolist()
    before = eager.generate(**images, max_new_tokens=N)
    assert compiled.generate(**images, max_new_tokens=N).tolist() == before.tolist()
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.5)
    after = eager.generate(**images, max_new_tokens=N)
    assert compiled.generate(**images, max_new_tokens=N).tolist() == after.tolist() != before.tolist()


@pytest.mark.parametrize("family", FAMILIES)  # qwen2: q/k/v with biases; gemma3_text: a tied head
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_shared_sibling_base_keeps_the_text_path_the_bases_and_the_image_path(base_dirs, family, dtype):
    """`share_sibling_bases` lays each LoRA block's q/k/v and gate/up weights out in one buffer: the
    text path's logits stay those of the base loaded on its own (`torch.equal`), and a held image
    forward, which then takes one product per sibling set (biases included), gives the image path's
    logits; after the model is moved (each weight on its own), a hold notices and computes them apart."""
    model = GenieBlueForConditionalGeneration.from_base(base_dirs[family], TINY_SIGLIP, dtype=dtype).eval()
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.2)
    per = model.vision.tokens_per_tile
    ids = torch.randint(3, 128, (2, 12 + per), generator=torch.Generator().manual_seed(0))
    image = ids.clone()
    image[:, 2 : 2 + per] = IMAGE_TOKEN_INDEX
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=dtype)
    with torch.no_grad():
        groups = lora_groups(model.llm)
        assert sum(g.share_base() for g in groups) == len(groups)
        q = model.llm.model.layers[0].self_attn
        views = [getattr(q, name).original.weight for name in ("q_proj", "k_proj", "v_proj")]
        assert len({w.untyped_storage().data_ptr() for w in views}) == 1
        reference = AutoModelForCausalLM.from_pretrained(base_dirs[family], dtype=dtype).eval()
        assert torch.equal(model(ids).logits, reference(ids).logits)
        for m in model.modules():  # biases a fresh model has as zeros, which would test nothing
            if isinstance(m, LoRALinear) and m.original.bias is not None:
                m.original.bias.normal_(std=0.5)
        separate = model(image, pixel_values=pixels).logits
        with held_lora(model.llm):
            fused = model(image, pixel_values=pixels).logits
    close = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(fused, separate, **close)
    model.to(torch.float64)  # every weight moved on its own: a hold sees it, and computes the members apart
    with torch.no_grad():
        apart = model(image, pixel_values=pixels.double()).logits
        with held_lora(model.llm):
            assert not any(g.outputs_whole for g in groups) and all(g._base is None for g in groups)
            torch.testing.assert_close(model(image, pixel_values=pixels.double()).logits, apart)


def test_single_row_equals_the_base_and_the_image_path_differs(engine, base, base_tok):
    reply = engine.generate(_user(QUESTIONS[1]), max_tokens=N)
    assert reply.text == _base_text(base, base_tok, QUESTIONS[1])
    assert reply.prompt_tokens > 0 and reply.finish_reason in ("stop", "length")
    assert engine.generate(_user(QUESTIONS[1]), [_png()], max_tokens=N).text != reply.text


def test_stop_strings_and_streaming(engine):
    full = engine.generate(_user(QUESTIONS[2]), max_tokens=N).text
    stop = full[4:6]
    cut = engine.generate(_user(QUESTIONS[2]), max_tokens=N, stop=[stop])
    assert (cut.text, cut.finish_reason) == (full[: full.find(stop)], "stop")
    assert "".join(engine.generate(_user(QUESTIONS[2]), max_tokens=N, stream=True)) == full
    assert "".join(engine.generate(_user(QUESTIONS[2]), max_tokens=N, stop=stop, stream=True)) == cut.text
    assert engine.generate(_user(QUESTIONS[2]), max_tokens=N, stop="").text == full  # ("" once ended every reply)


def test_sampling_runs_and_bad_settings_are_refused(engine):
    sampled = engine.generate(_user(QUESTIONS[0]), max_tokens=N, temperature=0.9, top_p=0.8)
    assert 0 < sampled.completion_tokens <= N
    with pytest.raises(ContextOverflow, match="context of 512 tokens"):
        engine.submit(_user(QUESTIONS[0]), max_tokens=600)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(_user(QUESTIONS[0]), max_tokens=0)
    for temperature in (float("nan"), 2.5, -1):  # NaN once passed the check and failed in sampling (500)
        with pytest.raises(ValueError, match="need 0 <= temperature <= 2"):
            engine.submit(_user(QUESTIONS[0]), max_tokens=N, temperature=temperature)
    greedy = engine.generate(_user(QUESTIONS[0]), max_tokens=N, temperature=0).text
    assert engine.generate(_user(QUESTIONS[0]), max_tokens=N, temperature=1e-320).text == greedy  # no overflow


# server -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(engine):
    app = create_app(engine, model_name="tiny", max_image_bytes=200_000, max_image_pixels=1_000_000)
    with serving(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)


def _chat(client, content, **kwargs):
    kwargs.setdefault("max_tokens", N)
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], temperature=0, **kwargs
    )


@pytest.mark.integration
def test_text_chat_equals_the_base(client, base, base_tok):
    reply = _chat(client, QUESTIONS[1])
    assert reply.choices[0].message.content == _base_text(base, base_tok, QUESTIONS[1])
    assert reply.usage.prompt_tokens == _base_prompt(base_tok, _user(QUESTIONS[1])).shape[1]
    assert reply.usage.completion_tokens > 0
    assert [m.id for m in client.models.list().data] == ["tiny"]


@pytest.mark.integration
def test_image_chat_matches_the_engine(client, engine):
    parts = [{"type": "image_url", "image_url": {"url": _data_url(_png())}}, {"type": "text", "text": "What is this?"}]
    reply = _chat(client, parts).choices[0].message.content
    assert reply == engine.generate(_user("<image>\nWhat is this?"), [_png()], max_tokens=N).text


@pytest.mark.integration
def test_stream_concatenates_to_the_plain_reply(client):
    chunks = list(_chat(client, QUESTIONS[2], stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == _chat(client, QUESTIONS[2]).choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def _image(url):
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]


BAD = {
    "remote url": (_image("https://example.com/cat.png"), {}, 400, "invalid_image_url"),
    "local path when disabled": (_image("/etc/hostname"), {}, 400, "invalid_image_url"),
    "bad base64": (_image("data:image/png;base64,@@not base64@@"), {}, 400, "invalid_base64"),
    "corrupt image": (_image(_data_url(b"definitely not a png")), {}, 400, "invalid_image"),
    "too many pixels": (_image(_data_url(_png((1100, 1000), noise=False))), {}, 400, "invalid_image"),
    "too many bytes": (_image(_data_url(_png((300, 300)))), {}, 413, "image_too_large"),
    "unknown part": (
        [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
        {},
        400,
        "unsupported_content_type",
    ),
    "max_tokens too large": ("Hi", {"max_tokens": 100_000}, 400, "max_tokens_too_large"),
    "context overflow": ("Hi", {"max_tokens": 500}, 400, "context_length_exceeded"),
    "max_tokens zero": ("Hi", {"max_tokens": 0}, 400, None),
    "bad message shape": (None, {"extra_body": {"messages": "not a list"}}, 400, None),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_a_4xx_error_body_and_the_server_keeps_serving(client, case):
    content, kwargs, status, code = BAD[case]
    with pytest.raises(openai.APIStatusError) as info:
        _chat(client, content, **kwargs)
    err = info.value
    assert err.status_code == status
    assert err.code == code and isinstance(err.body, dict) and err.body["message"]
    assert set(err.body) == {"message", "type", "param", "code"}
    assert _chat(client, "Hi", max_tokens=2).choices[0].message.content is not None


@pytest.mark.integration
def test_local_images_when_allowed(engine, tmp_path):
    (tmp_path / "x.png").write_bytes(_png())
    with serving(create_app(engine, allow_local_images=True)) as url:
        local = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        reply = _chat(local, _image(str(tmp_path / "x.png"))).choices[0].message.content
    assert reply == engine.generate(_user("<image>\nWhat is this?"), [_png()], max_tokens=N).text


@pytest.mark.integration
def test_concurrent_mixed_load(client, base, base_tok):
    """24 clients at once, text and image mixed: no failures, each text reply is the base's."""
    expected = {q: _base_text(base, base_tok, q) for q in QUESTIONS}

    def one(i):
        question = QUESTIONS[i % len(QUESTIONS)]
        if i % 3 == 2:
            return None, _chat(client, _image(_data_url(_png(seed=i)))).choices[0].message.content
        return question, _chat(client, question).choices[0].message.content

    start = time.monotonic()
    with ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(one, range(48)))
    assert time.monotonic() - start < 45
    assert len(replies) == 48
    for question, reply in replies:
        assert reply is not None
        if question is not None:
            assert reply == expected[question]


@pytest.mark.integration
def test_invalid_json_and_unknown_routes_get_error_bodies(client):
    url = str(client.base_url).rstrip("/")
    for request, code in (
        (urllib.request.Request(url + "/chat/completions", b"{not json", {"content-type": "application/json"}), 400),
        (urllib.request.Request(url + "/nope"), 404),
    ):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == code
        assert set(json.loads(info.value.read())["error"]) == {"message", "type", "param", "code"}


# genieblue chat -----------------------------------------------------------------------------------
def test_chat_command_and_session_text_turns_equal_the_base(model_dir, base, base_tok):
    """`genieblue chat` (in-process) and a two-turn `ChatSession` reply to text as the base does."""
    result = CliRunner().invoke(cli, ["chat", "-m", str(model_dir), "--max-new-tokens", str(N), QUESTIONS[1]])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == _base_text(base, base_tok, QUESTIONS[1]).strip()
    session = ChatSession.load(model_dir, max_new_tokens=N)
    first = session.ask(QUESTIONS[0])
    assert first == _base_text(base, base_tok, QUESTIONS[0]).strip()
    history = [*_user(QUESTIONS[0]), {"role": "assistant", "content": first}, *_user(QUESTIONS[3])]
    assert session.ask(QUESTIONS[3]) == _base_text(base, base_tok, history).strip()


def test_chat_in_bfloat16_replies_what_the_base_in_bfloat16_replies(model_dir, chat_base, base_tok):
    """`genieblue chat --dtype bfloat16`: the text reply of the base loaded by transformers in bfloat16."""
    base16 = AutoModelForCausalLM.from_pretrained(chat_base, dtype=torch.bfloat16).eval()
    for question in QUESTIONS[1:3]:
        args = ["chat", "-m", str(model_dir), "--device", "cpu", "--dtype", "bfloat16", "--max-new-tokens", str(N)]
        result = CliRunner().invoke(cli, [*args, question])
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == _base_text(base16, base_tok, question).strip()
    result = CliRunner().invoke(cli, ["chat", "-m", str(model_dir), "--dtype", "float8", "Hi"])
    assert result.exit_code == 2 and "error: unknown dtype 'float8'" in result.stderr


def test_a_chat_turn_that_cannot_run_is_refused_and_the_session_goes_on(
    model_dir, base, base_tok, tmp_path, monkeypatch
):
    """An unreadable image and a conversation over the context are refused in one line (as `serve`
    refuses them) and leave the session as it was: the next turn replies as if they had not been."""
    (tmp_path / "text.png").write_text("not an image")
    session = ChatSession.load(model_dir, max_new_tokens=N)
    context = session.model.llm.config.max_position_embeddings
    with pytest.raises(ValueError, match="cannot"):
        session.ask("What is it?", tmp_path / "text.png")
    with pytest.raises(ContextOverflow, match=f"model's context of {context} tokens; .* lower max_new_tokens"):
        session.ask("word " * context)
    assert session.history == [] and session.images == []
    assert session.ask(QUESTIONS[1]) == _base_text(base, base_tok, QUESTIONS[1]).strip()
    # interactively: the error is printed and the next question answered
    answers = iter(["/image " + str(tmp_path / "text.png"), "What is it?", QUESTIONS[2], "/quit"])
    monkeypatch.setattr("genieblue.infer.chat.Prompt.ask", lambda *a, **k: next(answers))
    console = Console(file=io.StringIO(), width=200)
    ChatSession.load(model_dir, max_new_tokens=N).interactive(console)
    printed = console.file.getvalue()
    assert "error: " in printed and _base_text(base, base_tok, QUESTIONS[2]).strip() in printed
    result = CliRunner().invoke(cli, ["chat", "-m", str(model_dir), "word " * context])
    assert result.exit_code == 2 and "error: the prompt has" in result.stderr


# server limits ------------------------------------------------------------------------------------
KEY = "sekret-key"


@pytest.fixture(scope="module")
def guarded(engine):
    """A server with an API key, at most 2 images per request and the default body cap."""
    with serving(create_app(engine, model_name="tiny", api_key=KEY, max_images=2)) as url:
        yield url


def _error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == code and body["message"]


@pytest.mark.integration
def test_every_v1_route_needs_the_api_key(guarded):
    """Without `Authorization: Bearer KEY` every /v1 route answers 401 (unknown ones too); /health
    stays open; the openai client with the key is served."""
    body = {"model": "tiny", "messages": _user("Hi"), "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        _error(httpx.get(guarded + "/v1/models", headers=headers), 401, "invalid_api_key")
        _error(httpx.post(guarded + "/v1/chat/completions", json=body, headers=headers), 401, "invalid_api_key")
        _error(httpx.get(guarded + "/v1/nope", headers=headers), 401, "invalid_api_key")
    assert httpx.get(guarded + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded + "/v1", api_key="wrong", max_retries=0).models.list()
    keyed = openai.OpenAI(base_url=guarded + "/v1", api_key=KEY, max_retries=0, timeout=30)
    assert _chat(keyed, "Hi", max_tokens=2).choices[0].message.content is not None


def _head(url: str, length: int) -> tuple[socket.socket, bytes]:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    return sock, head.encode()


@pytest.mark.integration
def test_a_200_mb_body_gets_413_at_once_without_being_read(guarded):
    """The cap is checked on Content-Length: the server answers 413 after the headers and 64 KiB of
    a declared 200 MB body (the rest never sent), closes the connection, and keeps serving; a
    200 MB upload from httpx is refused within seconds too."""
    start = time.monotonic()
    sock, head = _head(guarded, 200 * 2**20)
    with sock:
        sock.sendall(head + b"x" * 2**16)
        reply = b""
        while chunk := sock.recv(65536):  # the server closes the connection after its reply
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413 ") and time.monotonic() - start < 5
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"

    sent = []

    def upload(chunk=b"x" * 2**20):
        for _ in range(200):
            sent.append(len(chunk))
            yield chunk

    start = time.monotonic()
    response = httpx.post(
        guarded + "/v1/chat/completions",
        content=upload(),
        timeout=30,
        headers={"Authorization": f"Bearer {KEY}", "Content-Length": str(200 * 2**20)},
    )
    _error(response, 413, "request_too_large")
    assert time.monotonic() - start < 10 and sum(sent) < 200 * 2**20
    keyed = openai.OpenAI(base_url=guarded + "/v1", api_key=KEY, max_retries=0, timeout=30)
    assert _chat(keyed, "Hi", max_tokens=2).choices[0].message.content is not None


@pytest.mark.integration
def test_a_chunked_body_over_the_cap_gets_413(engine):
    """Without a Content-Length the running size is counted: 413 once it passes the cap."""
    with serving(create_app(engine, max_body_bytes=2**20)) as url:
        chunks = (b"x" * 2**16 for _ in range(64))  # 4 MiB, sent chunked
        _error(httpx.post(url + "/v1/chat/completions", content=chunks, timeout=30), 413, "request_too_large")
        small = {"model": "tiny", "messages": _user("Hi"), "max_tokens": 2}
        assert httpx.post(url + "/v1/chat/completions", json=small, timeout=30).status_code == 200


@pytest.mark.integration
def test_too_many_images_are_refused(guarded):
    keyed = openai.OpenAI(base_url=guarded + "/v1", api_key=KEY, max_retries=0, timeout=30)
    image = {"type": "image_url", "image_url": {"url": _data_url(_png())}}
    with pytest.raises(openai.BadRequestError) as info:
        _chat(keyed, [image] * 3 + [{"type": "text", "text": "What are these?"}])
    assert info.value.code == "too_many_images"
    assert _chat(keyed, [image] * 2 + [{"type": "text", "text": "What are these?"}]).choices[0].message.content


@pytest.mark.integration
def test_a_full_queue_gets_503_and_serving_resumes(engine):
    """With `max_queue` requests waiting (the batching thread not started yet) the next gets 503,
    at once; once the engine runs, the waiting requests finish and new ones are served."""
    stalled = Engine(engine.model, engine.processor, start=False, max_queue=2)
    waiting = [stalled.submit(_user(q), max_tokens=2) for q in QUESTIONS[:2]]
    with serving(create_app(stalled, model_name="tiny")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as info:
            _chat(client, "Hi", max_tokens=2)
        assert info.value.status_code == 503 and info.value.code == "queue_full"
        stalled.start()
        assert all(r.result().completion_tokens > 0 for r in waiting)
        assert _chat(client, "Hi", max_tokens=2).choices[0].message.content is not None
    stalled.close()


def test_serve_warns_on_a_non_loopback_host_without_a_key(tmp_path, monkeypatch):
    """`genieblue serve --host 0.0.0.0` warns before loading anything unless a key is set (the
    option or GENIEBLUE_API_KEY); the missing model then fails as one line."""
    missing = str(tmp_path / "none")
    monkeypatch.delenv("GENIEBLUE_API_KEY", raising=False)
    for args, env, warned in (
        (["--host", "0.0.0.0"], {}, True),
        (["--host", "0.0.0.0", "--api-key", "k"], {}, False),
        (["--host", "0.0.0.0"], {"GENIEBLUE_API_KEY": "k"}, False),
        ([], {}, False),
    ):
        result = CliRunner().invoke(cli, ["serve", "-m", missing, *args], env=env)
        assert result.exit_code == 2 and f"model folder not found: {missing}" in result.stderr
        assert ("without an API key" in result.stderr) == warned


def test_serve_refuses_an_address_it_cannot_listen_on_before_loading(tmp_path):
    """A port in use, a host that is not this machine's and a port out of range are refused before the
    model loads (the model folder here does not exist: its error would mean the check came too late)."""
    missing = str(tmp_path / "none")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, says in (
            (["--port", str(port)], f"cannot listen on 127.0.0.1:{port} .*Address already in use"),
            (["--host", "999.1.1.1", "--api-key", "k"], "cannot listen on 999.1.1.1:8000"),
        ):
            result = CliRunner().invoke(cli, ["serve", "-m", missing, *args])
            assert result.exit_code == 2 and re.search(f"error: {says}", result.stderr), result.stderr
            assert "model folder not found" not in result.stderr
    result = CliRunner().invoke(cli, ["serve", "-m", missing, "--port", "99999"])
    assert result.exit_code == 2 and "Invalid value for '--port'" in result.output
