"""Run an exported GenieBlue folder (`genieblue export`) with onnxruntime on the CPU, with numpy only
(no torch), as a phone app would: the text graph for text-only requests, the vision graph plus the
image graph for requests with an image, a plain-array KV cache carried from step to step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import onnxruntime as ort

MANIFEST = "deploy.json"
TOKENIZER = "tokenizer"
"""The base's tokenizer (`save_pretrained`), beside the processor settings: what serving the folder needs."""
MODE_GRAPHS = {"text": ("text",), "image": ("image", "vision")}
"""The graphs each mode loads."""


_POOL: list[int] = []
"""The size of this process's one onnxruntime thread pool, once `share_threads` made it."""


def share_threads(threads: int | None = None) -> None:
    """Make every later session of `threads` threads in this process (default: the cores it may
    use) run on one process-wide onnxruntime thread pool, before any session exists. For processes
    that run several sessions and nothing else on onnxruntime (the bench workers, `serve --onnx`):
    a pool per session leaves each idle session's threads spinning on the cores the running one
    needs (with 2 threads, text and image mode in one process decoded ~2.5x slower). Once made,
    onnxruntime refuses sessions with a pool of their own."""
    if not _POOL:
        threads = threads or len(os.sched_getaffinity(0))
        ort.set_global_thread_pool_sizes(threads, 1)
        _POOL.append(threads)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Options for a session on `threads` threads: the shared pool when `share_threads` made one."""
    options = ort.SessionOptions()
    if _POOL:
        if threads not in (None, _POOL[0]):
            raise ValueError(f"this process runs onnxruntime on {_POOL[0]} threads, not {threads}")
        options.use_per_session_threads = False
    elif threads:
        options.intra_op_num_threads = threads
    return options


def kv_names(layers: int, kind: str) -> list[str]:
    """The decoder graphs' KV-cache inputs (`kind` "past") or outputs ("present"): keys, then values."""
    return [f"{kind}_{part}.{i}" for part in ("key", "value") for i in range(layers)]


class DeployedModel:
    """An exported folder behind onnxruntime sessions, loaded per mode on demand."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not an exported GenieBlue folder (see genieblue export)")
        self.manifest = json.loads(path.read_text())
        self.threads = threads
        self.sessions: dict[str, ort.InferenceSession] = {}

    def load(self, mode: str) -> None:
        """Create the sessions `mode` ("text" or "image") needs."""
        for graph in MODE_GRAPHS[mode]:
            if graph not in self.sessions:
                path = self.folder / self.manifest["graphs"][graph]
                options = session_options(self.threads)
                self.sessions[graph] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def files(self, mode: str) -> list[str]:
        """The files on disk `mode` reads (graphs and external data)."""
        data = self.manifest["data"]
        graphs = [self.manifest["graphs"][g] for g in MODE_GRAPHS[mode]]
        return graphs + ([data["base"]] if mode == "text" else [data["base"], data["delta"]])

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        m = self.manifest
        return [np.zeros((batch, m["kv_heads"], 0, m["head_dim"]), np.float32)] * (2 * m["num_layers"])

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """(tiles, 3, S, S) normalised pixels -> (tiles * tokens_per_tile, D) features."""
        self.load("image")
        return self.sessions["vision"].run(None, {"pixel_values": pixel_values.astype(np.float32)})[0]

    def step(
        self,
        input_ids: np.ndarray,
        cache: list[np.ndarray],
        image_features: np.ndarray | None = None,
        attention_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: (B, T) ids after `cache` -> (last-position logits (B, V), new cache).
        With `image_features` it runs the image graph (pass the features on the step whose ids hold
        the placeholders; any (1, D) array on later steps), else the text graph."""
        mode = "text" if image_features is None else "image"
        self.load(mode)
        layers = self.manifest["num_layers"]
        if attention_mask is None:
            attention_mask = np.ones((input_ids.shape[0], cache[0].shape[2] + input_ids.shape[1]), np.int64)
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask}
        if image_features is not None:
            feed["image_features"] = image_features
        names = kv_names(layers, "past")
        feed.update(zip(names, cache))
        logits, *present = self.sessions[mode].run(None, feed)
        return logits[:, -1], present

    def tokens(
        self,
        input_ids: np.ndarray,
        pixel_values: np.ndarray | None = None,
        pick: Callable[[np.ndarray], int] | None = None,
    ) -> Iterator[int]:
        """The next tokens of one prompt (1, T) (with an image: its placeholders and pixel tiles),
        each chosen by `pick` from its (V,) logits (default: argmax), for as long as the caller
        reads; the step after a token runs only when the caller asks for the next one."""
        pick = pick or (lambda logits: int(logits.argmax()))
        features = None if pixel_values is None else self.image_features(pixel_values)
        logits, cache = self.step(input_ids, self.empty_cache(), features)
        later = None if features is None else features[:1]
        while True:
            token = pick(logits[0])
            yield token
            logits, cache = self.step(np.array([[token]]), cache, later)

    def generate(
        self,
        input_ids: np.ndarray,
        pixel_values: np.ndarray | None = None,
        max_new_tokens: int = 32,
        stop_at_eos: bool = True,
    ) -> list[int]:
        """Greedy tokens for one prompt (1, T) (with an image: its placeholders and pixel tiles)."""
        out: list[int] = []
        for token in islice(self.tokens(input_ids, pixel_values), max_new_tokens):
            if stop_at_eos and token in self.manifest["eos_token_ids"]:
                break
            out.append(token)
        return out
