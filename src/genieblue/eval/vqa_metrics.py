"""The standard metrics of multimodal benchmarks, each scoring one free-text reply in [0, 1]:

* `mc`      - multiple choice (AI2D, ScienceQA, MMBench, MMMU): the option is extracted from the
              reply as VLMEvalKit does (`can_infer`): a lone option letter, else the one option
              whose text the reply contains; no extraction scores 0;
* `vqa`     - VQA accuracy (VQAv2 / TextVQA, EvalAI answer processing);
* `anls`    - average normalised Levenshtein similarity (DocVQA / InfoVQA, threshold 0.5);
* `relaxed` - relaxed accuracy (ChartQA: numbers within 5 %, other answers exact);
* `ocr`     - OCRBench: the reference occurs in the reply (case-insensitive);
* `exact`   - the normalised reply equals a reference (VQA answer processing).
"""

from __future__ import annotations

import re

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())} | {
    "none": "0"
}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't "
    "shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll "
    "they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's "
    "where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all "
    "y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
_CONTRACTION_FIX = {c.replace("'", ""): c for c in _CONTRACTIONS}
"""Contractions typed without apostrophes, restored (the official table, lower-cased)."""


def normalize_vqa(answer: str) -> str:
    """The VQA evaluation's answer processing (VQAv2 `vqaEval.py`, TextVQA `EvalAIAnswerProcessor`):
    punctuation stripped or spaced, periods dropped unless in a number, lower case, number words
    to digits, articles dropped, missing apostrophes of contractions restored."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    spaced = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text):
            spaced = spaced.replace(p, "")
        else:
            spaced = spaced.replace(p, " ")
    spaced = _PERIOD_STRIP.sub("", spaced)
    words = [_NUMBERS.get(w, w) for w in spaced.lower().split()]
    return " ".join(_CONTRACTION_FIX.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(reply: str, answers: list[str]) -> float:
    """VQA accuracy: min(1, #annotators who gave the reply / 3), averaged over the 10 subsets of 9
    of the (usually 10) human answers. With a single reference it is exact match."""
    pred = normalize_vqa(reply)
    refs = [normalize_vqa(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    return sum(min(1.0, sum(r == pred for j, r in enumerate(refs) if j != i) / 3) for i in range(len(refs))) / len(refs)


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(reply: str, answers: list[str], threshold: float = 0.5) -> float:
    """ANLS (Biten et al., 2019; DocVQA): max over references of 1 - NL, where NL is the Levenshtein
    distance over the longer length of the lower-cased, whitespace-normalised strings; 0 when
    NL >= `threshold`."""
    pred = " ".join(reply.strip().lower().split())
    best = 0.0
    for answer in answers:
        ref = " ".join(answer.strip().lower().split())
        nl = _levenshtein(pred, ref) / max(len(pred), len(ref), 1)
        best = max(best, 1 - nl if nl < threshold else 0.0)
    return best


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(reply: str, answers: list[str], tolerance: float = 0.05) -> float:
    """Relaxed accuracy (Methani et al., 2020; ChartQA, as in pix2struct's `relaxed_correctness`): a
    numeric reference is matched by a number within `tolerance` relative error ("12%" = 0.12);
    anything else (and a reference of 0) needs a case-insensitive exact match."""
    pred = reply.strip()
    for answer in answers:
        ref = answer.strip()
        pred_f, ref_f = _to_float(pred), _to_float(ref)
        if pred_f is not None and ref_f:
            if abs(pred_f - ref_f) / abs(ref_f) <= tolerance:
                return 1.0
        elif pred.lower() == ref.lower():
            return 1.0
    return 0.0


def ocr_match(reply: str, answers: list[str], category: str = "") -> float:
    """OCRBench: 1 when a reference occurs in the reply (lower-cased, newlines as spaces; for
    handwritten mathematical expressions all spaces are removed instead)."""
    formula = "handwritten mathematical expression" in category.lower()

    def clean(text: str) -> str:
        text = text.strip().replace("\n", " ")
        return text.replace(" ", "") if formula else text.lower()

    return float(any(clean(a) in clean(reply) for a in answers if clean(a)))


def exact(reply: str, answers: list[str]) -> float:
    """1 when the VQA-normalised reply equals a VQA-normalised reference."""
    pred = normalize_vqa(reply)
    return float(any(pred == normalize_vqa(a) for a in answers))


def extract_choice(reply: str, options: dict[str, str]) -> str | None:
    """The option a free-text reply picks (VLMEvalKit's `can_infer`): the only option letter standing
    alone in it ("B", "(B)", "B.", "Answer: B"), else the only option whose text it contains."""
    spaced = reply
    for c in ".()[],:;!*#{}":
        spaced = spaced.replace(c, " ")
    words = set(spaced.split())
    letters = [k for k in options if k in words]
    if len(letters) == 1:
        return letters[0]
    if letters:
        return None
    lowered = reply.lower()
    texts = [k for k, v in options.items() if str(v).strip() and str(v).strip().lower() in lowered]
    return texts[0] if len(texts) == 1 else None


def multiple_choice(reply: str, answer: str, options: dict[str, str]) -> float:
    """1 when the option extracted from the reply is the answer letter."""
    return float(extract_choice(reply, options) == answer)


METRICS = ("mc", "vqa", "anls", "relaxed", "ocr", "exact")

BENCHMARK_METRICS = {
    "ai2d": "mc",
    "scienceqa": "mc",
    "sqa": "mc",
    "mmbench": "mc",
    "mmmu": "mc",
    "seedbench": "mc",
    "textvqa": "vqa",
    "vqav2": "vqa",
    "vizwiz": "vqa",
    "gqa": "exact",
    "docvqa": "anls",
    "infovqa": "anls",
    "chartqa": "relaxed",
    "ocrbench": "ocr",
}
"""The standard metric of well-known benchmarks, by the start of the benchmark's name."""


def metric_for(benchmark: str, has_options: bool) -> str:
    """The standard metric for a benchmark name (e.g. "MMBench_DEV_EN" -> mc); otherwise mc when the
    items have options and exact match when they do not."""
    key = re.sub(r"[^a-z0-9]", "", benchmark.lower())
    for prefix, metric in BENCHMARK_METRICS.items():
        if key.startswith(prefix):
            return metric
    return "mc" if has_options else "exact"


def score(metric: str, reply: str, item: dict) -> float:
    """Score one reply to a benchmark item with a benchmark's standard metric.

    Args:
        metric: one of "mc", "vqa", "anls", "relaxed", "ocr", "exact" (see `metric_for`).
        reply: the model's reply, as generated.
        item: {"answers": [...], "options": {letter: text} for "mc", "category" for "ocr"}.

    Returns:
        The reply's score in [0, 1].

    Raises:
        KeyError: an unknown metric, or an "mc" item without options.
    """
    answers = item["answers"]
    if metric == "mc":
        return multiple_choice(reply, answers[0], item["options"])
    if metric == "ocr":
        return ocr_match(reply, answers, item.get("category", ""))
    return {"vqa": vqa_accuracy, "anls": anls, "relaxed": relaxed_accuracy, "exact": exact}[metric](reply, answers)
