"""How faithful each runtime's text mode is to the base it runs, on one GGUF file: llama.cpp (through
the optional `llama-cpp-python` bindings, never a dependency) and exported genieblue folders, each
decoding token by token over held-out text, against the PyTorch base (transformers' load of the same
GGUF, dequantised to float32).

Prints, per runtime, perplexity next to the base's, the share of positions whose greedy next token is
the base's, and the mean / max |logit difference| - the yardstick of the exactness bar (">= 99% of
next tokens, perplexity within 0.5%", docs/deployment.md), applied to llama.cpp as well as to us.
Texts: the held-out passages of `genieblue eval`, plus 150-word chunks of each `--text` file (its
first 1200 words).

    python bench/llama_cpp_agreement.py --onnx phone [--onnx phone_int8] [--text LICENSE] [--gguf FILE]
        [--threads 1] [--json]

For bindings built elsewhere: PYTHONPATH=<llama-cpp-python source> LLAMA_CPP_LIB_PATH=<dir of libllama>.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from genieblue.deploy.accuracy import next_token_agreement, stepwise_text
from genieblue.eval.text import PASSAGES
from genieblue.model.sources import gguf_file, load_llm, load_tokenizer


def chunks(path: Path, words: int = 150, limit: int = 1200) -> list[str]:
    """The first `limit` words of a text file, in pieces of `words` words."""
    text = path.read_text().split()[:limit]
    return [" ".join(text[i : i + words]) for i in range(0, len(text), words)]


def llama_cpp_logits(gguf: Path, threads: int, context: int):
    """llama.cpp's logits after each of ids[:-1], decoded one token at a time; None without bindings."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(str(gguf), n_ctx=context, n_batch=1, n_threads=threads, logits_all=True, verbose=False)

    def next_logits(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids[:-1])
        return np.array(llm.scores[: len(ids) - 1])

    return next_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", action="append", default=[], help="an exported folder (repeatable)")
    parser.add_argument("--gguf", default=None, help="the GGUF base (default: the built-in one)")
    parser.add_argument("--text", action="append", default=[], type=Path, help="a text file to add (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp's threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args()

    gguf = gguf_file(args.gguf)
    if gguf is None:
        parser.error(f"--gguf must name a .gguf file, not {args.gguf}")
    reference, tokenizer = load_llm(args.gguf).eval(), load_tokenizer(args.gguf)
    texts = PASSAGES + [piece for path in args.text for piece in chunks(path)]
    results = {folder: stepwise_text(folder, reference, tokenizer, texts) for folder in args.onnx}
    context = max(len(tokenizer(text)["input_ids"]) for text in texts) + 1
    llama_cpp = llama_cpp_logits(gguf, args.threads, context)
    if llama_cpp is not None:
        results["llama.cpp"] = next_token_agreement(llama_cpp, reference, tokenizer, texts)
    if args.json:
        print(json.dumps({"gguf": str(gguf), "results": results}))
        return
    if llama_cpp is None:
        print("llama.cpp: skipped (no `llama_cpp` module: pip install llama-cpp-python)")
    for name, r in results.items():
        print(
            f"{name}: same next token {100 * r['same_next_token']:.1f}% of {r['positions']}, perplexity "
            f"{r['perplexity_deployed']:.4f} vs base {r['perplexity_reference']:.4f} "
            f"({100 * (r['perplexity_deployed'] / r['perplexity_reference'] - 1):+.2f}%), "
            f"|logit diff| mean {r['mean_abs_logit_diff']:.3g} max {r['max_abs_logit_diff']:.3g}"
        )


if __name__ == "__main__":
    main()
