"""The serving engine: one GenieBlue model (base weights held once) behind a batching thread.

`Engine.submit` encodes a chat request and queues it; a background thread takes every request
waiting, groups them by route and sampling settings (text-only rows together, image rows together)
and runs each group as one left-padded batch (`generate`, or for greedy groups on a GPU the static
decoder). Text-only groups run the untouched base path (the multimodal one for a model saved with
`shared_base`), so their greedy tokens equal the base model's on the same padded batch. Each row is followed
token by token (a stopping criterion sees every new token): its own `max_tokens`, stop strings and
incremental detokenisation, with text deltas handed to the caller as they are produced. At most
`max_queue` requests wait at a time; `submit` refuses more (`EngineBusy`) instead of holding them.

All of that but the `generate` call is `BatchingEngine`'s; `onnx_engine` runs the same requests on
an exported folder under onnxruntime.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..data import collate_prompts
from ..loading import load_model_and_processor
from ..model import GenieBlueForConditionalGeneration
from ..model.sources import eos_token_ids
from .decode import StaticDecoder, supports


class ContextOverflow(ValueError):
    """A prompt plus its `max_tokens` does not fit the model's context window."""


GREEDY_BELOW = 1e-5
"""A sampling temperature below this decodes greedily."""


def check_context(prompt_tokens: int, new_tokens: int, context: int, setting: str = "max_tokens") -> None:
    """Refuse (`ContextOverflow`) a prompt that, with the `new_tokens` its reply may take (the request's
    `setting`), does not fit the model's context window."""
    if prompt_tokens + new_tokens > context:
        raise ContextOverflow(
            f"the prompt has {prompt_tokens} tokens and {setting} is {new_tokens}: together more than the "
            f"model's context of {context} tokens; shorten the conversation or lower {setting}"
        )


class EngineBusy(RuntimeError):
    """The queue of waiting requests is full."""


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int


_DONE = object()


class Request:
    """One queued generation. The batching thread feeds it tokens; callers read `stream()` (text
    deltas) or `result()` (a `Completion`) from any thread."""

    def __init__(
        self,
        ids,
        pixels,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: tuple[str, ...],
        tokenizer,
        eos_ids: set[int],
    ):
        self.ids, self.pixels = ids, pixels
        self.max_tokens, self.temperature, self.top_p, self.stop = max_tokens, temperature, top_p, stop
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.tokens: list[int] = []
        self.text = ""  # the part of the reply already handed out
        self.finish_reason: str | None = None
        self._events: queue.Queue = queue.Queue()
        self._holdback = max((len(s) for s in stop), default=1) - 1  # a stop string may still be forming

    @property
    def group(self) -> tuple:
        """Requests with the same group can share one `generate` call."""
        return (self.pixels is not None, self.temperature, self.top_p)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    # batching-thread side ---------------------------------------------------------------------
    def push(self, token: int) -> None:
        """Take the next generated token: detokenise, look for stop strings, emit what is safe."""
        if self.done:
            return
        if token in self.eos_ids:
            return self._end(self._decode(), "stop")
        self.tokens.append(token)
        text = self._decode()
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self._end(text[: min(hits)], "stop")
        elif len(self.tokens) >= self.max_tokens:
            self._end(text, "length")
        elif not text.endswith("\ufffd"):  # never emit half a multi-byte character
            self._emit(text[: len(text) - self._holdback])

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _end(self, text: str, reason: str) -> None:
        self._emit(text)
        self.finish(reason)

    def _emit(self, text: str) -> None:
        if len(text) > len(self.text):
            self._events.put(text[len(self.text) :])
            self.text = text

    def finish(self, reason: str) -> None:
        if not self.done:
            self.finish_reason = reason
            self._events.put(_DONE)

    def fail(self, error: Exception) -> None:
        if not self.done:
            self.finish_reason = "error"
            self._events.put(error)

    # caller side ------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop generating for this request (e.g. its client went away)."""
        self.finish("cancelled")

    def stream(self) -> Iterator[str]:
        """Text deltas as they are generated; raises the generation error, if any."""
        while (event := self._events.get()) is not _DONE:
            if isinstance(event, Exception):
                raise event
            yield event

    def result(self) -> Completion:
        text = "".join(self.stream())
        return Completion(text, self.finish_reason, self.ids.shape[1], len(self.tokens))


def _feed(requests: list[Request], tokens: list[int]) -> list[bool]:
    """Hand each row's newest token to its request; returns which requests are done."""
    for request, token in zip(requests, tokens):
        request.push(token)
    return [r.done for r in requests]


class _FeedRows(StoppingCriteria):
    """`_feed` as a stopping criterion of `generate`: a row is finished once its request is."""

    def __init__(self, requests: list[Request]):
        self.requests = requests

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor(_feed(self.requests, input_ids[:, -1].tolist()), device=input_ids.device)


