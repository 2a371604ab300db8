"""lm-eval integration: `GenieBlueLM`, registered as the lm-eval model "genieblue", scores one text
path of a saved GenieBlue model with lm-eval's own HF machinery (it subclasses `HFLM`: batching,
rolling windows, stop sequences, chat templates):

  * `base`       - the base LLM, loaded on its own (from the model's manifest, or `llm=`);
  * `non-shared` - the GenieBlue model's text path (the untouched base inside it: same scores);
  * `shared`     - text through the multimodal path (copies + LoRA, `shared_base=True`).

With a `resume_cache` every finished request is appended to a JSONL file (lm-eval's cache hook
reports each one) and a rerun skips the requests already there.

lm-eval finds models only in its own registry (it has no plugin entry points), so its CLI is run
through this module, which registers "genieblue" first:

    python -m genieblue.eval.harness --model genieblue --model_args pretrained=DIR,path=shared --tasks gsm8k
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lm_eval.api.model import CacheHook, hash_args
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import StoppingCriteria, StoppingCriteriaList

from ..loading import load_model_and_processor
from ..model import GenieBlueForConditionalGeneration, load_llm, load_tokenizer
from ..model.folder import MANIFEST, read_manifest
from ..model.placement import resolve_placement
from .cache import ResultCache

PATHS = ("base", "non-shared", "shared")
ROLLING_CHUNK = 32
"""loglikelihood_rolling reports results only when a whole call ends, so it is called on this many
documents at a time to keep an interruption cheap."""


class _PromptFirst(StoppingCriteria):
    """lm-eval's stop criteria expect prompt + new tokens; `generate` on the embeddings path
    (shared_base) shows only the new ones, so the prompt is put back in front."""

    def __init__(self, criteria: StoppingCriteriaList, prompt: torch.Tensor):
        self.criteria, self.prompt = criteria, prompt

    def __call__(self, input_ids, scores, **kwargs):
        return self.criteria(torch.cat([self.prompt, input_ids], 1), scores, **kwargs)


class _TextPath:
    """A GenieBlue model's text path with the face HFLM expects of a HF causal LM: `model(ids).logits`
    and `model.generate(...)` returning prompt + new tokens."""

    def __init__(self, model: GenieBlueForConditionalGeneration, shared_base: bool):
        self.genieblue, self.shared_base = model, shared_base
        self.config = model.llm.config

    @property
    def device(self) -> torch.device:
        return self.genieblue.llm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.genieblue.llm.dtype

    def parameters(self):
        return self.genieblue.parameters()

    def __call__(self, input_ids, **kwargs):
        return self.genieblue(input_ids, shared_base=self.shared_base, **kwargs)

    def generate(self, input_ids, stopping_criteria: StoppingCriteriaList, **kwargs):
        if self.shared_base:
            stopping_criteria = StoppingCriteriaList([_PromptFirst(stopping_criteria, input_ids)])
        new = self.genieblue.generate(
            input_ids, shared_base=self.shared_base, stopping_criteria=stopping_criteria, **kwargs
        )
        return torch.cat([input_ids, new], 1)


class _CacheWriter(CacheHook):
    """lm-eval's per-request cache hook, writing into a `ResultCache`."""

    def __init__(self, cache: ResultCache):
        self.dbdict = cache


def _load(pretrained: str, path: str, llm: str | None, device, dtype):
    """(model, tokenizer) for a saved GenieBlue folder, or for a plain LLM spec on the base path."""
    folder = Path(pretrained)
    if not (folder / MANIFEST).is_file():
        if path != "base":
            raise ValueError(
                f"{pretrained} is not a GenieBlue model folder (no {MANIFEST}); a plain LLM only has path=base"
            )
        return load_llm(pretrained, dtype, device), load_tokenizer(pretrained)
    if path == "base":
        spec = llm or read_manifest(folder)["base"]["llm"]
        return load_llm(spec, dtype, device), load_tokenizer(spec)
    model, processor = load_model_and_processor(folder, llm, device, dtype)
    return model, processor.tokenizer


@register_model("genieblue")
class GenieBlueLM(HFLM):
    """lm-eval model over one text path. `pretrained`: a saved GenieBlue folder (or, for path=base,
    any LLM spec), or an already loaded GenieBlue model / base LLM together with `tokenizer`.
    `resume_cache`: a JSONL file (or a `ResultCache`) of finished requests. `device` / `dtype`: where
    a model loaded here runs (default: a GPU in bfloat16 when there is one, else the CPU in float32);
    a loaded model is moved to `device` when one is given. Other keyword arguments go to `HFLM`
    (batch_size, max_length, ...). From lm-eval's CLI:
    `--model_args pretrained=DIR,path=shared,resume_cache=out/cache.jsonl`."""

    def __init__(
        self,
        pretrained,
        path: str = "non-shared",
        llm: str | None = None,
        tokenizer=None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        resume_cache: str | ResultCache | None = None,
        **kwargs,
    ):
        if path not in PATHS:
            raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
        name = None
        if isinstance(pretrained, (str, os.PathLike)):
            name = str(Path(pretrained).resolve()) if Path(pretrained).exists() else str(pretrained)
            device, dtype = resolve_placement(device, dtype)
            pretrained, tokenizer = _load(str(pretrained), path, llm, device, dtype)
        elif device is not None:
            pretrained.to(device)
        if isinstance(pretrained, GenieBlueForConditionalGeneration) == (path == "base"):
            raise ValueError(f"path={path} needs {'a plain base LLM' if path == 'base' else 'a GenieBlue model'}")
        if isinstance(pretrained, GenieBlueForConditionalGeneration):
            pretrained = _TextPath(pretrained, shared_base=path == "shared")
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
        if isinstance(resume_cache, (str, os.PathLike)):
            if name is None:
                raise ValueError(
                    "resume_cache as a file needs pretrained as a folder; pass a loaded model a ResultCache"
                )
            resume_cache = ResultCache(resume_cache, name, path, {"device": device, "dtype": dtype, "llm": llm})
        self.resume_cache = resume_cache
        if resume_cache is not None:
            self.set_cache_hook(_CacheWriter(resume_cache))

    def _resumed(self, kind: str, requests: list, compute, chunk: int | None = None) -> list:
        """Results for `requests`: cached ones read back, the rest computed (and cached by the hook)."""
        cache = self.resume_cache
        if cache is None:
            return compute(requests)
        keys = [hash_args(kind, r.args) for r in requests]
        sampled = [kind == "generate_until" and r.args[1].get("do_sample", False) for r in requests]
        todo = [(k, r) for k, r, s in zip(keys, requests, sampled) if s or k not in cache]
        fresh = {}
        step = chunk or max(1, len(todo))
        for start in range(0, len(todo), step):
            part = todo[start : start + step]
            fresh.update(zip((id(r) for _, r in part), compute([r for _, r in part])))
        return [fresh[id(r)] if id(r) in fresh else cache[k] for k, r in zip(keys, requests)]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._resumed(
            "loglikelihood", requests, lambda rs: super(GenieBlueLM, self).loglikelihood(rs, disable_tqdm)
        )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._resumed(
            "loglikelihood_rolling",
            requests,
            lambda rs: super(GenieBlueLM, self).loglikelihood_rolling(rs, disable_tqdm),
            ROLLING_CHUNK,
        )

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._resumed(
            "generate_until", requests, lambda rs: super(GenieBlueLM, self).generate_until(rs, disable_tqdm)
        )


def main() -> None:
    """lm-eval's own CLI, with the "genieblue" model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
