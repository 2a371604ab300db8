"""Synthetic multimodal data: seeded PIL images whose questions can only be answered by looking.

Six task families (`TASKS`): the colour of a shape, its kind, how many shapes there are, where one
shape is relative to another, a rendered word or number, and a bar-chart value. Every answer is one
short word from the task's finite answer set (`task_info`), which also gives the text-only chance
rate to report accuracy against. `make_sample` draws one (image, question, answer, caption)
from a `random.Random`; `generate_dataset` writes a LLaVA-format dataset with a caption set for
alignment, byte-identical for a given seed;
`caption_stream` draws endless fresh (image, caption) pairs (the demo's stage 0);
`text_only_samples` gives text-only records (arithmetic, capitals) to mix into training;
`reading_exercises` gives text-only records that hand the model a caption in words and ask the
task's question about it (teaching the LLM side to answer from what the tower spells).

Images are drawn at `SCALE` times their final size and box-downsampled, so small shapes keep clean,
anti-aliased edges while shape interiors keep their exact palette colour.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .._io import write_json

TASKS: tuple[str, ...] = ("colour", "shape", "count", "position", "read", "chart")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 205, 20),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (130, 50, 170),
    "pink": (240, 110, 180),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
WORDS = ("cat", "dog", "sun", "map", "box", "car", "hat", "pen", "cup", "key",
         "bus", "egg", "fox", "ice", "jam", "owl", "pig", "sky", "toy", "web")  # fmt: skip
NUMBERS = tuple(str(n) for n in range(10, 100))
COUNTS = tuple(str(n) for n in range(1, 7))
VALUES = tuple(str(n) for n in range(1, 10))
INKS = ((0, 0, 0), (20, 30, 110), (120, 20, 20), (20, 80, 30))
SCALE = 4
ONE_WORD = " Answer with one word."
A_NUMBER = " Answer with a number."
CAPTION_PROMPT = "Describe the image briefly."

# Each task's questions as (probability, answers that question can have); answers are uniform
# within a question, so a model that sees only the text can do no better than sum(p / len(answers)).
_QUESTION_ANSWERS: dict[str, tuple[tuple[float, tuple[str, ...]], ...]] = {
    "colour": ((1.0, tuple(COLOURS)),),
    "shape": ((1.0, SHAPES),),
    "count": ((1.0, COUNTS),),
    "position": ((0.5, ("left", "right")), (0.5, ("above", "below"))),
    "read": ((0.5, WORDS), (0.5, NUMBERS)),
    "chart": ((1.0, VALUES),),  # "bar B" and "tallest bar" questions are both uniform over VALUES
}


@dataclass(frozen=True)
class TaskInfo:
    name: str
    answers: tuple[str, ...]
    chance: float  # best exact-match accuracy without the image


@functools.cache
def task_info(name: str) -> TaskInfo:
    if name not in _QUESTION_ANSWERS:
        raise ValueError(f"unknown task {name!r}; choose from {TASKS}")
    groups = _QUESTION_ANSWERS[name]
    answers = tuple(dict.fromkeys(a for _, group in groups for a in group))
    return TaskInfo(name, answers, sum(p / len(group) for p, group in groups))


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _canvas(rng: random.Random, size: int) -> tuple[Image.Image, ImageDraw.ImageDraw, tuple]:
    """A SCALE-times canvas with a random pale, low-saturation background."""
    base = rng.randint(205, 240)
    bg = tuple(base + rng.randint(-12, 12) for _ in range(3))
    image = Image.new("RGB", (size * SCALE, size * SCALE), bg)
    return image, ImageDraw.Draw(image), bg


def _ring(cx: float, cy: float, radii: tuple[float, ...], n: int) -> list[tuple[float, float]]:
    """n points evenly spaced around (cx, cy), the first straight up, radii taken in turn."""
    return [(cx + radii[i % len(radii)] * math.sin(2 * math.pi * i / n),
             cy - radii[i % len(radii)] * math.cos(2 * math.pi * i / n)) for i in range(n)]  # fmt: skip


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    """A shape of kind `kind` that fits inside the circle of radius r around (cx, cy)."""
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        s = 0.8 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif kind == "cross":
        w = 0.3 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=fill)
    elif kind == "triangle":
        draw.polygon(_ring(cx, cy, (r,), 3), fill=fill)
    else:
        draw.polygon(_ring(cx, cy, (r, 0.45 * r), 10), fill=fill)  # five-pointed star


def _one_shape(rng: random.Random, size: int) -> tuple[Image.Image, str, str]:
    image, draw, _ = _canvas(rng, size)
    colour, kind = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
    width = size * SCALE
    r = width * rng.uniform(0.18, 0.3)
    cx, cy = (rng.uniform(r + SCALE, width - r - SCALE) for _ in range(2))
    _draw_shape(draw, kind, cx, cy, r, COLOURS[colour])
    return image, colour, kind


def _colour(rng: random.Random, size: int):
    image, colour, kind = _one_shape(rng, size)
    return image, "What colour is the shape?" + ONE_WORD, colour, f"{colour}\n{kind}"


def _shape(rng: random.Random, size: int):
    image, colour, kind = _one_shape(rng, size)
    return image, "What shape is shown?" + ONE_WORD, kind, f"{colour}\n{kind}"


def _count(rng: random.Random, size: int):
    """1-6 shapes, each in its own cell of a 3x3 grid, so they never touch."""
    image, draw, _ = _canvas(rng, size)
    n = rng.randint(1, 6)
    cell = size * SCALE / 3
    for k in rng.sample(range(9), n):
        r = cell * rng.uniform(0.22, 0.32)
        slack = cell / 2 - r - 1.5 * SCALE
        cx, cy = ((c + 0.5) * cell + rng.uniform(-slack, slack) for c in (k % 3, k // 3))
        _draw_shape(draw, rng.choice(SHAPES), cx, cy, r, rng.choice(tuple(COLOURS.values())))
    return image, "How many shapes are there?" + A_NUMBER, str(n), f"{n} shape{'s' if n > 1 else ''}"


def _position(rng: random.Random, size: int):
    """Two shapes on opposite halves of the asked axis, less far apart on the other axis."""
    image, draw, _ = _canvas(rng, size)
    (name_a, rgb_a), (name_b, rgb_b) = rng.sample(tuple(COLOURS.items()), 2)
    horizontal = rng.random() < 0.5
    answer = rng.choice(("left", "right") if horizontal else ("above", "below"))
    width = size * SCALE
    r = width * rng.uniform(0.1, 0.14)
    margin = r + SCALE
    low = rng.uniform(margin, width / 2 - r - SCALE)
    high = rng.uniform(width / 2 + r + SCALE, width - margin)
    off_a = rng.uniform(margin, width - margin)
    off_b = min(max(off_a + rng.uniform(-1, 1) * (high - low) / 2, margin), width - margin)
    main_a, main_b = (low, high) if answer in ("left", "above") else (high, low)
    for main, off, rgb in ((main_a, off_a, rgb_a), (main_b, off_b, rgb_b)):
        cx, cy = (main, off) if horizontal else (off, main)
        _draw_shape(draw, rng.choice(SHAPES), cx, cy, r, rgb)
    relation = "left or right of" if horizontal else "above or below"
    # the caption names the left (upper) shape first, so it follows from the image alone, each shape
    # (in the question's words) followed by its side: whichever a question asks about, its answer is
    # the line after its name
    first, second = (name_a, name_b) if answer in ("left", "above") else (name_b, name_a)
    sides = ("left", "right") if horizontal else ("above", "below")
    caption = f"the {first} shape:\n{sides[0]}\nthe {second} shape:\n{sides[1]}"
    return image, f"Is the {name_a} shape {relation} the {name_b} shape?" + ONE_WORD, answer, caption


def _read(rng: random.Random, size: int):
    image, draw, _ = _canvas(rng, size)
    is_word = rng.random() < 0.5
    text = rng.choice(WORDS if is_word else NUMBERS)
    font = _font(round(size * SCALE * rng.uniform(0.3, 0.38)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width = size * SCALE
    x = rng.uniform(SCALE - left, width - SCALE - right)
    y = rng.uniform(SCALE - top, width - SCALE - bottom)
    draw.text((round(x), round(y)), text, fill=rng.choice(INKS), font=font)
    if is_word:
        return image, "What word is written in the image?" + ONE_WORD, text, text
    return image, "What number is written in the image?" + A_NUMBER, text, text


def _chart(rng: random.Random, size: int):
    """3-4 lettered bars on a 0-9 axis with a tick and a faint grid line at every integer."""
    image, draw, bg = _canvas(rng, size)
    n = rng.randint(3, 4)
    letters = "ABCD"[:n]
    if rng.random() < 0.5:
        values = [rng.randint(1, 9) for _ in range(n)]
        asked = rng.randrange(n)
        question, answer = f"What is the value of bar {letters[asked]}?", values[asked]
    else:
        answer = rng.randint(1, 9)
        values = [rng.randint(0, answer - 1) for _ in range(n)]
        values[rng.randrange(n)] = answer
        question = "What is the value of the tallest bar?"
    # whole final pixels (times SCALE) so bar tops stay crisp after downsampling
    unit, left, bottom = (SCALE * max(1, round(size * f)) for f in (0.07, 0.16, 0.8))
    right = SCALE * (size - 2)
    grid = tuple(c - 25 for c in bg)
    for v in range(1, 10):
        y = bottom - v * unit
        draw.rectangle((left, y, right - 1, y + SCALE - 1), fill=grid)
        tick = SCALE * (3 if v == 5 else 2)
        draw.rectangle((left - tick, y, left - 1, y + SCALE - 1), fill=(0, 0, 0))
    slot = (right - left) / n
    bar_colours = tuple(rgb for name, rgb in COLOURS.items() if name != "black")
    font = _font(round(size * SCALE * 0.16))
    for i, (letter, value) in enumerate(zip(letters, values)):
        cx = left + (i + 0.5) * slot
        x0, x1 = round(cx - 0.3 * slot), round(cx + 0.3 * slot)
        if value:
            draw.rectangle((x0, bottom - value * unit, x1, bottom - 1), fill=rng.choice(bar_colours))
        draw.text((cx, bottom + 2 * SCALE), letter, fill=(0, 0, 0), font=font, anchor="mt")
    draw.rectangle((left, bottom, right - 1, bottom + SCALE - 1), fill=(0, 0, 0))  # x axis
    draw.rectangle((left, bottom - 10 * unit, left + SCALE - 1, bottom - 1), fill=(0, 0, 0))  # y axis
    # compact (each value one digit token right after its letter, "tallest" as the question says it)
    # so the caption fits the image tokens
    caption = "bar " + " ".join(f"{k}{v}" for k, v in zip(letters, values)) + f" tallest {max(values)}"
    return image, question + A_NUMBER, str(answer), caption


_MAKERS: dict[str, Callable[[random.Random, int], tuple[Image.Image, str, str, str]]] = {
    "colour": _colour, "shape": _shape, "count": _count,
    "position": _position, "read": _read, "chart": _chart,
}  # fmt: skip


def make_sample(task: str, rng: random.Random, image_size: int = 64) -> tuple[Image.Image, str, str, str]:
    """One (RGB image of image_size x image_size, question, answer, caption) of `task`, drawn from
    `rng`. The caption names everything the task's questions can ask about the image, each possible
    answer spelled with the tokens of the answer itself (a word on a line of its own, digits), so that
    a model which has learned to spell captions from pixels can answer by copying."""
    task_info(task)
    image, question, answer, caption = _MAKERS[task](rng, image_size)
    return image.resize((image_size, image_size), Image.Resampling.BOX), question, answer, caption


def caption_stream(
    seed: int = 0, image_size: int = 64, tasks: Sequence[str] = TASKS
) -> Iterator[tuple[Image.Image, str]]:
    """Endless (image, caption) pairs, tasks round-robin, sample i seeded by (seed, i); the seeds
    never meet `generate_dataset`'s, so no stream image is a test image."""
    for i in itertools.count():
        rng = random.Random(f"genieblue-stream:{seed}:{i}")
        image, _, _, caption = make_sample(tasks[i % len(tasks)], rng, image_size)
        yield image, caption


