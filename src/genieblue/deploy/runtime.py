"""Run an exported GenieBlue folder (`genieblue export`) with onnxruntime on the CPU, with numpy only
(no torch), as a phone app would: the text graph for text-only requests, the vision graph plus the
image graph for requests with an image, and a KV cache carried from step to step: preallocated
buffers that the graphs' `GroupQueryAttention` reads and writes in place (`KVCache`, for exports
whose manifest says `kv_cache: shared_buffer`), or plain arrays, a new set per step.
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
SHARED_BUFFER = "shared_buffer"
"""The manifest's `kv_cache` of a decoder graph whose attention writes the new keys and values into
its past buffers in place (`GroupQueryAttention` given the same buffer as past and present)."""
CAPACITY = 256
"""Positions a fresh `KVCache` holds before it grows (doubling, up to the context length)."""


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


class KVCache:
    """Preallocated (batch, kv heads, capacity, head dim) key and value buffers of every layer, bound as
    both the past and the present of a decoder graph (IO binding), so each step writes only its new
    positions; `length` positions hold keys and values. It grows by doubling when a step needs more
    room. Changed in place by `DeployedModel.step`; one cache belongs to one mode."""

    def __init__(
        self, layers: int, batch: int, kv_heads: int, head_dim: int, vocab: int, limit: int, capacity: int = CAPACITY
    ):
        self.layers, self.limit, self.length = layers, limit, 0
        self.shape = (batch, kv_heads, min(capacity, limit), head_dim)
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(self.shape, np.float32)) for _ in range(2 * layers)]
        self.logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1, vocab), np.float32))
        self.bindings: dict[str, ort.IOBinding] = {}

    @property
    def capacity(self) -> int:
        return self.shape[2]

    def reserve(self, total: int) -> None:
        """Room for `total` positions (copying what is held into larger buffers if needed)."""
        if total <= self.capacity:
            return
        if total > self.limit:
            raise ValueError(f"{total} positions exceed the model's context length {self.limit}")
        size = min(max(2 * self.capacity, total), self.limit)
        self.shape = (*self.shape[:2], size, self.shape[3])
        grown = []
        for old in self.buffers:
            array = np.zeros(self.shape, np.float32)
            array[:, :, : self.length] = old.numpy()[:, :, : self.length]
            grown.append(ort.OrtValue.ortvalue_from_numpy(array))
        self.buffers, self.bindings = grown, {}

    def binding(self, session: ort.InferenceSession, mode: str) -> ort.IOBinding:
        """The session's IO binding with these buffers as past and present and the logits buffer as
        its output (made once per buffer set)."""
        if mode not in self.bindings:
            binding = session.io_binding()
            binding.bind_ortvalue_output("logits", self.logits)
            for name, buffer in zip(kv_names(self.layers, "past"), self.buffers):
                binding.bind_ortvalue_input(name, buffer)
            for name, buffer in zip(kv_names(self.layers, "present"), self.buffers):
                binding.bind_ortvalue_output(name, buffer)
            self.bindings[mode] = binding
        return self.bindings[mode]

    def arrays(self) -> list[np.ndarray]:
        """Copies of the held keys and values, (batch, kv heads, length, head dim) each (as `step` on
        plain arrays returns them)."""
        return [b.numpy()[:, :, : self.length].copy() for b in self.buffers]


class DeployedModel:
    """An exported folder behind onnxruntime sessions, loaded per mode on demand.

    Args:
        folder: a folder written by `genieblue export` (`export_onnx`).
        threads: onnxruntime's threads per session (None: onnxruntime's default, or the pool
            `share_threads` made).

    Raises:
        FileNotFoundError: `folder` is not there, or lacks deploy.json or a file it names.
        ValueError: a deploy.json that is not JSON.
    """

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not self.folder.is_dir():
            raise FileNotFoundError(f"export folder not found: {self.folder} (a folder that genieblue export wrote)")
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not an exported GenieBlue folder (see genieblue export)")
        try:
            self.manifest = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is damaged ({err}): export again") from None
        missing = [name for name in self.files("image") + self.files("text") if not (self.folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.folder / missing[0]} is missing: export again (genieblue export)")
        self.threads = threads
        self.sessions: dict[str, ort.InferenceSession] = {}

    def load(self, mode: str) -> None:
        """Create the sessions `mode` ("text" or "image") needs."""
        for graph in MODE_GRAPHS[mode]:
            if graph not in self.sessions:
                path = self.folder / self.manifest["graphs"][graph]
                options = session_options(self.threads)
                try:
                    self.sessions[graph] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                except Exception as err:  # onnxruntime's own errors, many lines each: a file cut short, say
                    first = str(err).strip().splitlines()[0][:300]
                    raise ValueError(f"{path} (or its data) cannot be loaded: {first}: export again") from None

    def files(self, mode: str) -> list[str]:
        """The files on disk `mode` reads (graphs and external data)."""
        data = self.manifest["data"]
        graphs = [self.manifest["graphs"][g] for g in MODE_GRAPHS[mode]]
        return graphs + ([data["base"]] if mode == "text" else [data["base"], data["delta"]])

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        """An empty plain-array cache: each `step` returns a new one (any export)."""
        m = self.manifest
        return [np.zeros((batch, m["kv_heads"], 0, m["head_dim"]), np.float32)] * (2 * m["num_layers"])

    def new_cache(self, batch: int = 1) -> KVCache | list[np.ndarray]:
        """The fastest empty cache this export runs: preallocated buffers written in place (`KVCache`)
        when its manifest says `kv_cache: shared_buffer`, else `empty_cache`."""
        m = self.manifest
        if m.get("kv_cache") != SHARED_BUFFER:
            return self.empty_cache(batch)
        return KVCache(m["num_layers"], batch, m["kv_heads"], m["head_dim"], m["vocab_size"], m["context_length"])

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """(tiles, 3, S, S) normalised pixels -> (tiles * tokens_per_tile, D) features."""
        self.load("image")
        return self.sessions["vision"].run(None, {"pixel_values": pixel_values.astype(np.float32)})[0]

    def step(
        self,
        input_ids: np.ndarray,
        cache: KVCache | list[np.ndarray],
        image_features: np.ndarray | None = None,
        attention_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, KVCache | list[np.ndarray]]:
        """One decoder call of the text graph, or with `image_features` of the image graph.

        Args:
            input_ids: (B, T) ids that follow what `cache` holds.
            cache: `new_cache()` or `empty_cache()` for a prompt, then what the last step returned.
                A `KVCache` is updated in place; a list of arrays is left as it is.
            image_features: `image_features(pixels)` on the step whose ids hold the placeholders;
                any (1, D) array on the later steps of an image conversation.
            attention_mask: (B, past + T) ones and zeros (default: all ones); rows must not be
                left-padded.

        Returns:
            (last-position logits (B, V), the cache after this step).

        Raises:
            ValueError: the attention mask's length is not past + T, or the context length would
                be exceeded (with a `KVCache`).
        """
        mode = "text" if image_features is None else "image"
        self.load(mode)
        if isinstance(cache, KVCache):
            return self._step_in_place(mode, input_ids, cache, image_features, attention_mask)
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

    def _step_in_place(self, mode, input_ids, cache: KVCache, image_features, attention_mask):
        total = cache.length + input_ids.shape[1]
        cache.reserve(total)
        if attention_mask is None:
            attention_mask = np.ones((input_ids.shape[0], total), np.int64)
        elif attention_mask.shape[1] != total:
            raise ValueError(f"the attention mask covers {attention_mask.shape[1]} positions, not {total}")
        binding = cache.binding(self.sessions[mode], mode)
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, np.int64))
        if image_features is not None:
            binding.bind_cpu_input("image_features", np.ascontiguousarray(image_features, np.float32))
        self.sessions[mode].run_with_iobinding(binding)
        cache.length = total
        return cache.logits.numpy()[:, -1].copy(), cache

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
        logits, cache = self.step(input_ids, self.new_cache(), features)
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
        """Greedy tokens for one prompt.

        Args:
            input_ids: (1, T) prompt ids (with an image: its placeholders).
            pixel_values: (tiles, 3, S, S) normalised pixel tiles of the image, if any.
            max_new_tokens: the most tokens returned.
            stop_at_eos: stop before the first end-of-reply id of the manifest.

        Returns:
            The new token ids, end-of-reply id left out.
        """
        out: list[int] = []
        for token in islice(self.tokens(input_ids, pixel_values), max_new_tokens):
            if stop_at_eos and token in self.manifest["eos_token_ids"]:
                break
            out.append(token)
        return out
