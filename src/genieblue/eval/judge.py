"""`genieblue eval chat`: subjective chat scoring in the MT-Bench / AlignBench style. A GenieBlue
model answers each question (every turn, on the base, non-shared or shared text path) and a judge
behind any OpenAI-compatible endpoint rates each answer from 1 to 10 with MT-Bench's single-answer
grading prompts (reference-guided when the question has a reference answer).

Question files are JSONL: MT-Bench (`question_id`, `category`, `turns`, optional `reference`
list) or AlignBench (`question_id`, `category`, `question`, optional `reference`). A judgment
without a rating in 1-10 is a failure: counted, kept, and left out of the averages. Each finished
question is cached in `out/chat.cache.jsonl`, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import openai
from rich.progress import Progress

from ..loading import load_model_and_processor
from ..model import load_llm
from ..model.placement import resolve_placement
from .answers import answer_records
from .cache import ResultCache
from .harness import PATHS
from .report import retention_table, write_report

STEM = "chat"
JUDGE_SYSTEM = "You are a helpful assistant."
_GENERAL = (
    "Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, "
    "creativity, and level of detail of the response."
)
_WITH_REFERENCE = (
    "Your evaluation should consider correctness and helpfulness. You will be given a reference answer "
    "and the assistant's answer. Begin your evaluation by comparing the assistant's answer with the "
    "reference answer. Identify and correct any mistakes."
)
_RATE = (
    "Be as objective as possible. After providing your explanation, you must rate the response on a scale of 1 "
    'to 10 by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".'
)
_RATINGS = (
    re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]"),
    re.compile(r"\[(\d+(?:\.\d+)?)\]"),
    re.compile(r"rating\s*[:=]?\s*(\d+(?:\.\d+)?)", re.IGNORECASE),
)


class JudgeUnavailable(RuntimeError):
    """The judge endpoint cannot be reached or refuses us (wrong URL, key or model)."""


def parse_rating(judgment: str) -> float | None:
    """The rating in a judgment: "[[7]]", else "[7]", else "Rating: 7" (MT-Bench's patterns plus the
    plain form); None when there is none or it lies outside 1-10."""
    for pattern in _RATINGS:
        found = pattern.search(judgment)
        if found:
            value = float(found.group(1))
            return value if 1 <= value <= 10 else None
    return None


def judge_prompt(turns: list[str], answers: list[str], reference: str | None = None) -> str:
    """MT-Bench's single-answer grading prompt for the last answer (with the conversation before
    it from the second turn on, and the reference answer when there is one)."""
    focus = (
        " Your evaluation should focus on the assistant's answer to the last user question." if len(turns) > 1 else ""
    )
    parts = [
        "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an "
        f"AI assistant to the user question displayed below. {_WITH_REFERENCE if reference else _GENERAL}{focus} "
        f"Begin your evaluation by providing a short explanation. {_RATE}"
    ]
    if len(turns) == 1:
        parts.append(f"[Question]\n{turns[0]}")
    else:
        chat = "".join(f"### User:\n{q}\n\n### Assistant:\n{a}\n\n" for q, a in zip(turns, answers))
        parts.append(
            f"<|The Start of Assistant's Conversation with User|>\n\n{chat}"
            "<|The End of Assistant's Conversation with User|>"
        )
    if reference:
        parts.append(f"[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]")
    if len(turns) == 1:
        parts.append(f"[The Start of Assistant's Answer]\n{answers[0]}\n[The End of Assistant's Answer]")
    return "\n\n".join(parts)


def read_questions(path: str | Path) -> tuple[list[dict], int]:
    """({id, category, turns, references}) per usable line of a question JSONL, and the number of
    lines skipped as malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    questions, skipped = [], 0
    for i, line in enumerate(row for row in path.read_text(encoding="utf-8").splitlines() if row.strip()):
        try:
            raw = json.loads(line)
            turns = raw["turns"] if "turns" in raw else [raw["question"]]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
                raise ValueError("turns must be a list of questions")  # (a string was taken letter by letter)
            references = raw.get("reference") or []
            references = [references] if isinstance(references, str) else list(references)
            questions.append(
                {
                    "id": str(raw.get("question_id", i)),
                    "category": str(raw.get("category", "all")),
                    "turns": turns,
                    "references": references + [None] * (len(turns) - len(references)),
                }
            )
        except (ValueError, KeyError, TypeError):
            skipped += 1
    repeated = sorted(k for k, n in Counter(q["id"] for q in questions).items() if n > 1)
    if repeated:  # answers and ratings are kept by id: a second question would take the first's
        raise ValueError(f"{path}: question_id {', '.join(repeated)} repeated; give each question its own")
    if not questions:
        raise ValueError(f"{path}: no usable questions ({skipped} malformed lines)")
    return questions, skipped