def generate_dataset(
    out_dir: str | Path,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 300,
    seed: int = 0,
    image_size: int = 64,
    tasks: Sequence[str] = TASKS,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Path]:
    """Write the synthetic dataset: what `genieblue synth` writes (without text.json).

    Writes out_dir/images/<split>/<id>.png and out_dir/<split>.json (LLaVA format, image paths
    relative to out_dir), tasks round-robin, every sample seeded by (seed, split, index); then
    out_dir/caption.json, a caption record for every training image (LLaVA's alignment data: stage 1
    learns from descriptions, stage 2 from questions), and out_dir/dataset.json with the metadata.
    Each JSON appears only once its images are written; the same arguments write the same bytes.

    Args:
        out_dir: the folder to write into (created if needed).
        n_train: training samples (and captions).
        n_val: validation samples.
        n_test: test samples.
        seed: the seed of every sample.
        image_size: image side in pixels.
        tasks: the tasks to draw, in turn (default: all of `TASKS`).
        progress: called with (samples written, total) as it goes.

    Returns:
        {"train", "val", "test", "caption"}: the JSON files' paths (dataset.json holds the metadata).

    Raises:
        ValueError: no tasks, or an unknown one.
    """
    out_dir, tasks = Path(out_dir), tuple(tasks)
    if not tasks:
        raise ValueError("tasks must not be empty")
    infos = [task_info(t) for t in tasks]
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    total, done, paths, captions = sum(sizes.values()), 0, {}, []
    for split, n in sizes.items():
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(n):
            task = tasks[i % len(tasks)]
            rng = random.Random(f"genieblue-synthetic:{seed}:{split}:{i}")
            image, question, answer, caption = make_sample(task, rng, image_size)
            sample_id = f"{task}-{split}-{i:06d}"
            rel = f"images/{split}/{sample_id}.png"
            image.save(out_dir / rel, format="PNG")
            records.append(_record(sample_id, task, question, answer, rel))
            if split == "train":
                captions.append(_record(f"{sample_id}-caption", task, CAPTION_PROMPT, caption, rel))
            done += 1
            if progress:
                progress(done, total)
        paths[split] = out_dir / f"{split}.json"
        write_json(paths[split], records)
    paths["caption"] = out_dir / "caption.json"
    write_json(paths["caption"], captions)
    write_json(out_dir / "dataset.json", {
        "seed": seed, "image_size": image_size, "sizes": sizes,
        "tasks": {info.name: {"answers": list(info.answers), "chance": info.chance} for info in infos},
    })  # fmt: skip
    return paths


