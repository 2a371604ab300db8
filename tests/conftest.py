"""Shared fixtures: tiny random-weight bases of real architectures, saved to disk so tests can load
an independent copy of the base exactly as a user would. Every run starts by printing the versions
it runs with (pytest's report header; `.ci/run` shows them before the tests)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import socket
import threading
import time
import urllib.request

import pytest
import torch
import uvicorn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

VERSIONS = ("torch", "transformers", "accelerate", "onnxruntime", "lm-eval")


def pytest_report_header(config):
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return "versions: " + ", ".join([f"python {platform.python_version()}", *(f"{n} {version(n)}" for n in VERSIONS)])


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    matmuls on shared cores run hundreds of times faster than on two contended threads, and a test
    comparing against a one-thread subprocess computes as it does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VOCAB = 128
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=8,
    num_attention_heads=2,  # head dim 16: onnxruntime's GroupQueryAttention takes multiples of 16
    num_key_value_heads=1,
    max_position_embeddings=512,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
FAMILY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(head_dim=8, **_COMMON),
    "gemma3_text": lambda: Gemma3TextConfig(head_dim=8, sliding_window=16, **_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON),
}
FAMILIES = tuple(FAMILY_CONFIGS)

TINY_SIGLIP = {
    "model_type": "siglip_vision_model",
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
TINY_CLIP = dict(TINY_SIGLIP, model_type="clip_vision_model")
TINY_RESNET = {
    "model_type": "resnet",
    "image_size": 32,
    "embedding_size": 8,
    "hidden_sizes": [8, 16],
    "depths": [1, 1],
    "layer_type": "basic",
    "out_features": ["stage2"],
    "downsample": 1,
    "mix_tokens": True,
}
"""A transformers ResNet backbone (AutoBackbone) as the tower, the demo's kind: 32 px -> 4x4 cells."""


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory):
    """family -> folder holding a tiny random-weight base model (config.json + safetensors)."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for family, make in FAMILY_CONFIGS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make())
        model.save_pretrained(root / family)
        out[family] = str(root / family)
    return out


class CountOps(TorchDispatchMode):
    """Counts the aten calls made while it is active: those of `ops` (overload packets), or all."""

    def __init__(self, ops: tuple = ()):
        super().__init__()
        self.ops, self.calls = ops, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += not self.ops or func.overloadpacket in self.ops
        return func(*args, **(kwargs or {}))


def load_reference(path: str):
    """An independently loaded copy of a base model, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="session")
def chat_base(tmp_path_factory):
    """A tiny random Llama that speaks through the real SmolLM2 tokenizer and chat template."""
    from genieblue.model import load_tokenizer

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    config = LlamaConfig(
        **dict(
            _COMMON,
            vocab_size=len(tokenizer),
            num_hidden_layers=4,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    )
    folder = tmp_path_factory.mktemp("chat_base")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """The built-in synthetic dataset at 32 px (train/val/test JSON + PNGs) plus text-only records."""
    from genieblue._io import write_json
    from genieblue.data.synthetic import generate_dataset, text_only_samples

    folder = tmp_path_factory.mktemp("synth")
    paths = generate_dataset(folder, n_train=48, n_val=12, n_test=12, seed=0, image_size=32)
    write_json(folder / "text.json", text_only_samples(8, seed=0))
    return {**paths, "text": folder / "text.json"}


@contextlib.contextmanager
def serving(app):
    """The app on a real uvicorn server on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