class BatchingEngine:
    """The runtime-independent part of an engine: encode and check requests, queue them, and a
    thread that takes every request waiting, groups them and hands each batch to `run_batch`."""

    MAX_QUEUE = 64

    def __init__(
        self, processor, context_length: int, eos_ids, max_batch: int, start: bool = True, max_queue: int = MAX_QUEUE
    ):
        self.processor, self.context_length, self.eos_ids = processor, context_length, set(eos_ids)
        self.max_batch, self.max_queue = max_batch, max_queue
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._thread = threading.Thread(target=self._loop, name="genieblue-engine", daemon=True)
        if start:
            self.start()

    # requests ---------------------------------------------------------------------------------
    def submit(
        self,
        messages: list[dict],
        images=(),
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | list[str] | tuple[str, ...] | None = None,
    ) -> Request:
        """Encode and queue a request. Raises `ValueError` for bad settings, `ContextOverflow` when
        prompt + max_tokens exceeds the context window, `ImageError` for an unusable image and
        `EngineBusy` when `max_queue` requests are already waiting."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not (0 <= temperature <= 2 and 0 < top_p <= 1):  # (NaN is neither)
            raise ValueError(f"need 0 <= temperature <= 2 and 0 < top_p <= 1, got {temperature} and {top_p}")
        if temperature < GREEDY_BELOW:  # as good as greedy, and logits / a tinier one overflow
            temperature = 0.0
        stop = tuple(s for s in ((stop,) if isinstance(stop, str) else stop or ()) if s)  # ("" would end every reply)
        ids, pixels = self.processor.prompt(messages, list(images))
        check_context(ids.shape[1], max_tokens, self.context_length)
        request = Request(ids, pixels, max_tokens, temperature, top_p, stop, self.processor.tokenizer, self.eos_ids)
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise EngineBusy(f"{self.max_queue} requests are already waiting; retry shortly") from None
        return request

    def generate(
        self, messages: list[dict], images=(), *, stream: bool = False, **settings
    ) -> Completion | Iterator[str]:
        """A reply (`Completion`), or with `stream=True` an iterator of text deltas; `settings` are
        `submit`'s. Greedy when temperature == 0, otherwise sampled with temperature and top_p."""
        request = self.submit(messages, images, **settings)
        return request.stream() if stream else request.result()

    # the batching thread ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (first := self._queue.get()) is not None:
            waiting = [first]
            while not self._queue.empty():
                waiting.append(self._queue.get())
            stopping = None in waiting
            groups = defaultdict(list)
            for request in waiting:
                if request is not None and not request.done:
                    groups[request.group].append(request)
            for group in groups.values():
                for start in range(0, len(group), self.max_batch):
                    self._run(group[start : start + self.max_batch])
            if stopping:
                return

    def _run(self, requests: list[Request]) -> None:
        try:
            self.run_batch(requests)
        except Exception as err:  # the requests fail, the engine keeps serving
            for request in requests:
                request.fail(RuntimeError(f"generation failed: {err}"))
        for request in requests:
            request.finish("length")

    def run_batch(self, requests: list[Request]) -> None:
        """Generate for requests of one group (at most `max_batch`), pushing each its tokens until
        it is done; a raised error fails them all."""
        raise NotImplementedError


class Engine(BatchingEngine):
    """Routes chat requests through one GenieBlue model: text-only -> the untouched base path (unless
    the model was saved with `shared_base`), image -> the copies + LoRA path; concurrent requests are
    batched by route.

    Greedy batches decode with a static KV cache (`decode.StaticDecoder`, `decode` is its mode: by
    default "graph" on a GPU, a CUDA graph per shape); sampled ones, and all of them with
    `decode="generate"` (the default on a CPU), run transformers' `generate`."""

    def __init__(
        self,
        model: GenieBlueForConditionalGeneration,
        processor,
        max_batch: int = 16,
        decode: str | None = None,
        **options,
    ):
        """`options`: `BatchingEngine`'s `start` and `max_queue`. Raises ValueError for a `decode` mode
        this model or device cannot run."""
        self.model = model.eval()
        if decode is None:
            decode = "graph" if model.device.type == "cuda" and supports(model.llm) else "generate"
        self.decoder = None if decode == "generate" else StaticDecoder(model, decode)
        context = model.llm.config.max_position_embeddings
        super().__init__(processor, context, eos_token_ids(model.llm, processor.tokenizer), max_batch, **options)

    @classmethod
    def load(cls, model_dir: str | Path, llm: str | None = None, device=None, dtype=None, **kwargs) -> Engine:
        """An engine over a saved GenieBlue folder (its base from the manifest, or `llm`) on `device`
        in `dtype` (default: a GPU in bfloat16 when there is one, else the CPU in float32); `kwargs`
        go to `Engine`. Raises what `GenieBlueForConditionalGeneration.from_pretrained` raises."""
        return cls(*load_model_and_processor(model_dir, llm, device, dtype), **kwargs)

    def run_batch(self, requests: list[Request]) -> None:
        """Generate for requests of one group as one left-padded batch."""
        first = requests[0]
        batch = collate_prompts([(r.ids, r.pixels) for r in requests], self.processor.pad_id)
        max_new = max(r.max_tokens for r in requests)
        if self.decoder is not None and first.temperature == 0:
            self.decoder.generate(**batch, max_new_tokens=max_new, on_tokens=lambda tokens: _feed(requests, tokens))
            return
        sampling = (
            {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p, "top_k": 0}
            if first.temperature > 0
            else {"do_sample": False}
        )
        self.model.generate(
            **batch,
            max_new_tokens=max_new,
            stopping_criteria=StoppingCriteriaList([_FeedRows(requests)]),
            pad_token_id=self.processor.pad_id,
            **sampling,
        )
