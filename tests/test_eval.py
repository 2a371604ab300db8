"""Evaluation: lm-eval text tasks on the three text paths (non-shared scores equal the base's request
by request, and equal lm-eval's stock `hf` model), VQA metrics against their reference definitions,
multimodal benchmarks from LLaVA JSONL and VLMEvalKit TSV files (replies equal the model's direct
generation, bad rows skipped and counted), judged chat against a real OpenAI-compatible server on
loopback, and resumption of every eval from its cache."""

from __future__ import annotations

import base64
import io
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from PIL import Image
from transformers import AutoTokenizer
from typer.testing import CliRunner

from conftest import TINY_SIGLIP, load_reference, serving
from genieblue.cli import app
from genieblue.data import save_processor_settings
from genieblue.eval.harness import GenieBlueLM
from genieblue.eval.judge import JUDGE_SYSTEM, judge_prompt, parse_rating, read_questions
from genieblue.eval.text import TEXT_QA, text_qa
from genieblue.eval.text_tasks import task_manager
from genieblue.eval.vqa_data import MC_PROMPT
from genieblue.eval.vqa_metrics import anls, extract_choice, normalize_vqa, ocr_match, relaxed_accuracy, vqa_accuracy
from genieblue.infer.chat import ChatSession
from genieblue.infer.engine import Engine
from genieblue.infer.server import create_app
from genieblue.loading import load_model_and_processor
from genieblue.model import GenieBlueForConditionalGeneration

TASKS = "tiny_mc,tiny_gen,tiny_ppl"
N = 8  # new tokens in generation tests


@pytest.fixture(scope="module")
def models(chat_base, tmp_path_factory):
    """Two tiny checkpoints on one base, their deltas moved away from the base so that the shared
    path differs from it: `main` (genieblue-skip, saved with a training system prompt) and `lora`
    (a baseline, deployed shared)."""
    root = tmp_path_factory.mktemp("eval_models")
    out = {}
    for seed, (name, strategy) in enumerate((("main", "genieblue-skip"), ("lora", "lora"))):
        torch.manual_seed(seed)
        model = GenieBlueForConditionalGeneration.from_base(chat_base, vision=TINY_SIGLIP, strategy=strategy)
        for p in model.llm_delta_parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
        out[name] = str(model.save_pretrained(root / name))
    save_processor_settings(out["main"], system_prompt="Answer briefly.")
    return out


