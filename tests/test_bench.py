"""The CPU-runnable parts of the GPU script (`bench/gpu.sh`) and of the benchmarks it calls, run for real
at tiny shapes: the Qwen2.5-3B recipe's files and configs as the script writes them, a training run
of the shipped recipe through the CLI, the training and decode benches, a served load, the text-path
check against the base, a chat with an image, stage 0 before a stage 1, the recipe under FSDP2 with
a checkpoint and --resume and compiled decode (slow tier), the requirements check before its first
stage and the offline wheels' list, and the load-time bench's numbers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _rehearse(tmp_path: Path, stages: str, ran: list[str], tokenizer: str) -> tuple[Path, Path]:
    """Run gpu.sh's `stages` at tiny shapes on this CPU with the tokenizer folder `tokenizer` (as
    gpu_offline.sh brings one: the script would otherwise convert the built-in base into its own fresh
    cache, ~30 s); checks that the commands `ran`, in order, each with status 0. Returns (OUT, WORK)."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "SMALL": "1", "STAGES": stages, "WORK": str(work), "OMP_NUM_THREADS": "1"}
    env["TOKENIZER"] = tokenizer
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert re.findall(r"== (\w+): rc=(\d+)", summary) == [(name, "0") for name in ran], summary
    return out, work


@pytest.mark.integration
def test_gpu_script_rehearses_on_a_cpu(tmp_path, chat_base):
    """Every stage but FSDP2's, compile's and attn's (the slow tier's test below; in the default tier, test_train
    runs FSDP2 through the CLI and test_infer compiled decoding)."""
    ran = ["prepare", "train_plain", "train_throughput", "train_throughput_ckpt", "train_throughput_bf16"]
    ran += ["train_packed_sdpa", "decode", "serve_load", "text_exact", "chat_image", "train_stage0"]
    out, work = _rehearse(tmp_path, "recipe,train,decode,serve,exact,chat,stage0", ran, chat_base)
    # the training bench, as the trainer runs (amp) and all in bf16: every strategy, the B products added
    # in place one per LoRA'd projection (7 a block: the tiny shape's 4 blocks for LoRA everywhere, 3 for
    # genieblue-skip, whose block 3 is copied), twice with gradient checkpointing (the forward runs again)
    for bench, forwards in (("train_throughput", 1), ("train_throughput_ckpt", 2), ("train_throughput_bf16", 0)):
        rows = {r["strategy"]: r for r in json.loads((out / f"{bench}.log").read_text())}
        assert {r["precision"] for r in rows.values()} == {"bf16" if bench.endswith("bf16") else "amp"}
        if forwards:
            products = [rows[s]["ops"]["aten::addmm_"] for s in ("full", "lora", "genieblue-skip")]
            assert products == [0, 28 * forwards, 21 * forwards]
        assert all(r["tokens_per_s"] > 0 for r in rows.values())
        for r in rows.values():  # each strategy against full fine-tuning's row
            assert r["speed_vs_full"] == pytest.approx(r["tokens_per_s"] / rows["full"]["tokens_per_s"])
            assert r["memory_vs_full"] == pytest.approx(r["peak_bytes"] / rows["full"]["peak_bytes"])
    packed = json.loads((out / "train_packed_sdpa.log").read_text())  # 4 samples a row, as the trainer packs
    assert [(r["strategy"], r["samples"], r["attn"]) for r in packed] == [("genieblue-skip", 4, "sdpa")]
    # the decode bench: both modes, and a decode step's operator calls per route (LoRA's only on the image path)
    decode = json.loads((out / "decode.log").read_text())
    assert set(decode["modes"]) == {"generate", "eager"}
    assert all(m["text_batch1"] > 0 and m["image_batch1"] > 0 for m in decode["modes"].values())
    assert 0 < decode["ops_per_step"]["text"]["aten_calls"] < decode["ops_per_step"]["image"]["aten_calls"]
    # the shipped recipe with base, tower, data and output swapped in, and no init_from, no checkpoints
    # and one micro-batch a step
    shipped = yaml.safe_load((ROOT / "configs" / "qwen2.5-3b" / "stage2.yaml").read_text())
    written = yaml.safe_load((work / "stage2.yaml").read_text())
    swapped = {"llm", "vision", "init_from", "data", "output_dir", "save_every", "grad_accum"}
    assert {k: v for k, v in written.items() if k not in swapped} == {
        k: v for k, v in shipped.items() if k not in swapped
    }
    assert written["precision"] == "bf16" and written["gradient_checkpointing"] and written["max_length"] == 4096
    assert [json.loads(line)["step"] for line in (out / "train_plain_metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "serve_request.json").read_text())["choices"][0]["message"]["content"]  # served reply
    assert [r["clients"] for r in json.loads((out / "serve_load.log").read_text())] == [1, 16]  # served load
    exact = json.loads((out / "text_exact.log").read_text().splitlines()[-1])
    assert exact["logits_equal"] == exact["chat_replies_equal"] == exact["prompts"] > 0
    assert exact["static_eager_tokens_equal"] is True
    assert (out / "chat_image.log").read_text().strip()
    assert json.loads((out / "train_stage0.json").read_text())["steps"] == 4  # stage 0 of the recipe's stage 1
    # the report a results page takes its tables from: each target beside its number
    report = (out / "report.md").read_text()
    assert re.search(r"^\| train_throughput_ckpt \| genieblue-skip \| \d+ \| [\d.]+ \| >= 1.2: ", report, re.M), report
    assert re.search(r"^\| eager \| [\d.]+ \| [\d.]+% (met|\*\*not met\*\*) \|", report, re.M), report
    assert re.search(r"^`serve`: [\d.]+ tokens/s with 1 client, [\d.]+ with 16: ", report, re.M), report
    assert "decode_compile: not run" in report and "s: not judged: not every stage asked)" in report


@pytest.mark.integration
def test_gpu_script_still_reports_when_the_recipe_cannot_be_made(tmp_path):
    """A failed first stage ends the run with its total and report.md, not with nothing; OUT and the
    other paths given relative are taken from the folder the script is run from."""
    (tmp_path / "not-a-tokenizer").mkdir()
    env = {**os.environ, "SMALL": "1", "STAGES": "recipe,serve", "WORK": "work", "TOKENIZER": "not-a-tokenizer"}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "out"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert re.fullmatch(r"== prepare: rc=[1-9]\d* at \d+ s\n== total: done at \d+ s\n", summary), summary
    assert "not run" in (tmp_path / "out" / "report.md").read_text()
    env["STAGES"] = "recipe,trian"  # a mistyped stage stops it at once, before any stage
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "out2"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and "unknown stage 'trian' in STAGES" in done.stderr, done.stderr


def test_gpu_report_says_why_a_stage_left_no_result(tmp_path):
    """A failed stage is named failed with its status, a skipped one skipped, one never reached not run."""
    (tmp_path / "summary.txt").write_text(
        "== decode: rc=124 at 5 s\n== serve_load: skipped (MAX_S=10 reached) at 9 s\n== total: done at 10 s\n"
    )
    report = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_report.py"), str(tmp_path)], capture_output=True, text=True
    ).stdout
    assert "decode: failed (rc=124; see decode.err)" in report and "decode_compile: not run" in report
    assert "serve: skipped (MAX_S=10 reached)" in report and "- fsdp_check: not run" in report


@pytest.mark.slow
@pytest.mark.integration
def test_gpu_script_fsdp_compile_and_attn_stages_rehearse_on_a_cpu(tmp_path, chat_base):
    """The recipe under FSDP2 as the script runs it (2 gloo processes here): a checkpoint, --resume from
    it, and the stage's own check that the resumed run and the reload equal the uninterrupted run; then
    compiled decode (inductor's CPU kernels here), and the recipe with another attention."""
    ran = ["prepare", "train_plain", "train_fsdp", "train_fsdp_resume", "fsdp_check"]
    ran += ["text_exact_compile", "decode_compile", "train_attn"]
    out, work = _rehearse(tmp_path, "recipe,fsdp,compile,attn", ran, chat_base)
    fsdp = json.loads((out / "fsdp_check.log").read_text())
    assert fsdp["reloaded_equal"] and fsdp["resumed_max_abs_diff"] < 1e-6, fsdp
    assert fsdp["resumed_losses"] == pytest.approx(fsdp["losses"][-1:], abs=1e-6)
    # the text path's compiled tokens are the base's compiled alike
    assert json.loads((out / "text_exact_compile.log").read_text().splitlines()[-1])["static_compile_tokens_equal"]
    compiled = json.loads((out / "decode_compile.log").read_text())["modes"]["compile"]
    assert compiled["text_batch1"] > 0 and compiled["image_batch1"] > 0
    # the recipe again with the attention the stage names (eager here: flex_attention has no CPU backward)
    assert json.loads((work / "attn" / "train_config.json").read_text())["attn_implementation"] == "eager"
    assert re.search(r"^- train_attn: \d+, \d+ \(loss", (out / "report.md").read_text(), re.M)


@pytest.mark.integration
def test_gpu_script_stops_before_any_stage_on_a_package_genieblue_cannot_run_with(tmp_path):
    """A GPU image's own transformers older than genieblue needs (5.17 on the lent machines' image) ends the
    script before its first stage, in one line that says how to bring the wheels."""
    old = tmp_path / "site" / "transformers-5.17.0.dist-info"  # found before the installed one
    old.mkdir(parents=True)
    (old / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.17.0\n")
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "SMALL": "1", "WORK": str(work), "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1
    said = r"^error: transformers 5\.17\.0 \(needed: transformers\S*>=5\.24\).*bench/gpu_offline\.sh DIR"
    assert re.search(said, done.stderr, re.M), done.stderr
    assert (out / "summary.txt").read_text() == "" and not work.exists()  # nothing ran, not even the tokenizer


def test_offline_wheels_bring_everything_their_packages_need_beyond_torch_and_the_image():
    """`bench/requirements.py wheels` (what gpu_offline.sh downloads) is closed: each listed package's own
    requirements are listed too, or are torch's, or one of the large packages a CUDA image holds. A list
    written by hand once missed the hub client's httpx2 and transformers' kernels, and the GPU run would
    have failed at its first import."""
    from importlib.metadata import distribution, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import requirements
    finally:
        sys.path.remove(str(ROOT / "bench"))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "requirements.py"), "wheels"], capture_output=True)
    listed = dict(line.split("==") for line in done.stdout.decode().split())
    assert done.returncode == 0 and listed["transformers"] == version("transformers")
    torch_own, _ = requirements.walk([Requirement("torch")])
    assert not set(listed) & (set(torch_own) | requirements.IMAGE)
    for name in listed:
        for spec in distribution(name).requires or []:
            need = Requirement(spec)
            if need.marker is None or need.marker.evaluate({"extra": ""}):
                assert canonicalize_name(need.name) in set(listed) | set(torch_own) | requirements.IMAGE, (name, spec)


