"""Greedy decoding at fixed shapes: transformers' `StaticCache`, and one decode step per token that a
GPU replays as a CUDA graph.

`generate` spends milliseconds of Python on every token (logits processors, stopping criteria, cache
bookkeeping), more than a small model's GPU step itself. Here the prompt is prefilled as usual, then
each token costs one step call (the LLM forward of one token per row, against a cache and an
attention mask whose shapes never change) and an argmax; the host only writes the step's inputs into
fixed buffers. `mode` says how the step runs:

  * "eager"   - as it is (CPUs, and the reference the others are checked against);
  * "graph"   - captured once per shape as a CUDA graph (`torch.cuda.CUDAGraph`) and replayed (a GPU);
  * "compile" - `torch.compile(mode="reduce-overhead")`: fused kernels, in CUDA graphs on a GPU (on a
                CPU, inductor's C++ kernels); each new shape and route compiles first (seconds to minutes),
                and past torch's recompile limit (`torch._dynamo.config.recompile_limit`, 8 by default)
                new ones run eagerly, with torch's warning: a mode for a few shapes, not a busy server.

A GenieBlue model decodes each row on its route: text-only rows run the untouched base, image rows the
copies and LoRA (each LoRA group of a block, q/k/v, o, gate/up, down, in two products: the decoder lays
its base weights out in one buffer with rows for its LoRA A, `routing.share_sibling_bases`, before it
captures or compiles anything). A plain
transformers model decodes the same way, so the base decoded with the same settings is what the text
path is compared with. Families with sliding-window layers (Gemma 3) keep per-layer masks this loop
does not build: `supports` says no and callers use `generate`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from transformers import PreTrainedModel, StaticCache
from transformers.cache_utils import StaticLayer

from ..model.routing import held_lora, share_sibling_bases

MODES = ("eager", "graph", "compile")
MIN_CACHE = 256
"""The cache length is the prompt plus new tokens rounded up to a power of two (at least this), so a
few shapes serve every request."""
MAX_SHAPES = 8
"""Shapes (rows, cache length, route) kept with their caches and graphs; the least recently used goes."""


def supports(llm: PreTrainedModel) -> bool:
    """Whether this loop can decode `llm`: transformers gives it a plain static cache layer per block
    (no sliding-window layers)."""
    return all(type(layer) is StaticLayer for layer in StaticCache(config=llm.config, max_cache_len=MIN_CACHE).layers)


def _bucket(length: int) -> int:
    return max(MIN_CACHE, 1 << (length - 1).bit_length())


class StaticDecoder:
    """Greedy decoding of a GenieBlue model or a plain causal LM with a static KV cache (see module)."""

    def __init__(self, model, mode: str = "eager"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "graph" and model.device.type != "cuda":
            raise ValueError(f"decode mode 'graph' needs a CUDA GPU; use 'eager' or 'compile' on {model.device}")
        self.model, self.mode = model, mode
        self.llm = getattr(model, "llm", model)  # a GenieBlue model's base inside, or the plain model
        if not supports(self.llm):
            raise ValueError(f"{self.llm.config.model_type} has sliding-window layers: decode it with generate")
        share_sibling_bases(self.llm)  # the image path's sibling projections in one product each
        self._shapes: dict[tuple, _Shape] = {}
        self._compiled = torch.compile(self._step, mode="reduce-overhead", dynamic=False) if mode == "compile" else None

    def _route(self, input_ids, pixel_values):
        """(context that sets the route, prefill inputs): a GenieBlue model's routing, or none."""
        if self.llm is self.model:
            if pixel_values is not None:
                raise ValueError("a plain language model cannot decode images")
            return contextlib.nullcontext(), {"input_ids": input_ids}
        if self.model._text_only(input_ids, pixel_values, None):  # (refuses placeholders without pixels)
            return self.model.router.route(image=False), {"input_ids": input_ids}
        # an image row, or a text row of a model whose text takes the multimodal path (`shared_base`)
        embeds, visual = self.model.embed_multimodal(input_ids, pixel_values)
        route = contextlib.ExitStack()  # the image route, with each LoRA's scaled A made once per decode
        route.enter_context(self.model.router.route(image=True, visual_mask=visual))
        route.enter_context(held_lora(self.llm))
        return route, {"inputs_embeds": embeds}

    def _step(self, shape: _Shape) -> torch.Tensor:
        out = self.llm(
            input_ids=shape.ids,
            attention_mask=shape.mask4d,
            position_ids=shape.positions,
            cache=shape.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        on_tokens: Callable[[list[int]], list[bool]] | None = None,
    ) -> torch.Tensor:
        """Greedy new tokens (B, n) for a left-padded batch. `on_tokens` gets each step's token per
        row and returns which rows are done; decoding stops when all are (or after max_new_tokens)."""
        device = self.model.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        rows, length = input_ids.shape
        shape = self._shape(rows, _bucket(length + max_new_tokens), pixel_values is not None)
        shape.start(attention_mask)
        route, prefill = self._route(input_ids, None if pixel_values is None else pixel_values.to(device))
        new = []
        with route:
            logits = self.llm(
                **prefill,
                attention_mask=attention_mask,
                position_ids=shape.prompt_positions(attention_mask),
                cache=shape.cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            for t in range(max_new_tokens):
                token = logits.argmax(-1)
                new.append(token)
                if on_tokens is not None and all(on_tokens(token.tolist())):
                    break
                if t + 1 < max_new_tokens:
                    shape.advance(token, length + t)
                    logits = self._run(shape)
        return torch.stack(new, 1)

    def _shape(self, rows: int, cache_len: int, image: bool) -> _Shape:
        key = (rows, cache_len, image)
        shape = self._shapes.pop(key, None) or _Shape(self.llm, rows, cache_len)
        self._shapes[key] = shape  # the most recently used last
        while len(self._shapes) > MAX_SHAPES:
            self._shapes.pop(next(iter(self._shapes)))
        return shape

    def _run(self, shape: _Shape) -> torch.Tensor:
        if self.mode == "eager":
            return self._step(shape)
        if self.mode == "compile":
            return self._compiled(shape).clone()  # the graph's output buffer is reused by the next replay
        if shape.graph is None:
            shape.capture(self._step)
        shape.graph.replay()
        return shape.logits.clone()


class _Shape:
    """The fixed-shape buffers of one (rows, cache length, route): cache, inputs and, in "graph"
    mode, the captured step."""

    def __init__(self, llm: PreTrainedModel, rows: int, cache_len: int):
        device, dtype = llm.device, llm.dtype
        self.cache = StaticCache(config=llm.config, max_cache_len=cache_len)
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.valid = torch.zeros(rows, cache_len, dtype=torch.bool, device=device)  # cache slots a row may attend
        self.mask4d = torch.zeros(rows, 1, 1, cache_len, dtype=dtype, device=device)  # 0 or the dtype's minimum
        self.minimum = torch.finfo(dtype).min
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def start(self, attention_mask: torch.Tensor) -> None:
        """A new batch: an empty cache (it counts its own length, on the device), and the prompt's
        real tokens as the slots to attend."""
        self.cache.reset()
        self.valid.zero_()
        self.valid[:, : attention_mask.shape[1]] = attention_mask.bool()

    @staticmethod
    def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions of a left-padded prompt, as transformers' generate numbers them."""
        return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)

    def advance(self, token: torch.Tensor, slot: int) -> None:
        """Write the next step's inputs: each row's new token goes into cache slot `slot` (the cache's
        own count of what it holds)."""
        self.ids.copy_(token[:, None])
        self.valid[:, slot] = True
        self.positions.copy_(self.valid.sum(-1, keepdim=True) - 1)
        self.mask4d.fill_(self.minimum).masked_fill_(self.valid[:, None, None, :], 0.0)  # in the mask's dtype

    def capture(self, step) -> None:
        """Run the step once on a side stream (warm-up: workspace allocations), put the cache's length
        back, then capture it; inputs and outputs stay in these buffers and the replay does the step."""
        lengths = [layer.cumulative_length.clone() for layer in self.cache.layers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step(self)
        torch.cuda.current_stream().wait_stream(stream)
        for layer, length in zip(self.cache.layers, lengths):
            layer.cumulative_length.copy_(length)  # the warm-up wrote this token's slot; the replay writes it again
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self)
