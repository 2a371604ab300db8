"""Load test of a running `genieblue serve` (PyTorch engine or `--onnx`) over loopback: greedy chat
completions of `--max-tokens` tokens each, from 1 client and then from `--clients` concurrent ones.

Prints per level the completion tokens per second summed over clients (tokens from the responses'
`usage`, over the wall time of the whole level), and the median request's tokens/s (its completion
tokens over its latency, prefill and queueing included) and latency.

    genieblue serve --onnx phone --threads 1 --port 8001 &
    python bench/serve_load.py --url http://127.0.0.1:8001 [--clients 8] [--requests 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx
from prompts import QUESTIONS


def one_request(url: str, prompt: str, max_tokens: int) -> dict:
    """One greedy completion: its completion tokens (`usage`) and latency."""
    body = {
        "model": "genieblue",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    start = time.perf_counter()
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return {"tokens": response.json()["usage"]["completion_tokens"], "latency_s": time.perf_counter() - start}


def level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads, each sending `requests` requests one after another."""
    results: list[dict] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for k in range(requests):
            result = one_request(url, QUESTIONS[(index + k) % len(QUESTIONS)], max_tokens)
            with lock:
                results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": sum(r["tokens"] for r in results),
        "throughput_tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "per_request_tokens_per_s": statistics.median(r["tokens"] / r["latency_s"] for r in results),
        "median_latency_s": statistics.median(r["latency_s"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2, help="Requests per client at each level.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    one_request(args.url, QUESTIONS[0], 4)  # warm-up
    levels = [level(args.url, n, args.requests, args.max_tokens) for n in (1, args.clients)]
    if args.json:
        print(json.dumps(levels, indent=2))
        return
    for r in levels:
        print(
            f"{r['clients']} client(s), {r['requests']} requests, {r['tokens']} tokens: "
            f"{r['throughput_tokens_per_s']:.1f} tokens/s in all, per request "
            f"{r['per_request_tokens_per_s']:.1f} tokens/s (prefill included), latency {r['median_latency_s']:.2f} s"
        )


if __name__ == "__main__":
    main()