@pytest.mark.integration
def test_gpu_script_starts_no_stage_past_max_s(tmp_path, chat_base):
    """MAX_S (a device call's time limit): stages that would start after it are skipped and said so."""
    out = tmp_path / "out"
    env = {**os.environ, "SMALL": "1", "WORK": str(tmp_path / "work"), "MAX_S": "1", "TOKENIZER": chat_base}
    env.pop("STAGES", None)  # every stage asked
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    skipped = re.findall(r"== (\w+): skipped \(MAX_S=1 reached\)", (out / "summary.txt").read_text())
    stages = ["recipe", "train", "decode", "serve", "fsdp", "exact", "chat", "stage0", "compile", "attn"]
    assert skipped == stages and not (out / "prepare.log").exists()
    report = (out / "report.md").read_text()
    assert "| recipe | skipped (MAX_S=1 reached) |" in report and "decode: skipped (MAX_S=1 reached)" in report
    assert f"s: not judged: {', '.join(stages)})" in report  # the script's time is a whole run's only


@pytest.mark.integration
def test_load_bench_times_a_delta_against_its_base(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--shape", "tiny", "--rounds", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert set(result["median_s"]) == {"base", "first", "later"} and all(v > 0 for v in result["median_s"].values())
    ratio = result["median_s"]["first"] / result["median_s"]["base"]  # of medians rounded to 1 ms
    assert result["first_vs_base"] == pytest.approx(ratio, rel=0.03, abs=0.01)
    assert set(result["resident_GB"]) == {"base", "first", "later"} and all(
        v > 0 for v in result["resident_GB"].values()
    )


@pytest.mark.integration
def test_train_memory_bench_samples_every_rank_in_each_layout(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_memory.py"), "--shape", "tiny", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout)["layouts"]
    assert list(runs) == ["DDP", "FSDP2, every rank reads", "FSDP2, rank 0 reads"]
    for run in runs.values():
        for phase in ("setup", "run"):
            peaks = run[f"{phase}_peak_rss_MiB"]
            assert set(peaks) == {"0", "1"} and all(mib > 100 for mib in peaks.values()), run  # torch alone is more
