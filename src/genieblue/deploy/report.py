"""`genieblue export` and `genieblue bench deploy` results for the console: the exported files, the
paper's Table 9 on this machine, image-mode storage against its floor, the targets, and what W4A16
costs."""

from __future__ import annotations

from rich.table import Table

from . import activations as activations_setting


def export_table(manifest: dict, folder: str) -> Table:
    """The files of an export (`export_onnx`'s manifest) with their sizes and the mode that reads each."""
    table = Table(
        title=f"{folder}: {manifest['precision']}, {manifest.get('activations', 'float')} activations, vision graph "
        f"{'fixed to 1 tile' if manifest['single_tile'] else 'any number of tiles'}"
    )
    table.add_column("file")
    table.add_column("MiB", justify="right")
    table.add_column("read by")
    readers = {
        "text.onnx": "text mode",
        "image.onnx": "image mode",
        "vision.onnx": "image mode",
        "base.onnx.data": "text and image mode (one copy)",
        "delta.onnx.data": "image mode",
    }
    for name, size in manifest["bytes"].items():
        table.add_row(name, f"{size / 2**20:.1f}", readers.get(name, ""))
    return table


def bench_report(result: dict) -> list:
    """What `genieblue bench deploy` prints for a `bench_deploy` result, in order: the Table-9 table,
    the storage and target lines, and the accuracy table when measured."""
    return [
        table9_table(result),
        *target_lines(result),
        *([accuracy_table(result["accuracy"])] if "accuracy" in result else []),
    ]


def table9_table(result: dict) -> Table:
    """Text mode vs image mode: load, ViT, prefill, decode, storage, peak memory."""
    text, image = result["modes"]["text"], result["modes"]["image"]
    table = Table(
        title=f"Table 9 on this machine ({result['precision']}, {result.get('activations', 'float')} activations, "
        "onnxruntime CPU, "
        f"{result['prompt_tokens']}-token prompt, {result['new_tokens']} new tokens)"
    )
    for col in ("", "text mode", "image mode"):
        table.add_column(col, justify="left" if not col else "right")
    rows = [
        ("load time (s)", "load_s", "{:.2f}"),
        ("ViT time (ms)", "vit_s", "{:.1f}"),
        ("prefill (tokens/s)", "prefill_tokens_per_s", "{:.1f}"),
        ("decode (tokens/s)", "decode_tokens_per_s", "{:.1f}"),
        ("storage (MiB)", "storage_bytes", "{:.1f}"),
        ("peak memory, RSS (MiB)", "peak_rss_mb", "{:.0f}"),
    ]
    scale = {"vit_s": 1e3, "storage_bytes": 2**-20}
    for label, key, fmt in rows:
        cells = ["-" if r[key] is None else fmt.format(r[key] * scale.get(key, 1)) for r in (text, image)]
        table.add_row(label, *cells)
    return table


def target_lines(result: dict) -> list[str]:
    """llama.cpp beside text mode (when measured), image-mode storage by part against its floor, and
    the two targets: image / text decode and one copy of the base in memory."""
    t = result["targets"]
    parts, split = result["delta_bytes"], result["storage_breakdown"]
    decode, memory = t["decode_ratio"], t["single_base_in_memory"]
    mark = {True: "met", False: "NOT met"}
    llama = result.get("llama_cpp")
    versus = []
    if llama is not None:
        versus = [
            f"text mode vs llama.cpp ({llama['threads']} threads, same GGUF): decode "
            f"{result['modes']['text']['decode_tokens_per_s']:.1f} vs {llama['decode_tokens_per_s']:.1f} tokens/s "
            f"({100 * llama['decode_ratio']:.0f}%), prefill {result['modes']['text']['prefill_tokens_per_s']:.0f} vs "
            f"{llama['prefill_tokens_per_s']:.0f} tokens/s ({100 * llama['prefill_ratio']:.0f}%)"
        ]
    return versus + [
        f"image-mode storage beyond text mode: +{100 * result['storage_overhead']:.1f}% (its floor, the copied "
        f"blocks at the base's precision: +{100 * split['floor_copies_at_base_precision']:.1f}%); delta: copies "
        f"{parts['copies'] / 2**20:.1f} MiB, LoRA {parts['lora'] / 2**20:.1f} MiB, "
        f"ViT + projector {parts['vision'] / 2**20:.1f} MiB",
        "  of text-mode storage: "
        + ", ".join(f"{name} +{100 * v:.1f}%" for name, v in split.items() if name != "floor_copies_at_base_precision"),
        f"image / text decode: {100 * decode['value']:.1f}% (target >= {100 * decode['target']:.0f}%, paper "
        f"{100 * decode['paper']:.0f}%: {mark[decode['met']]})",
        "one copy of the base in memory: image-mode peak RSS exceeds text mode by "
        f"{memory['image_minus_text_peak_rss_mb']:.0f} MiB "
        f"< base weights {memory['base_data_mb']:.0f} MiB ({mark[memory['met']]})",
    ]


def accuracy_table(acc: dict) -> Table:
    """What W4A16 costs (`accuracy.deployment_cost`): scores float vs W4A16, logit errors, ONNX vs PyTorch."""
    activations = activations_setting.of(acc) + " activations in the exported graphs"
    table = Table(title=f"What W4A16 costs (vs the float model; {activations})")
    for col in ("", "float", "w4a16"):
        table.add_column(col, justify="left" if not col else "right")
    scores = acc["scores"]
    table.add_row(
        "held-out perplexity (text path)",
        f"{scores['float']['perplexity']:.3f}",
        f"{scores['w4a16']['perplexity']:.3f}",
    )
    table.add_row(
        "held-out text QA (text path)",
        f"{100 * scores['float']['text_qa']:.1f}%",
        f"{100 * scores['w4a16']['text_qa']:.1f}%",
    )
    if "vqa" in scores["float"]:
        table.add_row(
            "VQA exact match (image path)",
            f"{100 * scores['float']['vqa']:.1f}%",
            f"{100 * scores['w4a16']['vqa']:.1f}%",
        )
    for mode, e in acc["logit_error"].items():
        table.add_row(f"{mode} mode: max / mean |logit error|", "-", f"{e['max_abs']:.3f} / {e['mean_abs']:.3f}")
        table.add_row(f"{mode} mode: same greedy token", "-", f"{100 * e['top1_agreement']:.1f}%")
    for mode, e in acc["onnx_vs_pytorch"].items():
        table.add_row(
            f"ONNX vs PyTorch ({acc['exported_precision']}), {mode} mode: max |logit diff|", "-", f"{e['max_abs']:.2e}"
        )
    step = acc["deployed_text_stepwise"]
    table.add_row(
        f"exported text graph, token by token: perplexity ({step['positions']} tokens)",
        f"{step['perplexity_reference']:.3f}",
        f"{step['perplexity_deployed']:.3f}",
    )
    table.add_row("exported text graph, token by token: same next token", "-", f"{100 * step['same_next_token']:.1f}%")
    return table