def _record(sample_id: str, task: str, question: str, answer: str, image: str | None = None) -> dict:
    """One LLaVA-format question and answer, about `image` (a path) when given."""
    record = {"id": sample_id, **({"image": image} if image else {}), "task": task}
    record["conversations"] = [
        {"from": "human", "value": ("<image>\n" if image else "") + question},
        {"from": "gpt", "value": answer},
    ]
    return record


CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Spain": "Madrid", "Germany": "Berlin", "Canada": "Ottawa", "Norway": "Oslo",
    "Russia": "Moscow", "China": "Beijing", "Greece": "Athens", "Austria": "Vienna",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Poland": "Warsaw", "Chile": "Santiago",
    "Cuba": "Havana", "Thailand": "Bangkok",
}  # fmt: skip
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def text_only_samples(n: int, seed: int = 0) -> list[dict]:
    """n seeded text-only LLaVA records (no image): small arithmetic and capital cities, alternating."""
    rng = random.Random(f"genieblue-text:{seed}")
    records = []
    for i in range(n):
        if i % 2 == 0:
            a, b = sorted((rng.randint(1, 20), rng.randint(1, 20)), reverse=True)
            op = rng.choice(tuple(_OPS))
            question, answer = f"What is {a} {op} {b}?" + A_NUMBER, str(_OPS[op](a, b))
        else:
            country = rng.choice(tuple(CAPITALS))
            question, answer = f"What is the capital of {country}?" + ONE_WORD, CAPITALS[country]
        records.append(_record(f"text-{i:06d}", "text", question, answer))
    return records


def reading_exercises(n: int, seed: int, tasks: Sequence[str]) -> list[dict]:
    """n seeded text-only records, tasks round-robin: a drawn sample's caption, then its question,
    answered. A tower that spells captions hands the LLM the caption as image tokens; these teach
    the LLM side (in stage 2) to read the answer off a caption, which for position and chart means a
    lookup, not a copy. Seeds never meet `generate_dataset`'s or `caption_stream`'s."""
    if not tasks:
        raise ValueError("tasks must not be empty")
    records = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        _, question, answer, caption = make_sample(task, random.Random(f"genieblue-exercise:{seed}:{i}"))
        records.append(_record(f"exercise-{task}-{i:06d}", "text", f"{caption}\n{question}", answer))
    return records