_TASK_YAML = {
    "tiny_mc": """output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]""",
    "tiny_gen": """output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 6, do_sample: false}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true}}]""",
    "tiny_ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}]""",
}
_TASK_DOCS = {
    "tiny_mc": [
        {"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1), f"{i} apples"], "answer": 0}
        for i in range(1, 7)
    ],
    "tiny_gen": [{"question": f"Say {w}.", "answer": w} for w in ("yes", "no", "cat", "dog")],
    "tiny_ppl": [{"text": "The quick brown fox jumps over the lazy dog. " * k} for k in (1, 2, 3)],
}


@pytest.fixture(scope="module")
def lm_tasks(tmp_path_factory):
    """A folder of tiny lm-eval task YAMLs over local JSONL files (lm-eval's include_path)."""
    folder = tmp_path_factory.mktemp("lm_tasks")
    for name, docs in _TASK_DOCS.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        header = (
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n"
            f"  cache_dir: {folder / 'hf_cache'}\ntest_split: test\n"
        )
        (folder / f"{name}.yaml").write_text(header + _TASK_YAML[name].format() + "\n")
    return str(folder)


def _cli(*args) -> dict:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _cache_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _drop(path: Path, n: int, match) -> None:
    """Remove the first `n` cache lines whose row matches, as if the run had stopped before them."""
    lines = path.read_text().splitlines()
    hits = [i for i, line in enumerate(lines) if match(json.loads(line))][:n]
    assert len(hits) == n
    path.write_text("".join(line + "\n" for i, line in enumerate(lines) if i not in hits))


# text: lm-eval ----------------------------------------------------------------------------------
def test_text_table_non_shared_equals_base_request_by_request_and_resumes(models, lm_tasks, tmp_path):
    out = tmp_path / "out"
    args = [
        "eval",
        "text",
        "-m",
        models["main"],
        "-t",
        TASKS,
        "--include-path",
        lm_tasks,
        "--compare",
        models["lora"],
        "--batch-size",
        "4",
        "--out",
        str(out),
    ]
    result = _cli(*args)
    table = result["table"]
    rows = table["rows"]
    assert list(rows) == ["base", "non-shared", "shared", f"{models['lora']} (shared)"]
    assert table["lower_is_better"] == ["tiny_ppl"]
    base = rows["base"]
    assert base["average"] == pytest.approx((base["scores"]["tiny_mc"] + base["scores"]["tiny_gen"]) / 2)
    assert rows["non-shared"] == base
    shared = rows["shared"]
    assert shared["retention"] == pytest.approx(100 * shared["average"] / base["average"])

    cache = out / "text.cache.jsonl"
    by_path = {}
    for row in _cache_rows(cache):
        by_path.setdefault((row["model"], row["path"]), {})[row["id"]] = row["result"]
    requests = 6 * 3 + 4 + 3  # choices, generations, rolling documents
    assert sorted(len(v) for v in by_path.values()) == [requests] * 4
    lora = str(Path(models["lora"]).resolve())
    results = {path: v for (model, path), v in by_path.items() if model != lora}
    assert results["non-shared"] == results["base"]  # every loglikelihood, greedy flag and generation
    assert sum(results["shared"][k] != results["base"][k] for k in results["base"]) >= requests - 4
    assert rows["shared"]["scores"]["tiny_ppl"] != base["scores"]["tiny_ppl"]

    md = Path(result["files"]["md"]).read_text()
    assert "| text path | tiny_mc | tiny_gen | tiny_ppl (lower is better) | average | retention vs base |" in md
    assert Path(result["files"]["png"]).stat().st_size > 1000

    lines = len(cache.read_text().splitlines())
    _drop(cache, 7, lambda row: row["path"] == "shared")
    assert _cli(*args)["table"] == table
    assert len(cache.read_text().splitlines()) == lines  # only the 7 dropped requests ran again


def test_text_qa_non_shared_replies_are_the_base_on_its_own_chat_template(models, chat_base):
    """The QA measure's non-shared path (a model saved with a training system prompt) gives the
    replies of the base loaded on its own, prompted by its own tokenizer's template, in the same
    left-padded batches of 16."""
    model, processor = load_model_and_processor(models["main"])
    assert processor.system_prompt == "Answer briefly."
    replies = [r["reply"] for r in text_qa(model, processor, shared_base=False)["replies"]]
    base, tok = load_reference(chat_base), AutoTokenizer.from_pretrained(chat_base, padding_side="left")
    expected = []
    for start in range(0, len(TEXT_QA), 16):
        conversations = [
            [{"role": "user", "content": f"{q} Answer with one word."}] for q, _ in TEXT_QA[start : start + 16]
        ]
        batch = tok.apply_chat_template(conversations, add_generation_prompt=True, padding=True, return_tensors="pt")
        out = base.generate(**batch, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
        expected += tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert replies == expected


def test_lm_eval_runs_genieblue_by_name_and_its_base_path_equals_stock_hf(models, lm_tasks, chat_base):
    """`--model genieblue` resolves through lm-eval's registry; per-sample loglikelihoods of the base
    path (a GenieBlue folder's base, from its manifest) equal lm-eval's own `hf` model on the base
    folder (and non-shared equals base: see above); the shared path differs."""
    assert get_model("genieblue") is GenieBlueLM
    manager = task_manager(["tiny_mc"], [lm_tasks])

    def responses(model: str, args: str) -> list:
        out = simple_evaluate(model=model, model_args=args, tasks=["tiny_mc"], task_manager=manager, log_samples=True)
        return [s["resps"] for s in out["samples"]["tiny_mc"]]

    stock = responses("hf", f"pretrained={chat_base},device=cpu,dtype=float32")
    assert responses("genieblue", f"pretrained={models['main']},path=base") == stock
    assert responses("genieblue", f"pretrained={models['main']},path=shared") != stock


def test_shared_path_generation_stops_at_the_stop_string(models):
    """On the embeddings path `generate` sees only new tokens; lm-eval's stop criteria still fire."""
    lm = GenieBlueLM(models["main"], path="shared")
    steps = []
    lm.model.genieblue.llm.model.register_forward_pre_hook(lambda *_: steps.append(1))

    def generate(until: list[str]) -> str:
        steps.clear()
        request = Instance("generate_until", {}, ("Q: Say yes.\nA:", {"until": until, "max_gen_toks": 12}), 0)
        return lm.generate_until([request], disable_tqdm=True)[0]

    free = generate(["\x00"])
    assert len(steps) == 12 and len(free) > 8
    stop = free[4:7]
    assert generate([stop]) == free[: free.index(stop)]
    assert len(steps) < 10


def test_text_errors_are_one_line(models, tmp_path):
    for args, message in (
        (["-t", "x", "--include-path", str(tmp_path / "nowhere")], "task folder not found"),
        (["-t", "x", "--paths", "base,text"], "paths must be some of base, non-shared, shared"),
        (["-t", "x", "--compare", str(tmp_path / "nope")], f"model folder not found: {tmp_path / 'nope'}"),
    ):
        result = CliRunner().invoke(app, ["eval", "text", "-m", models["main"], "--out", str(tmp_path), *args])
        assert result.exit_code == 2 and result.output.startswith(f"error: {message}"), result.output
        assert result.output.count("\n") == 1


# multimodal: metrics ----------------------------------------------------------------------------
def test_vqa_normalisation_and_accuracy_follow_the_official_evaluation():
    assert normalize_vqa("Two dogs.") == "2 dogs"
    assert normalize_vqa("The cat, dont") == "cat don't"
    assert normalize_vqa("1,000") == "1000"
    answers = ["red"] * 3 + ["blue"] * 7
    assert vqa_accuracy("Red.", answers) == pytest.approx(0.9)  # 3 of 10 annotators: 0.9, not 1
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("blue", answers) == 1.0 and vqa_accuracy("green", answers) == 0.0
    assert vqa_accuracy("A cat", ["cat"]) == 1.0  # one reference: exact match after normalisation


def test_anls_relaxed_accuracy_and_ocr_match():
    assert anls("hallo", ["hello"]) == pytest.approx(0.8)
    assert anls(" Hello  World ", ["hello world"]) == 1.0
    assert anls("abc", ["xyz"]) == 0.0 and anls("abcd", ["abxy"]) == 0.0  # NL 0.5 is not below the threshold
    assert anls("abcd", ["abxy", "abcx"]) == pytest.approx(0.75)
    assert relaxed_accuracy("10.4", ["10"]) == 1.0 and relaxed_accuracy("10.6", ["10"]) == 0.0
    assert relaxed_accuracy("12%", ["0.12"]) == 1.0 and relaxed_accuracy("0", ["0"]) == 1.0
    assert relaxed_accuracy("Yes", ["yes"]) == 1.0 and relaxed_accuracy("yes.", ["yes"]) == 0.0
    assert ocr_match("The sign says STOP here", ["stop"]) == 1.0 and ocr_match("go", ["stop"]) == 0.0
    assert ocr_match("x ^ { 2 }", ["x^{2}"], "Handwritten Mathematical Expression Recognition") == 1.0


def test_multiple_choice_extraction_from_free_text():
    options = {"A": "red", "B": "green", "C": "blue"}
    assert extract_choice("B", options) == "B"
    assert extract_choice("The answer is (C).", options) == "C"
    assert extract_choice("Answer: A", options) == "A"
    assert extract_choice("I think it is green", options) == "B"  # the option's text
    assert extract_choice("A or B", options) is None  # two letters: no answer
    assert extract_choice("red and blue", options) is None
    assert extract_choice("", options) is None


# multimodal: benchmarks end to end ---------------------------------------------------------------
def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_mm_benchmarks_from_jsonl_and_tsv_score_resume_and_skip_bad_rows(models, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"img{i}.png").write_bytes(_png(i))
    question = "What is written here?"
    tsv_prompt = f"Which colour is it?\nA. red\nB. green\nC. blue\n{MC_PROMPT}"
    direct = {}
    for name in ("main", "lora"):  # the model's own generation, one question at a time
        loaded = load_model_and_processor(models[name])
        direct[name] = [ChatSession(*loaded, max_new_tokens=N).ask(question, data / f"img{i}.png") for i in range(3)]
        direct[name].append(ChatSession(*loaded, max_new_tokens=N).ask(tsv_prompt, data / "img3.png"))
    assert direct["main"][:3] != direct["lora"][:3]

    llava = [
        {"question_id": i, "image": f"img{i}.png", "text": question, "answers": [direct["main"][i]]} for i in range(3)
    ]
    llava.append({"question_id": 9, "image": "missing.png", "text": question, "answer": "x"})
    (data / "textvqa_tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in llava))
    both = [
        {
            "id": f"c{i}",
            "image": f"img{i}.png",
            "answers": [direct["main"][i], direct["lora"][i]],
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "-"}],
        }
        for i in range(3)
    ]
    (data / "both.json").write_text(json.dumps(both))
    image = base64.b64encode(_png(3)).decode()
    rows = [
        "index\timage\tquestion\tanswer\tA\tB\tC\tcategory",
        f"0\t{image}\tWhich colour is it?\tA\tred\tgreen\tblue\tcolour",
        "1\t0\tWhich colour is it?\tblue\tred\tgreen\tblue\tcolour",  # shares row 0's image; answer as text
        "2\tnot*base64\tWhich colour is it?\tA\tred\tgreen\tblue\tcolour",
        f"3\t{image}\tWhich colour is it?\tD\tred\tgreen\tblue\tcolour",
        f"4\t{image}\t \tA\tred\tgreen\tblue\tcolour",
        f"5\t{image}\ttoo few columns",
    ]
    (data / "MMBench_tiny.tsv").write_text("\n".join(rows) + "\n")

    out = tmp_path / "out"
    args = [
        "eval",
        "mm",
        "-m",
        models["main"],
        "--reference",
        models["lora"],
        "-d",
        str(data / "textvqa_tiny.jsonl"),
        "-d",
        f"both:exact={data / 'both.json'}",
        "-d",
        str(data / "MMBench_tiny.tsv"),
        "--max-new-tokens",
        str(N),
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    result = _cli(*args)
    assert result["benchmarks"] == {
        "textvqa_tiny": {"metric": "vqa", "items": 3, "skipped": 1, "skipped_by_reason": {"image file not found": 1}},
        "both": {"metric": "exact", "items": 3, "skipped": 0, "skipped_by_reason": {}},
        "MMBench_tiny": {
            "metric": "mc",
            "items": 2,
            "skipped": 4,
            "skipped_by_reason": {
                "image is not base64": 1,
                "answer is not one of the options": 1,
                "no question": 1,
                "malformed row": 1,
            },
        },
    }
    replies = {(r["model"], r["id"]): r["result"] for r in _cache_rows(out / "mm.cache.jsonl")}
    for name in ("main", "lora"):
        key = str(Path(models[name]).resolve())
        assert [replies[key, f"textvqa_tiny/{i}"].strip() for i in range(3)] == direct[name][:3]
        assert [replies[key, f"MMBench_tiny/{i}"].strip() for i in range(2)] == [direct[name][3]] * 2

    table = result["table"]
    main, lora = table["rows"][models["main"]], table["rows"][f"{models['lora']} (reference)"]
    assert main["scores"]["textvqa_tiny"] == 1.0 and main["scores"]["both"] == 1.0 and lora["scores"]["both"] == 1.0
    assert lora["scores"]["textvqa_tiny"] == 0.0
    assert main["retention"] == pytest.approx(100 * main["average"] / lora["average"])
    mc = result["results"][models["main"]]["MMBench_tiny"]
    choice = extract_choice(direct["main"][3], {"A": "red", "B": "green", "C": "blue"})
    assert mc["score"] == ((choice == "A") + (choice == "C")) / 2  # answers A and C, one reply
    assert mc["no_choice_extracted"] == 2 * (choice is None)
    assert "| model | textvqa_tiny | both | MMBench_tiny | average |" in Path(result["files"]["md"]).read_text()

    cache = out / "mm.cache.jsonl"
    lines = len(cache.read_text().splitlines())
    assert lines == 2 * (3 + 3 + 2)
    _drop(cache, 6, lambda row: row["id"].startswith("both/"))
    assert _cli(*args)["table"] == table
    assert len(cache.read_text().splitlines()) == lines
    # other settings are another run: nothing of the cache is read back for them
    _cli(*args, "--max-new-tokens", "5")
    assert len(cache.read_text().splitlines()) == 2 * lines
    assert {r["settings"]["max_new_tokens"] for r in _cache_rows(cache)} == {"5", "8"}  # (the args say 8)


def test_mm_errors_are_one_line(models, tmp_path):
    (tmp_path / "bad.tsv").write_text("index\tquestion\n0\thello\n")
    for spec, message in (
        (str(tmp_path / "nope.jsonl"), "benchmark file not found"),
        (str(tmp_path / "bad.tsv"), "not a VLMEvalKit TSV (no answer, image column)"),
        (f"x:bleu={tmp_path / 'bad.tsv'}", "unknown metric 'bleu'"),
    ):
        result = CliRunner().invoke(app, ["eval", "mm", "-m", models["main"], "-d", spec, "--out", str(tmp_path)])
        assert result.exit_code == 2 and result.output.startswith("error: ") and message in result.output, result.output
        assert result.output.count("\n") == 1
    into_a_file = ["eval", "mm", "-m", models["main"], "-d", "x", "--out", str(tmp_path / "bad.tsv")]
    result = CliRunner().invoke(app, into_a_file, env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "bad.tsv is a file; give a folder" in result.output  # (not after loading)
    for option in ("--limit", "--batch-size"):  # 0 and -1 were "no limit" and a slice [:-1]; a KeyError
        for value in ("0", "-1"):
            args = ["eval", "mm", "-m", models["main"], "-d", str(tmp_path / "bad.tsv"), option, value]
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output


def test_mm_reads_the_training_formats_and_names_what_an_unusable_file_lacks(models, tmp_path):
    """LLaMA-Factory `messages` with `images` and OpenAI content parts (a data URL) as benchmark
    files: the final reply is the reference; a file of nothing usable is a one-line error."""
    Image.new("RGB", (40, 30), (200, 0, 0)).save(tmp_path / "red.png")
    url = "data:image/png;base64," + base64.b64encode((tmp_path / "red.png").read_bytes()).decode()
    rows = [
        {
            "id": "factory",
            "images": ["red.png"],
            "messages": [
                {"role": "user", "content": "What colour is <image> this?"},
                {"role": "assistant", "content": "red"},
            ],
        },
        {
            "id": "openai",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Colour?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            ],
        },
        {
            "id": "missing",
            "images": ["nope.png"],
            "messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "red"}],
        },
    ]
    lines = [json.dumps(r) for r in rows]
    (tmp_path / "colours.jsonl").write_text("\n".join([*lines, '{"id": "cut", "mess']))  # its last line cut short
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "mm",
            "-m",
            models["main"],
            "-d",
            f"colours:exact={tmp_path / 'colours.jsonl'}",
            "--out",
            str(tmp_path / "out"),
            "--json",
            "--max-new-tokens",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["benchmarks"]["colours"] == {
        "metric": "exact",
        "items": 2,
        "skipped": 2,
        "skipped_by_reason": {"image file not found": 1, "invalid JSON on line 4": 1},
    }
    card = (Path(models["main"]) / "README.md").read_text()  # the model card keeps the table
    score = summary["table"]["rows"][models["main"]]["scores"]["colours"]
    assert "## Evaluation" in card and f"| {models['main']} | {score:.4g} |" in card
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Q", "output": "A"}]))
    result = CliRunner().invoke(
        app, ["eval", "mm", "-m", models["main"], "-d", str(tmp_path / "alpaca.json"), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "none of its 1 records is usable" in result.output and "keys [instruction, output]" in result.output
    assert "`messages`" in result.output and "`question`" in result.output


# chat: a judge behind an OpenAI-compatible endpoint -----------------------------------------------
def test_parse_rating():
    assert parse_rating("Good answer. Rating: [[7]]") == 7
    assert parse_rating("Rating: 7") == 7 and parse_rating("rating = 8.5/10") == 8.5
    assert parse_rating("I give it [3].") == 3
    for unrated in ("no rating here", "Rating: [[11]]", "Rating: 0", ""):
        assert parse_rating(unrated) is None


@pytest.fixture(scope="module")
def judge(models):
    """A `genieblue serve` app over the main model on a loopback port, and its engine."""
    engine = Engine.load(models["main"])
    with serving(create_app(engine, model_name="tiny-judge")) as url:
        yield url + "/v1", engine
    engine.close()


QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it sadder."]},
    {"question_id": 2, "category": "math", "turns": ["What is 2+2?"], "reference": ["4"]},
    {"question_id": 3, "category": "writing", "question": "Describe a cat."},  # AlignBench style
]


def test_a_question_file_whose_ids_repeat_is_refused(tmp_path):
    """Answers and ratings are kept by question id: a repeated one would take another question's."""
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in [*QUESTIONS, QUESTIONS[0]]))
    with pytest.raises(ValueError, match="q.jsonl: question_id 1 repeated; give each question its own"):
        read_questions(tmp_path / "q.jsonl")


@pytest.mark.integration
def test_chat_judged_through_a_served_model_counts_unparseable_ratings_and_resumes(models, judge, tmp_path):
    url, engine = judge
    questions = tmp_path / "questions.jsonl"
    turns_a_string = json.dumps({"question_id": 7, "turns": "hello"})  # once taken as five one-letter turns
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS) + f"{{not json\n{turns_a_string}\n")
    out = tmp_path / "out"
    args = [
        "eval",
        "chat",
        "-m",
        models["main"],
        "-q",
        str(questions),
        "--judge-url",
        url,
        "--judge-max-tokens",
        str(N),
        "--max-new-tokens",
        str(N),
        "--paths",
        "base,non-shared",
        "--out",
        str(out),
    ]
    result = _cli(*args)
    assert result["judge"] == {"url": url, "model": "tiny-judge"} and result["skipped_lines"] == 2

    rows = {(r["path"], r["id"]): r["result"] for r in _cache_rows(out / "chat.cache.jsonl")}
    turns = {str(q["question_id"]): q.get("turns", [q.get("question")]) for q in QUESTIONS}
    references = {"2": "4"}
    for path in ("base", "non-shared"):
        ratings = [r for qid in turns for r in rows[path, qid]["ratings"]]
        assert result["results"][path]["judged"] == 4
        assert result["results"][path]["failures"] == sum(r is None for r in ratings)
        for qid, asked in turns.items():
            done = rows[path, qid]
            assert len(done["answers"]) == len(asked) == len(done["judgments"])
            for k, judgment in enumerate(done["judgments"]):  # what the served judge said, parsed as such
                prompt = judge_prompt(asked[: k + 1], done["answers"][: k + 1], references.get(qid) if k == 0 else None)
                messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]
                assert judgment == engine.generate(messages, max_tokens=N).text
                assert done["ratings"][k] == parse_rating(judgment)
    assert all(rows["base", q]["answers"] == rows["non-shared", q]["answers"] for q in turns)
    assert Path(result["files"]["png"]).is_file() and "Failed judgments" in Path(result["files"]["md"]).read_text()

    cache = out / "chat.cache.jsonl"
    lines = len(cache.read_text().splitlines())
    _drop(cache, 1, lambda row: (row["path"], row["id"]) == ("non-shared", "1"))
    again = _cli(*args)
    assert again["results"] == result["results"]
    assert len(cache.read_text().splitlines()) == lines


def test_chat_with_an_unreachable_judge_is_a_one_line_error(models, tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    (tmp_path / "q.jsonl").write_text(json.dumps(QUESTIONS[1]) + "\n")
    args = ["eval", "chat", "-m", models["main"], "-q", str(tmp_path / "q.jsonl"), "--out", str(tmp_path)]
    for judge in ([], ["--judge-model", "j"]):  # named, the judge was first reached after every answer
        result = CliRunner().invoke(app, [*args, "--judge-url", f"http://127.0.0.1:{port}/v1", *judge])
        assert result.exit_code == 2 and result.output.startswith(f"error: judge at http://127.0.0.1:{port}/v1"), (
            result.output
        )
        assert result.output.count("\n") == 1 and not (tmp_path / "chat.cache.jsonl").exists()
