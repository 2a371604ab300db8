"""Synthetic dataset: determinism, LLaVA format, balance, answer sets, chance rates, captions, and
images whose pixels really carry the answer (colour, count, position, chart height, shape, rendered
text)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter, deque

import numpy as np
import pytest
from PIL import Image

from genieblue.data.synthetic import (
    COLOURS,
    SHAPES,
    TASKS,
    generate_dataset,
    make_sample,
    reading_exercises,
    task_info,
    text_only_samples,
)

SPLITS = ("train", "val", "test")


def _generate(tmp_path, name, seed=0, **kw):
    kw = {"n_train": 24, "n_val": 12, "n_test": 12, "seed": seed, **kw}
    return generate_dataset(tmp_path / name, **kw)


def _samples(task, n, size=64):
    return [make_sample(task, random.Random(f"test-{task}-{i}"), size)[:3] for i in range(n)]


def _pixels(image):
    return np.asarray(image, dtype=np.int32)


def _ink(image):
    """Mask of pixels clearly different from the background (the corner pixel)."""
    px = _pixels(image)
    return np.abs(px - px[0, 0]).sum(-1) > 40


def _components(mask):
    """Number of 8-connected components of a boolean mask."""
    seen, count = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        seen[start], queue = True, deque([start])
        while queue:
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    p = (y + dy, x + dx)
                    if 0 <= p[0] < mask.shape[0] and 0 <= p[1] < mask.shape[1] and mask[p] and not seen[p]:
                        seen[p] = True
                        queue.append(p)
    return count


def _crop_signature(mask, side=16):
    ys, xs = np.nonzero(mask)
    crop = Image.fromarray(mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.uint8) * 255)
    return np.asarray(crop.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32) / 255


def test_task_info_answers_and_chance():
    expected = {"colour": 1 / 8, "shape": 1 / 6, "count": 1 / 6, "position": 1 / 2, "chart": 1 / 9,
                "read": 0.5 / 20 + 0.5 / 90}  # fmt: skip
    for task in TASKS:
        info = task_info(task)
        assert info.name == task and len(set(info.answers)) == len(info.answers)
        assert info.chance == pytest.approx(expected[task])
        assert all(a and " " not in a for a in info.answers)
    assert task_info("count").answers == ("1", "2", "3", "4", "5", "6")
    assert len(task_info("read").answers) == 20 + 90
    with pytest.raises(ValueError):
        task_info("nope")


def test_same_seed_identical_bytes_different_seed_differs(tmp_path):
    a, b, c = (_generate(tmp_path, name, seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    for split in (*SPLITS, "caption"):
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()
    assert (tmp_path / "a/dataset.json").read_bytes() == (tmp_path / "b/dataset.json").read_bytes()
    for rel in ("images/train/colour-train-000000.png", "images/test/chart-test-000005.png",
                "images/val/read-val-000004.png"):  # fmt: skip
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
        assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()


def test_records_format_balance_and_splits(tmp_path):
    calls = []
    paths = _generate(tmp_path, "d", image_size=48, progress=lambda done, total: calls.append((done, total)))
    assert set(paths) == {*SPLITS, "caption"} and calls[-1] == (48, 48) and len(calls) == 48
    root = tmp_path / "d"
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["sizes"] == {"train": 24, "val": 12, "test": 12} and meta["image_size"] == 48
    assert meta["tasks"]["chart"]["chance"] == pytest.approx(1 / 9)
    ids, images = {}, {}
    for split in SPLITS:
        records = json.loads(paths[split].read_text())
        ids[split] = {r["id"] for r in records}
        assert len(ids[split]) == len(records)
        counts = Counter(r["task"] for r in records)
        assert set(counts) == set(TASKS) and max(counts.values()) - min(counts.values()) <= 1
        for r in records:
            human, gpt = r["conversations"]
            assert (human["from"], gpt["from"]) == ("human", "gpt")
            assert human["value"].count("<image>") == 1 and human["value"].startswith("<image>\n")
            assert gpt["value"] in task_info(r["task"]).answers
            assert r["id"].startswith(f"{r['task']}-{split}-")
            assert r["image"] == f"images/{split}/{r['id']}.png"
            with Image.open(root / r["image"]) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (48, 48)
            images.setdefault(split, set()).add((root / r["image"]).read_bytes())
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert not (images["train"] & images["test"] or images["train"] & images["val"])


def test_captions_describe_every_training_image_and_name_its_answer(tmp_path):
    paths = _generate(tmp_path, "c")
    train, captions = (json.loads(paths[k].read_text()) for k in ("train", "caption"))
    assert [c["image"] for c in captions] == [r["image"] for r in train]
    for record, caption in zip(train, captions):
        human, gpt = caption["conversations"]
        assert human["value"] == "<image>\nDescribe the image briefly." and caption["task"] == record["task"]
        assert record["conversations"][1]["value"] in re.findall(r"[A-Za-z]+|\d+", gpt["value"])
    # a colour image's caption also names its kind, which only a shape question asks about
    for task in ("colour", "shape"):
        _, _, answer, caption = make_sample(task, random.Random(1))
        assert re.fullmatch(rf"({'|'.join(COLOURS)})\n({'|'.join(SHAPES)})", caption) and answer in caption.split()


def test_colour_is_the_dominant_non_background_colour():
    for image, _, answer in _samples("colour", 40):
        colours = Counter(map(tuple, _pixels(image).reshape(-1, 3).tolist())).most_common(2)
        assert colours[1][0] == COLOURS[answer]


def test_count_matches_connected_shapes():
    samples = _samples("count", 60)
    assert {a for _, _, a in samples} == set(task_info("count").answers)
    for image, _, answer in samples:
        assert _components(_ink(image)) == int(answer)


def test_position_matches_shape_centroids():
    for image, question, answer in _samples("position", 40):
        a, b = re.match(r"Is the (\w+) shape .* the (\w+) shape\?", question).groups()
        px = _pixels(image)
        (ya, xa), (yb, xb) = (np.argwhere((px == COLOURS[c]).all(-1)).mean(0) for c in (a, b))
        expected = {"left": xa < xb, "right": xa > xb, "above": ya < yb, "below": ya > yb}
        assert expected[answer], (question, answer)


def test_tallest_bar_height_grows_with_answer():
    top = {}
    for image, question, answer in _samples("chart", 120):
        if "tallest" in question:
            px = _pixels(image)
            rows = np.nonzero((px.max(-1) - px.min(-1) > 60).any(-1))[0]
            top.setdefault(int(answer), set()).add(int(rows.min()))
    assert len(top) >= 6
    assert all(max(rows) - min(rows) <= 1 for rows in top.values())
    ordered = [min(top[v]) for v in sorted(top)]
    assert all(a > b for a, b in zip(ordered, ordered[1:]))  # a higher value reaches higher up


def test_shapes_are_told_apart_by_a_nearest_centroid_classifier():
    signatures = {}
    for image, _, answer in _samples("shape", 150):
        signatures.setdefault(answer, []).append(_crop_signature(_ink(image)).ravel())
    assert set(signatures) == set(SHAPES)
    centroids = {s: np.mean(v[:8], 0) for s, v in signatures.items()}
    held_out = [(s, x) for s, v in signatures.items() for x in v[8:]]
    correct = sum(min(centroids, key=lambda c: np.abs(centroids[c] - x).sum()) == s for s, x in held_out)
    assert correct / len(held_out) > 0.9


def test_rendered_text_is_visible_and_differs_between_answers():
    seen = {}
    for image, question, answer in _samples("read", 40):
        assert ("word" in question) == answer.isalpha()
        gray = _pixels(image.convert("L"))
        assert gray.std() > 15 and 0.03 < _ink(image).mean() < 0.5
        seen.setdefault(answer, _crop_signature(_ink(image)))
    signatures = list(seen.values())
    assert len(signatures) > 10
    assert all(np.abs(a - b).mean() > 0.05 for i, a in enumerate(signatures) for b in signatures[i + 1 :])


def test_text_only_samples():
    records = text_only_samples(40, seed=3)
    assert records == text_only_samples(40, seed=3) != text_only_samples(40, seed=4)
    known = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Canada": "Ottawa", "Chile": "Santiago"}
    sums = capitals = 0
    for r in records:
        assert "image" not in r and r["task"] == "text"
        question, answer = (turn["value"] for turn in r["conversations"])
        assert "<image>" not in question and answer and " " not in answer
        if m := re.match(r"What is (\d+) ([-+*]) (\d+)\?", question):
            a, op, b = int(m[1]), m[2], int(m[3])
            assert int(answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
            sums += 1
        else:
            country = re.match(r"What is the capital of (\w+)\?", question)[1]
            assert answer == known.get(country, answer)
            capitals += 1
    assert sums == capitals == 20  # alternating


def test_reading_exercises_ask_about_a_caption_in_words():
    tasks = ("position", "chart")
    records = reading_exercises(12, 1, tasks)
    assert records == reading_exercises(12, 1, tasks) != reading_exercises(12, 2, tasks)
    assert [r["id"].split("-")[1] for r in records[:2]] == ["position", "chart"]
    for r in records:
        assert "image" not in r and r["task"] == "text"
        prompt, answer = (turn["value"] for turn in r["conversations"])
        caption, question = prompt.rsplit("\n", 1)
        assert "<image>" not in prompt and question.startswith(("Is the", "What is the value"))
        if r["id"].startswith("exercise-position"):
            # the asked shape's line in the caption is followed by its side, which is the answer
            lines = caption.split("\n")
            asked = re.match(r"Is the (\w+) shape", question)[1]
            side = lines[lines.index(f"the {asked} shape:") + 1]
            assert side == answer
        else:
            values = dict(re.findall(r"([A-D])(\d)", caption))
            bar = re.search(r"bar ([A-D])\?", question)
            assert answer == (values[bar[1]] if bar else max(values.values()))
    with pytest.raises(ValueError):
        reading_exercises(1, 0, ())


def test_the_synth_command_writes_only_into_a_new_or_empty_folder(tmp_path):
    """A second dataset written over a first mixed the two (its images stayed); sizes are bounded
    before any work (a 100000-pixel side ran out of memory)."""
    from typer.testing import CliRunner

    from genieblue.cli import app

    small = ["--n-train", "2", "--n-val", "1", "--n-test", "1", "--image-size", "16"]
    assert CliRunner().invoke(app, ["synth", str(tmp_path / "d"), *small]).exit_code == 0
    kept = (tmp_path / "d" / "train.json").read_bytes()
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "d"), *small, "--seed", "1"])
    assert result.exit_code == 2 and "holds files already: write the dataset to a new or empty folder" in result.output
    assert (tmp_path / "d" / "train.json").read_bytes() == kept
    for option, value in (("--image-size", "100000"), ("--image-size", "0"), ("--n-train", "0")):
        result = CliRunner().invoke(app, ["synth", str(tmp_path / "e"), *small, option, value])
        assert result.exit_code == 2 and "Invalid value" in result.output and not (tmp_path / "e").exists()