class Judge:
    """A judge model behind an OpenAI-compatible endpoint (greedy, `max_tokens` per judgment)."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        max_tokens: int = 1024,
        max_retries: int = 2,
        timeout: float = 120,
    ):
        self.client = openai.OpenAI(base_url=url, api_key=api_key or "unused", max_retries=max_retries, timeout=timeout)
        self.url, self.max_tokens = url, max_tokens
        self.model = model or self._call(lambda: self.client.models.list().data[0].id)
        if model:  # reached now all the same, not after every answer has been generated
            try:
                self._call(self.client.models.list)
            except JudgeUnavailable as err:
                if not isinstance(err.__cause__, openai.NotFoundError):  # (no /models route: fine, it is named)
                    raise

    def _call(self, request):
        try:
            return request()
        except (
            openai.APIConnectionError,
            openai.AuthenticationError,
            openai.PermissionDeniedError,
            openai.NotFoundError,
            openai.RateLimitError,
            openai.InternalServerError,
            IndexError,
        ) as err:
            raise JudgeUnavailable(f"judge at {self.url}: {' '.join(str(err).split()) or type(err).__name__}") from err

    def rate(self, prompt: str) -> tuple[float | None, str]:
        """(rating or None, the judgment or the endpoint's refusal)."""
        try:
            reply = self._call(
                lambda: self.client.chat.completions.create(
                    model=self.model,
                    temperature=0,
                    max_tokens=self.max_tokens,
                    messages=[{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}],
                )
            )
        except openai.APIStatusError as err:  # e.g. the prompt does not fit the judge's context
            return None, f"judge refused ({err.status_code}): {err.message}"
        text = reply.choices[0].message.content or ""
        return parse_rating(text), text


def _record(question: dict, answers: list[str]) -> dict:
    """The conversation up to the next user turn, as a LLaVA record (its final turn a placeholder)."""
    turns = []
    for q, a in zip(question["turns"], answers + [""]):
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": question["id"], "conversations": turns}


def _answer_and_judge(
    subject, processor, shared_base: bool, questions: list[dict], judge: Judge, max_new_tokens: int
) -> list[dict]:
    """Every turn of each question answered (batched per turn), then each answer judged."""
    answers = [[] for _ in questions]
    for k in range(max(len(q["turns"]) for q in questions)):
        active = [i for i, q in enumerate(questions) if len(q["turns"]) > k]
        records = [_record({**questions[i], "turns": questions[i]["turns"][: k + 1]}, answers[i]) for i in active]
        replies = answer_records(
            subject, processor, records, batch_size=len(records), max_new_tokens=max_new_tokens, shared_base=shared_base
        )
        for i, reply in zip(active, replies):
            answers[i].append(reply.strip())
    results = []
    for q, given in zip(questions, answers):
        rated = [
            judge.rate(judge_prompt(q["turns"][: k + 1], given[: k + 1], q["references"][k])) for k in range(len(given))
        ]
        results.append({"answers": given, "ratings": [r for r, _ in rated], "judgments": [j for _, j in rated]})
    return results


def _summary(questions: list[dict], cache: ResultCache) -> dict:
    by_category, by_turn, failures = {}, {}, 0
    for q in questions:
        for k, rating in enumerate(cache[q["id"]]["ratings"]):
            if rating is None:
                failures += 1
                continue
            by_category.setdefault(q["category"], []).append(rating)
            by_turn.setdefault(f"turn {k + 1}", []).append(rating)
    judged = sum(len(q["turns"]) for q in questions)
    return {
        "scores": {c: sum(v) / len(v) for c, v in by_category.items()},
        "turns": {t: sum(v) / len(v) for t, v in by_turn.items()},
        "judged": judged,
        "failures": failures,
    }


def evaluate_chat(
    model_dir: str,
    questions_file: str,
    out: str | Path,
    *,
    judge: Judge,
    paths: tuple[str, ...] = PATHS,
    llm: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 512,
    progress: Progress | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> dict:
    """Answer and judge every question on each text path; write chat.md/json/png in `out`. Every
    path runs on `device` in `dtype` (default: a GPU in bfloat16 when there is one, else the CPU in
    float32), the base too. Raises ValueError for an unknown path, and what loading a model raises."""
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise ValueError(f"paths must be some of {', '.join(PATHS)}, got {', '.join(paths) or 'none'}")
    questions, skipped = read_questions(questions_file)
    out = Path(out)
    device, dtype = resolve_placement(device, dtype)
    model, processor = load_model_and_processor(model_dir, llm, device, dtype)
    results = {}
    for path in paths:
        name = str(llm or model.base_spec) if path == "base" else str(Path(model_dir).resolve())
        settings = {"device": device, "dtype": dtype, "llm": llm, "max_new_tokens": max_new_tokens}
        cache = ResultCache(out / f"{STEM}.cache.jsonl", f"{name} | judge {judge.model}", path, settings)
        todo = [q for q in questions if q["id"] not in cache]
        subject = load_llm(llm or model.base_spec, dtype, device) if path == "base" and todo else model
        task = progress.add_task(f"{path}: answer + judge", total=len(todo)) if progress else None
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            for q, result in zip(
                chunk, _answer_and_judge(subject, processor, path == "shared", chunk, judge, max_new_tokens)
            ):
                cache[q["id"]] = result
            if progress:
                progress.advance(task, len(chunk))
        results[path] = _summary(questions, cache)
    table = retention_table({p: r["scores"] for p, r in results.items()}, "base" if "base" in results else paths[0])
    details = {
        "model": model_dir,
        "questions": questions_file,
        "n_questions": len(questions),
        "skipped_lines": skipped,
        "judge": {"url": judge.url, "model": judge.model},
        "categories": dict(Counter(q["category"] for q in questions)),
        "results": results,
    }
    notes = "Judge: {} at {}. Failed judgments (no rating in 1-10): {}.\n".format(
        judge.model, judge.url, ", ".join(f"{p} {r['failures']}/{r['judged']}" for p, r in results.items())
    )
    files = write_report(
        out, STEM, "Chat quality (judge ratings 1-10)", table, details, "text path", percent=False, notes=notes
    )
    return {"table": table, **details, "files": files}
