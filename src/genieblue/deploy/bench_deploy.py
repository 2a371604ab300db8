"""`genieblue bench deploy` as one function: export a saved model when the folder holds no export,
measure the paper's Table 9 on it (`bench.table9`), put llama.cpp's `llama-bench` on the same GGUF
beside text mode when a binary is at hand, and measure what W4A16 costs (`accuracy`).

It loads torch (the export and the accuracy measures need the model); the benchmark's worker
processes (`bench`) never import this module.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..model.folder import read_manifest
from ..model.sources import gguf_file
from . import activations as activations_setting
from .accuracy import deployment_cost
from .bench import llama_bench as run_llama_bench
from .bench import table9, versus_llama_cpp
from .onnx_export import export_saved_model
from .runtime import MANIFEST


def bench_deploy(
    model: str | Path,
    onnx: str | Path | None = None,
    *,
    single_tile: bool = True,
    prompt_tokens: int = 64,
    new_tokens: int = 32,
    threads: int | None = None,
    repeats: int = 3,
    rounds: int = 2,
    accuracy: bool = True,
    vqa: str | None = None,
    llm: str | None = None,
    keep_gguf: bool = True,
    activations: str = activations_setting.DEFAULT,
    llama_bench: str | None = None,
) -> dict:
    """Table 9 of a saved model on this machine, as `genieblue bench deploy --json` prints it.

    Args:
        model: a saved GenieBlue folder (`save_pretrained`).
        onnx: the exported folder to measure; exported there first (W4A16) if it holds no
            `deploy.json`. None: a fresh export in a temporary folder, removed afterwards.
        single_tile: with a fresh export, the vision graph fixed to one tile.
        prompt_tokens: prompt length (an image prompt's placeholders count).
        new_tokens: tokens decoded greedily per measurement.
        threads: onnxruntime threads (None: one per core), also llama-bench's.
        repeats: runs per worker process (load, ViT, prefill: the best run; decode: every step).
        rounds: rounds of worker processes (text mode, image mode, both modes' decode interleaved).
        accuracy: also measure what W4A16 costs (`accuracy.deployment_cost`), under "accuracy".
        vqa: with `accuracy`, a LLaVA JSON of short-answer image questions scored float vs W4A16.
        llm: the base LLM, if not the one named in the model's manifest.
        keep_gguf: with a fresh export of a GGUF base, keep the file's own quantisation.
        activations: with a fresh export, "float" or "int8" activations in the quantised matmuls.
        llama_bench: llama.cpp's `llama-bench` binary (None: one on PATH, if any), run on the
            base's GGUF file; its result goes under "llama_cpp".

    Returns:
        `bench.table9`'s result, plus "llama_cpp" and "accuracy" when measured.

    Raises:
        FileNotFoundError: `model` is not a saved model folder, or no `vqa` file.
        ValueError: `llama_bench` is given but the base is not a GGUF file, or an export setting is
            unknown.
        RuntimeError: a worker process or llama-bench failed.
    """
    binary = llama_bench or shutil.which("llama-bench")
    saved = read_manifest(model)["base"]["llm"]  # (first: a folder that is not a model is refused in one line)
    if vqa is not None and not Path(vqa).is_file():  # before any measurement
        raise FileNotFoundError(f"--vqa file not found: {vqa}")
    base = llm if llm is not None else saved
    gguf = gguf_file(base)
    if llama_bench and gguf is None:
        raise ValueError(f"--llama-bench runs llama.cpp on the base's GGUF file, and {model}'s base is not a GGUF file")
    with tempfile.TemporaryDirectory() as scratch:
        folder = onnx or str(Path(scratch) / "export")
        if not (Path(folder) / MANIFEST).is_file():
            export_saved_model(
                model,
                folder,
                precision="w4a16",
                single_tile=single_tile,
                llm=llm,
                keep_gguf=keep_gguf,
                activations=activations,
            )
        result = table9(folder, prompt_tokens, new_tokens, threads, repeats, rounds)
        if binary and gguf is not None:
            measured = run_llama_bench(binary, gguf, prompt_tokens, new_tokens, threads)
            result["llama_cpp"] = versus_llama_cpp(result, measured)
        if accuracy:
            result["accuracy"] = deployment_cost(model, folder, llm=llm, vqa=vqa)
    return result
