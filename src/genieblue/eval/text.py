"""Text retention, measured three ways: exact logit equality with an independently loaded base, a
small held-out text QA score, and held-out perplexity. Each can run on the base, the non-shared text
path (the untouched base inside a GenieBlue model) or the shared-base path (text through the delta).
Text QA prompts every path as the base's own chat template renders the question (a model's training
system prompt never applies to text, see `GenieBlueProcessor.prompt`); logit equality and perplexity
read the raw text. The QA items and passages
below share nothing with the training data's text-only samples."""

from __future__ import annotations

import math

import torch

from ..data import GenieBlueProcessor
from .answers import answer_records, normalize_answer

TEXT_QA = [
    ("What colour is the sky on a clear day?", "blue"),
    ("How many legs does a spider have?", "8"),
    ("What is the opposite of hot?", "cold"),
    ("Which animal says meow?", "cat"),
    ("What do we call frozen water?", "ice"),
    ("How many days are there in a week?", "7"),
    ("Which planet do we live on?", "earth"),
    ("What is the largest ocean on Earth?", "pacific"),
    ("Which animal is called the king of the jungle?", "lion"),
    ("What do bees make?", "honey"),
    ("What colour are ripe bananas?", "yellow"),
    ("How many hours are there in a day?", "24"),
    ("At what temperature in Celsius does water boil?", "100"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What is the chemical symbol for gold?", "au"),
    ("How many continents are there?", "7"),
    ("What is the tallest animal in the world?", "giraffe"),
    ("Which star is at the centre of our solar system?", "sun"),
    ("What is the plural of mouse?", "mice"),
    ("How many minutes are in an hour?", "60"),
    ("What language is spoken in Brazil?", "portuguese"),
    ("Which organ pumps blood through the body?", "heart"),
    ("What is the square root of 81?", "9"),
    ("Which metal is liquid at room temperature?", "mercury"),
]
"""Held-out general-knowledge questions with one-word answers (credit if the answer is one of the
words of the reply, which is at most 12 tokens long)."""

PASSAGES = [
    "The library opened early on Saturday mornings, and the first visitors were usually students who "
    "needed a quiet place to study before their examinations. By noon the reading room was full.",
    "Rivers carry sediment from the mountains to the sea. Over thousands of years this material builds "
    "deltas, fertile plains where farmers have grown crops since the earliest civilisations.",
    "When you bake bread, the yeast feeds on sugar and releases carbon dioxide, which makes the dough "
    "rise. Kneading develops gluten, giving the loaf its structure and chewy texture.",
    "The committee agreed to postpone the vote until the next meeting, so that members would have time "
    "to read the full report and discuss the budget with their colleagues.",
    "Migrating birds navigate using the position of the sun, the patterns of the stars and the Earth's "
    "magnetic field. Some species fly thousands of kilometres without stopping.",
    "A good function does one thing, has a name that says what it does, and is short enough to read at "
    "a glance. Tests describe what the code should do and catch mistakes early.",
]
"""Held-out English passages for perplexity."""


def _qa_records() -> list[dict]:
    return [
        {
            "id": f"qa-{i}",
            "conversations": [{"from": "human", "value": f"{q} Answer with one word."}, {"from": "gpt", "value": a}],
        }
        for i, (q, a) in enumerate(TEXT_QA)
    ]


def text_qa(model, processor: GenieBlueProcessor, shared_base: bool | None = None) -> dict:
    """Accuracy on TEXT_QA (the reference is one of the normalised words of the reply)."""
    records = _qa_records()
    replies = answer_records(model, processor, records, max_new_tokens=12, shared_base=shared_base)
    hits = [a in {normalize_answer(w) for w in reply.split()} for (_, a), reply in zip(TEXT_QA, replies)]
    return {
        "accuracy": sum(hits) / len(hits),
        "n": len(hits),
        "replies": [{"question": q, "reference": a, "reply": r} for (q, a), r in zip(TEXT_QA, replies)],
    }


def _forward(model, ids: torch.Tensor, shared_base: bool | None):
    """Logits of a GenieBlue model (routing `shared_base`) or of a plain HF model, on its device."""
    if shared_base is None:
        return model(input_ids=ids.to(model.device)).logits
    return model(ids, shared_base=shared_base).logits


@torch.no_grad()
def perplexity(model, tokenizer, shared_base: bool | None = None) -> float:
    """Token-level perplexity over PASSAGES; `shared_base=None` for a plain HF model."""
    total, count = 0.0, 0
    for text in PASSAGES:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        logits = _forward(model, ids, shared_base)
        logp = torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None].to(logits.device))
        total -= logp.sum().item()
        count += ids.shape[1] - 1
    return math.exp(total / count)


@torch.no_grad()
def logit_equality(model, base, tokenizer, shared_base: bool = False) -> dict:
    """On every QA prompt and passage: is the model's logit tensor `torch.equal` to the base's?"""
    texts = [q for q, _ in TEXT_QA] + PASSAGES
    equal, max_diff = 0, 0.0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        a, b = _forward(model, ids, shared_base), _forward(base, ids, None)
        equal += torch.equal(a, b)
        max_diff = max(max_diff, (a - b).abs().max().item())
    return {"prompts": len(texts), "bit_identical": equal, "max_abs_diff": max_diff}
