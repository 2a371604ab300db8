"""The data room on real files and the real SmolLM2 tokenizer: safe image loading and tiling, LLaVA
record validation and mixing, assistant-only labels, and packing whose loss equals the per-sample
losses (no attention leaks across packed samples, with or without images, sdpa and eager)."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from genieblue.data import (
    BACKBONE_STATS,
    IMAGE_STATS,
    BadRecord,
    DataMixture,
    GenieBlueProcessor,
    ImageError,
    Sample,
    best_grid,
    collate,
    first_fit,
    image_tiles,
    image_to_tensor,
    load_image,
    pack,
    read_records,
    scan_records,
    tile_image,
)
from genieblue.data.records import RecordFile
from genieblue.model import IMAGE_TOKEN_INDEX, GenieBlueForConditionalGeneration, load_tokenizer

SIZE, PER_TILE = 32, 4  # tile pixels and image tokens per tile of the tiny SigLIP below
TINY_VISION = {
    "model_type": "siglip_vision_model",
    "image_size": SIZE,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}
VOCAB = 256


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def proc(tok):
    return GenieBlueProcessor(tok, SIZE, PER_TILE, max_tiles=6)


def _png(path, size=(48, 32), color=(200, 30, 30), mode="RGB"):
    Image.new(mode, size, color).save(path)
    return path


def _png_header(width, height) -> bytes:
    """A PNG claiming width x height in its header, with (almost) no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _chat(*turns, **extra):
    speakers = ["human", "gpt"] * len(turns)
    return {"conversations": [{"from": s, "value": v} for s, v in zip(speakers, turns)], **extra}


def _write_json(path, records, jsonl=False):
    text = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records)
    path.write_text(text)
    return path


# images ---------------------------------------------------------------------------------------
def test_load_image_errors_are_one_line(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png(tmp_path / "ok.png", size=(64, 64)).read_bytes()[:60])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(100_000, 100_000))
    big = tmp_path / "big.png"
    big.write_bytes(_png_header(5000, 5000))
    cases = {
        tmp_path / "missing.png": "not found",
        corrupt: "cannot decode",
        truncated: "cannot decode",
        bomb: "too many pixels",  # 10 Gpx: stopped by PIL's own guard while reading the header
        big: "exceeds max_pixels",  # 25 Mpx, over the default 16.7 Mpx: refused from the header
        b"garbage bytes": "cannot decode",
    }
    for source, expected in cases.items():
        with pytest.raises(ImageError, match=expected) as err:
            load_image(source)
        assert "\n" not in str(err.value)
    with pytest.raises(ImageError, match="64x64 pixels exceeds max_pixels=100"):
        load_image(tmp_path / "ok.png", max_pixels=100)


def test_load_image_from_bytes_and_transparency(tmp_path):
    path = _png(tmp_path / "rgba.png", color=(0, 0, 0, 0), mode="RGBA")
    image = load_image(path.read_bytes())
    assert image.mode == "RGB" and image.size == (48, 32)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black


@pytest.mark.parametrize(
    "width, height, max_tiles, grid",
    [
        (640, 320, 6, (2, 1)),
        (300, 900, 6, (1, 3)),
        (600, 600, 6, (2, 2)),  # square and large: the bigger square grid
        (40, 40, 6, (1, 1)),  # square and small: stays one tile
        (1200, 200, 6, (6, 1)),
        (640, 480, 6, (3, 2)),  # 4:3 -> 1.5 is the nearest ratio available
        (1200, 200, 1, (1, 1)),
    ],
)
def test_best_grid(width, height, max_tiles, grid):
    assert best_grid(width, height, SIZE, max_tiles) == grid
    tiles = tile_image(Image.new("RGB", (width, height)), SIZE, max_tiles)
    expected = grid[0] * grid[1] + (grid != (1, 1))  # + the global thumbnail
    assert len(tiles) == expected and all(t.size == (SIZE, SIZE) for t in tiles)


def test_tiles_are_row_major_then_thumbnail(tmp_path):
    image = Image.new("RGB", (2 * SIZE, SIZE), (255, 255, 255))
    image.paste((0, 0, 0), (SIZE, 0, 2 * SIZE, SIZE))  # right half black
    pixels = image_to_tensor(image, SIZE, max_tiles=6)
    assert pixels.shape == (3, 3, SIZE, SIZE)
    assert torch.allclose(pixels[0], torch.ones(1)) and torch.allclose(pixels[1], -torch.ones(1))
    assert pixels[2, :, :, : SIZE // 2 - 1].min() > 0.9  # thumbnail: white left, black right


def test_normalisation_follows_the_vision_type():
    white = [Image.new("RGB", (SIZE, SIZE), (255, 255, 255))]
    mean, std = IMAGE_STATS["clip_vision_model"]
    clip = image_to_tensor(white[0], SIZE, vision_type="clip_vision_model")
    assert clip.shape == (1, 3, SIZE, SIZE) and clip.dtype == torch.float32
    assert torch.allclose(clip[0, :, 0, 0], (1 - torch.tensor(mean)) / torch.tensor(std))
    assert torch.allclose(image_to_tensor(white[0], SIZE), torch.ones(1))
    mean, std = BACKBONE_STATS  # a convolutional backbone: ImageNet's statistics
    resnet = image_to_tensor(white[0], SIZE, vision_type="resnet")
    assert torch.allclose(resnet[0, :, 0, 0], (1 - torch.tensor(mean)) / torch.tensor(std))


# records --------------------------------------------------------------------------------------
def test_read_json_and_jsonl_with_image_folders(tmp_path):
    _png(tmp_path / "cat.png")
    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "dog.png")
    records = [
        _chat("<image>\nWhat is it?", "A cat.", id="cat", image="cat.png"),
        _chat("Two?", "Yes.", id="two", images=["cat.png", "imgs/dog.png"]),
        _chat("Hello", "Hi!", id="text"),
    ]
    for name, jsonl in (("d.json", False), ("d.jsonl", True)):
        got = read_records(_write_json(tmp_path / name, records, jsonl))
        assert [r["id"] for r in got] == ["cat", "two", "text"]
        assert got[0]["images"] == [str((tmp_path / "cat.png").resolve())]
        assert got[1]["conversations"][0]["value"] == "<image>\n<image>\nTwo?"  # LLaVA convention
        assert "images" not in got[2] and "image" not in got[2]
    other = tmp_path / "elsewhere"
    other.mkdir()
    data = _write_json(other / "d.json", [_chat("Dog?", "Yes", image="dog.png")])
    assert read_records(data, image_folder=tmp_path / "imgs")[0]["images"] == [str(tmp_path / "imgs" / "dog.png")]


def test_bad_records_name_the_record_and_the_reason(tmp_path):
    _png(tmp_path / "a.png")
    bad = [
        ({"id": "empty", "conversations": []}, "non-empty list"),
        ({"id": "malformed", "conversations": [{"from": "human"}]}, "turn 0 must be"),
        (_chat("hi", "yo", "again", id="ends-human"), "end with gpt"),
        ({"id": "order", "conversations": _chat("x", "y")["conversations"][::-1]}, "alternate"),
        (_chat("<image> <image> two", "x", id="count", image="a.png"), "2 <image> placeholders but 1 images"),
        (_chat("<image>", "x", id="nofile", image="missing.png"), "image file not found"),
        (_chat("<image> what", "x", id="noimage"), "1 <image> placeholders but 0 images"),
        ([1, 2], "must be a JSON object"),
    ]
    good = {"id": "ok", "conversations": [{"from": "system", "value": "Be brief."}, *_chat("q", "a")["conversations"]]}
    path = _write_json(tmp_path / "mixed.jsonl", [good] + [r for r, _ in bad], jsonl=True)
    records, errors = scan_records(path)
    assert [r["id"] for r in records] == ["ok"]
    assert len(errors) == len(bad)
    for err, (record, reason) in zip(errors, bad):
        assert isinstance(err, ValueError) and reason in err.reason
        assert err.record_id == (record["id"] if isinstance(record, dict) else "mixed.jsonl#8")
    with pytest.raises(BadRecord, match="record empty: conversations"):
        read_records(path)
    # a line cut short in a JSONL file is one bad record, in its place, not the end of the file
    lines = path.read_text().splitlines()
    (tmp_path / "broken.jsonl").write_text("\n".join([lines[0], '{"id": "cut", "conversations": [', *lines[1:]]))
    records, errors = scan_records(tmp_path / "broken.jsonl")
    assert [r["id"] for r in records] == ["ok"] and len(errors) == len(bad) + 1
    assert errors[0].record_id == "broken.jsonl#1" and "invalid JSON on line 2 (Expecting" in errors[0].reason
    (tmp_path / "list.json").write_text('[{"id": 1}, {oops]')
    with pytest.raises(ValueError):  # a JSON list that does not parse has no places to keep
        read_records(tmp_path / "list.json")


def _jpeg(path, size, color, orientation=None):
    """A JPEG photo; `orientation` 6 stores it sideways with an EXIF tag saying so."""
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.new("RGB", size, color).save(path, "JPEG", exif=exif.tobytes())
    return path


def _formats(tmp_path) -> dict[str, dict]:
    """The same two-image, two-turn conversation (system prompt, `<image>` in the middle of the
    first turn and in the second) in each format people bring."""
    (tmp_path / "photos").mkdir()
    _jpeg(tmp_path / "photos" / "a.jpg", (64, 48), (200, 30, 30))
    _png(tmp_path / "photos" / "b.png", size=(40, 40), color=(10, 20, 200))
    b_url = "data:image/png;base64," + base64.b64encode((tmp_path / "photos" / "b.png").read_bytes()).decode()
    system, q1, a1, q2, a2 = "Be brief.", "Look: <image>\nWhat colour?", "Red.", "<image>\nAnd this one?", "Blue."
    llava = {
        "id": "r",
        "images": ["photos/a.jpg", "photos/b.png"],
        "conversations": [
            {"from": "system", "value": system},
            {"from": "human", "value": q1},
            {"from": "gpt", "value": a1},
            {"from": "human", "value": q2},
            {"from": "gpt", "value": a2},
        ],
    }
    factory = {
        "id": "r",
        "system": system,
        "images": ["photos/a.jpg", "photos/b.png"],
        "messages": [
            {"role": "user", "content": q1},
            {"role": "assistant", "content": a1},
            {"role": "user", "content": q2},
            {"role": "assistant", "content": a2},
        ],
    }
    openai = {
        "id": "r",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": system}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look: "},
                    {"type": "image_url", "image_url": {"url": "photos/a.jpg"}},
                    {"type": "text", "text": "What colour?"},
                ],
            },
            {"role": "assistant", "content": a1},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": b_url}},
                    {"type": "text", "text": "And this one?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": a2}]},
        ],
    }
    bare_parts = {
        "id": "r",
        "images": ["photos/a.jpg", "photos/b.png"],
        "messages": [
            {"role": "system", "content": system},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look: "},
                    {"type": "image"},
                    {"type": "text", "text": "What colour?"},
                ],
            },
            {"role": "assistant", "content": a1},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
            {"role": "assistant", "content": a2},
        ],
    }
    return {"llava": llava, "llama-factory": factory, "openai": openai, "bare-image-parts": bare_parts}


def test_every_format_reads_as_the_same_sample(tmp_path, proc):
    """LLaVA, ShareGPT / LLaMA-Factory and OpenAI content parts (paths and data URLs), in JSON
    and JSONL, relative to the file: the same conversation encodes to the same tokens, labels and
    pixels; its length is known from the headers alone."""
    formats = _formats(tmp_path)
    reference = proc.encode(formats["llava"], tmp_path)
    tiles = [len(image_to_tensor(tmp_path / "photos" / name, SIZE, 6)) for name in ("a.jpg", "b.png")]
    assert tiles[0] > 1 and int((reference.input_ids == IMAGE_TOKEN_INDEX).sum()) == sum(tiles) * PER_TILE
    assert proc.tokenizer.decode(_labelled(reference)) == "Red.<|im_end|>Blue.<|im_end|>"
    for name, record in formats.items():
        for jsonl in (False, True):
            path = _write_json(
                tmp_path / f"{name}.json{'l' * jsonl}",
                [
                    record,
                    {
                        "id": "text",
                        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                    },
                ],
                jsonl,
            )
            got = read_records(path)
            assert [r["id"] for r in got] == ["r", "text"], name
            sample = proc.encode(got[0])
            assert torch.equal(sample.input_ids, reference.input_ids), name
            assert torch.equal(sample.labels, reference.labels), name
            assert torch.equal(sample.pixel_values, reference.pixel_values), name
            assert proc.lengths(got) == [len(sample), len(proc.encode(got[1]))], name
    assert formats["openai"]["messages"][1]["content"][1]["image_url"]["url"] == "photos/a.jpg"  # input untouched


def test_format_errors_and_the_all_unusable_file(tmp_path):
    _png(tmp_path / "a.png")
    ask = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    cases = [
        (
            {
                "id": "remote",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                    ask[1],
                ],
            },
            "remote image URLs are never fetched",
        ),
        (
            {
                "id": "both",
                "images": ["a.png"],
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": "a.png"}, {"type": "text", "text": "Q"}],
                    },
                    ask[1],
                ],
            },
            "images both inline",
        ),
        (
            {"id": "part", "messages": [{"role": "user", "content": [{"type": "audio"}]}, ask[1]]},
            "not a text, image_url",
        ),
        ({"id": "role", "messages": [{"role": "tool", "content": "x"}, *ask]}, "turn 0 must be"),
        (
            {"id": "count", "images": ["a.png"], "messages": [{"role": "user", "content": "<image><image>"}, ask[1]]},
            "2 <image> placeholders but 1 images",
        ),
        ({"id": "none", "question": "Q", "answer": "A"}, "no turns: a record needs `conversations`"),
    ]
    records, errors = scan_records(_write_json(tmp_path / "mixed.json", [r for r, _ in cases]))
    assert records == [] and [e.record_id for e in errors] == [r["id"] for r, _ in cases]
    for err, (_, reason) in zip(errors, cases):
        assert reason in err.reason, err.reason
    alpaca = _write_json(tmp_path / "alpaca.jsonl", [{"instruction": "Q", "output": "A"}] * 4, jsonl=True)
    with pytest.raises(ValueError) as err:
        DataMixture([(alpaca, 1)])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{alpaca}: none of its 4 records is usable: a record needs")
    assert "`messages`" in message and "the first record has keys [instruction, output]" in message
    with pytest.raises(ValueError, match="empty.json: no records"):
        DataMixture([(_write_json(tmp_path / "empty.json", []), 1)])
    (tmp_path / "cut.jsonl").write_text('{"id": 1, "conv\n{"id": 2\n')
    with pytest.raises(ValueError, match=r"cut.jsonl: none of its 2 records .* has no JSON \(invalid JSON on line 1"):
        DataMixture([(tmp_path / "cut.jsonl", 1)])


def test_record_file_spans_and_header_tile_counts(tmp_path):
    """Records come back from their byte spans (JSON lists with non-ASCII text too); an EXIF-rotated
    photo's tile count from its header equals the decoded one's."""
    records = [_chat("Grüße, 東京?", "Ja ✓", id=f"r{i}") for i in range(5)]
    for name, jsonl in (("list.json", False), ("lines.jsonl", True)):
        path = tmp_path / name
        path.write_text(
            ("\n\n".join if jsonl else lambda rs: "[\n " + ",\n ".join(rs) + " ]\n")(
                [json.dumps(r, ensure_ascii=False) for r in records]
            ),
            encoding="utf-8",
        )
        file = RecordFile(path)
        assert [raw for _, raw in file.scan()] == records and len(file) == 5
        assert [file.load(i) for i in (4, 0, 2)] == [records[4], records[0], records[2]]
    sideways = _jpeg(tmp_path / "side.jpg", (120, 40), (1, 2, 3), orientation=6)  # shown 40 x 120
    for max_tiles in (1, 6):
        assert image_tiles(sideways, SIZE, max_tiles) == len(image_to_tensor(sideways, SIZE, max_tiles)), max_tiles
    assert image_tiles(sideways, SIZE, 6) == 4  # 1x3 upright, not 3x1, plus the thumbnail
    with pytest.raises(ImageError, match="cannot decode image"):
        image_tiles(_write_json(tmp_path / "not-an-image.png", []), SIZE, 6)


def test_mixture_follows_ratios_deterministically(tmp_path):
    _png(tmp_path / "a.png")
    vision = _write_json(tmp_path / "v.json", [_chat("Q", "A", id=f"v{i}", image="a.png") for i in range(60)])
    text = _write_json(tmp_path / "t.jsonl", [_chat("Q", "A", id=f"t{i}") for i in range(25)], jsonl=True)
    mix = DataMixture([(vision, 3), (text, 1)], seed=1, size=400)
    ids = [r["id"] for r in mix]
    assert len(mix) == 400 and mix.counts == [300, 100]
    assert sum(i.startswith("t") for i in ids) == 100
    assert 5 <= sum(i.startswith("t") for i in ids[:40]) <= 20  # interleaved, not blocked
    assert len({i for i in ids if i.startswith("v")}) == 60  # repeated in whole passes
    assert ids == [r["id"] for r in DataMixture([(vision, 3), (text, 1)], seed=1, size=400)]
    assert ids != [r["id"] for r in DataMixture([(vision, 3), (text, 1)], seed=2, size=400)]
    default = DataMixture([(vision, 1), (text, 1)])
    assert len(default) == 85 and sorted(default.counts) == [42, 43]
    with pytest.raises(ValueError, match="ratios"):
        DataMixture([(vision, 0)])


# processor ------------------------------------------------------------------------------------
WORDS = "the of and a to in is you that it was for on are as with they at be this have from or one had by".split()


def _varied_records(rng, n: int, image: str, digits_from: int | None = None) -> list[dict]:
    """n conversations of 1-3 turns in two formats, some with a system turn or an image; from
    position `digits_from` on the text is digits (far more tokens per character than prose)."""

    def say(most: int, digits: bool) -> str:
        return " ".join(str(rng.randint(0, 99)) if digits else rng.choice(WORDS) for _ in range(rng.randint(1, most)))

    out = []
    for i in range(n):
        digits = digits_from is not None and i >= digits_from
        turns = [x for _ in range(rng.randint(1, 3)) for x in (say(20, digits) + "?", say(50, digits) + ".")]
        record = (
            {"id": f"r{i}", **_chat(*turns)}
            if i % 2
            else {
                "id": f"r{i}",
                "messages": [{"role": r, "content": t} for r, t in zip(["user", "assistant"] * 3, turns)],
            }
        )
        if i % 7 == 3:
            record["system"] = say(12, digits)  # both formats read a top-level system prompt
        if i % 5 == 1:
            record["image"] = image
        out.append(record)
    return out


def test_lengths_are_exact_for_a_sample_and_estimated_for_the_rest(tmp_path, tok, monkeypatch):
    """A large source is measured exactly at its first records and every EXACT_EVERY-th one, and
    estimated (from text characters, turns and a system turn; image tokens from the headers)
    elsewhere, close to the exact count and mostly above it; records that are bad, or too long, are
    refused before training wherever they sit, in file order; a small source is all exact."""
    from genieblue.data import MixtureSamples, Source, lengths

    monkeypatch.setattr(lengths, "EXACT_FIRST", 20)
    monkeypatch.setattr(lengths, "EXACT_EVERY", 5)
    _png(tmp_path / "a.png", size=(64, 32))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 9)
    records = _varied_records(__import__("random").Random(0), 160, "a.png")
    records[2] = {"id": "r2", "question": "Q"}  # malformed: refused when checked
    records[33] = {"id": "r33", **_chat("<image>\nWhat is it?", "A cat."), "image": "broken.png"}  # header unreadable
    records[47] = {"id": "r47", **_chat("tell me a story " * 300, "No.")}  # over max_length, estimated position
    path = _write_json(tmp_path / "big.jsonl", records, jsonl=True)
    proc = GenieBlueProcessor(tok, SIZE, PER_TILE, max_tiles=6, max_length=1024)
    samples = MixtureSamples.from_sources([Source(path)], proc)
    bad = samples.mixture.bad
    assert [b.record_id for b in bad] == ["r2", "r33", "r47"], [str(b) for b in bad]
    assert "no turns" in bad[0].reason and "cannot decode image" in bad[1].reason
    assert bad[2].reason.endswith("tokens exceed max_length=1024")
    assert len(samples) == 157 and samples.mixture.scanned == 160
    ratios = []
    for k in range(len(samples)):
        sample = samples[k]  # encodes (an estimated length is never checked against the encoding)
        position = int(sample.id[1:])
        assert samples.exact(k) == (position < 20 or position % 5 == 0), position
        if samples.exact(k):
            assert samples.length(k) == len(sample), position
        else:
            ratios.append(samples.length(k) / len(sample))
    assert len(ratios) == 110 and 0.9 < min(ratios) and max(ratios) < 1.2, (min(ratios), max(ratios))
    assert sum(r >= 1 for r in ratios) >= 0.75 * len(ratios)  # scaled to the sample's 90% quantile

    monkeypatch.setattr(lengths, "EXACT_FIRST", 4096)
    exact = MixtureSamples.from_sources([Source(path)], proc)
    assert all(exact.exact(k) for k in range(len(exact)))
    assert [exact.mixture[k]["id"] for k in range(len(exact))] == [
        samples.mixture[k]["id"] for k in range(len(samples))
    ]
    good = [r for r in scan_records(path)[0] if r["id"] not in ("r33", "r47")]
    assert sorted(exact.lengths) == sorted(proc.lengths(good))


def test_a_scan_is_read_back_for_the_same_bytes_measured_alike_and_only_then(tmp_path, tok, monkeypatch):
    """A file's scan (spans, measures, bad records) is stored in the cache folder and read back by the
    next mixture of the same bytes measured alike, which then reads no record and equals a fresh scan
    in every respect; changed bytes (same size), another measure, a torn stored scan or a bad record
    that has become usable (its image fetched) read the file again."""
    from genieblue.data import MixtureSamples, Source, lengths

    monkeypatch.setenv("GENIEBLUE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lengths, "EXACT_FIRST", 10)
    monkeypatch.setattr(lengths, "EXACT_EVERY", 4)
    _png(tmp_path / "a.png", size=(64, 32))
    records = _varied_records(__import__("random").Random(0), 60, "a.png")
    records[5] = {"id": "r5", "question": "Q"}  # bad: refused when checked
    records[31] = {"id": "r31", **_chat("<image>\nWhat?", "A."), "image": "missing.png"}  # bad, at an estimate
    path = _write_json(tmp_path / "data.jsonl", records, jsonl=True)
    proc = GenieBlueProcessor(tok, SIZE, PER_TILE, max_tiles=6, max_length=1024)

    def view(samples):
        m = samples.mixture
        return (
            [m[k]["id"] for k in range(len(m))],
            samples.lengths,
            [m.exact(k) for k in range(len(m))],
            [(b.record_id, b.reason) for b in m.bad],
            m.scanned,
        )

    read, scan = [], RecordFile.scan

    def counted(self):  # a file read record by record (what a stored scan saves)
        read.append(self.path)
        yield from scan(self)

    fresh = view(MixtureSamples.from_sources([Source(path)], proc, seed=3, scans=False))
    assert [b[0] for b in fresh[3]] == ["r5", "r31"] and set(fresh[2]) == {True, False}  # exact and estimated
    monkeypatch.setattr(RecordFile, "scan", counted)
    first = view(MixtureSamples.from_sources([Source(path)], proc, seed=3))
    stored = list((tmp_path / "cache" / "scans").glob("*.safetensors"))
    assert first == fresh and len(read) == 1 and len(stored) == 1
    assert view(MixtureSamples.from_sources([Source(path)], proc, seed=3)) == fresh and len(read) == 1  # no record read

    text = path.read_text()
    path.write_text(text.replace('"A."', '"B."', 1))  # the same size, other bytes
    MixtureSamples.from_sources([Source(path)], proc, seed=3)
    assert len(read) == 2
    path.write_text(text)
    MixtureSamples.from_sources([Source(path)], GenieBlueProcessor(tok, SIZE, PER_TILE, max_tiles=6), seed=3)
    assert len(read) == 3  # another max_length measures otherwise
    stored[0].write_bytes(stored[0].read_bytes()[:100])  # a torn file: read again, and stored anew
    assert view(MixtureSamples.from_sources([Source(path)], proc, seed=3)) == fresh and len(read) == 4
    assert view(MixtureSamples.from_sources([Source(path)], proc, seed=3)) == fresh and len(read) == 4
    _png(tmp_path / "missing.png")  # the image a bad record lacked, fetched since: the file is read again
    mended = view(MixtureSamples.from_sources([Source(path)], proc, seed=3))
    assert [b[0] for b in mended[3]] == ["r5"] and "r31" in mended[0] and len(read) == 5
    assert view(MixtureSamples.from_sources([Source(path)], proc, seed=3)) == mended and len(read) == 5


_SHARED_READ = """
import json, os, sys
from genieblue.data import GenieBlueProcessor, MixtureSamples, Source, lengths
from genieblue.data.records import RecordFile
from genieblue.model import load_tokenizer

path, cache, (part, parts, size, per_tile) = sys.argv[1], sys.argv[2], map(int, sys.argv[3:])
lengths.EXACT_FIRST, lengths.EXACT_EVERY = 10, 4
checked, check = [], RecordFile.checked

def counted(self, index, *args):
    checked.append(index)
    return check(self, index, *args)

RecordFile.checked = counted
proc = GenieBlueProcessor(load_tokenizer(None), size, per_tile, max_tiles=6, max_length=1024)
os.environ["GENIEBLUE_CACHE"] = cache  # the scans' folder (the tokenizer came from the usual one)
m = MixtureSamples.from_sources([Source(path)], proc, seed=3, share=(part, parts)).mixture
read = sorted(set(checked))  # (reading the records below checks them again)
view = [[m[k]["id"] for k in range(len(m))], [m.measure(k) for k in range(len(m))],
        [m.exact(k) for k in range(len(m))], [[b.record_id, b.reason] for b in m.bad], m.scanned]
print(json.dumps({"view": view, "checked": read}))
"""


@pytest.mark.integration
def test_processes_sharing_a_first_read_each_check_a_part_and_all_get_the_whole(tmp_path, tok, monkeypatch):
    """Two processes reading a new file together (as the trainer's processes on one machine do) each
    check and measure their half of the records and those the length estimates are fitted on, then
    merge each other's stored part into what one process reading alone finds (order, lengths, exact
    flags, bad records in file order), leaving one stored scan; a process whose peer never stores
    its part reads that part itself after waiting, and without waiting where it cannot store its own."""
    import os
    import subprocess
    import sys

    from genieblue.data import MixtureSamples, Source, lengths, scans

    monkeypatch.setenv("GENIEBLUE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lengths, "EXACT_FIRST", 10)
    monkeypatch.setattr(lengths, "EXACT_EVERY", 4)
    _png(tmp_path / "a.png", size=(64, 32))
    records = _varied_records(__import__("random").Random(0), 60, "a.png")
    for i, image in ((5, None), (8, None), (31, "missing.png"), (42, "missing.png")):  # bad, in both parts
        records[i] = (
            {"id": f"r{i}", "question": "Q"}
            if image is None
            else {"id": f"r{i}", **_chat("<image>\nWhat?", "A."), "image": image}
        )
    path = _write_json(tmp_path / "data.jsonl", records, jsonl=True)
    proc = GenieBlueProcessor(tok, SIZE, PER_TILE, max_tiles=6, max_length=1024)
    m = MixtureSamples.from_sources([Source(path)], proc, seed=3, scans=False).mixture
    alone = [
        [m[k]["id"] for k in range(len(m))],
        [m.measure(k) for k in range(len(m))],
        [m.exact(k) for k in range(len(m))],
        [[b.record_id, b.reason] for b in m.bad],
        m.scanned,
    ]
    assert [b[0] for b in alone[3]] == ["r5", "r8", "r31", "r42"] and set(alone[2]) == {True, False}

    env = {k: v for k, v in os.environ.items() if k != "GENIEBLUE_CACHE"}
    args = [str(path), str(tmp_path / "cache")]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _SHARED_READ, *args, str(part), "2", str(SIZE), str(PER_TILE)],
            env=env,
            stdout=subprocess.PIPE,
        )
        for part in (0, 1)
    ]
    outs = [json.loads(child.communicate(timeout=300)[0]) for child in children]
    assert [child.returncode for child in children] == [0, 0]
    learned = [i for i in range(60) if i < 10 or i % 4 == 0]  # what every estimate is fitted on
    for part, out in enumerate(outs):
        assert out["view"] == alone
        assert out["checked"] == sorted({*range(part, 60, 2), *learned})  # its half, and the sample
    assert [p.name.count(".part") for p in (tmp_path / "cache" / "scans").iterdir()] == [0]  # one scan, no parts

    monkeypatch.setattr(scans, "PATIENCE", 0.0)
    monkeypatch.setattr(scans, "SLACK_S", 0.0)
    for stored in (tmp_path / "cache" / "scans").iterdir():
        stored.unlink()
    m = MixtureSamples.from_sources([Source(path)], proc, seed=3, share=(1, 2)).mixture  # part 0's process is gone
    assert [[b.record_id, b.reason] for b in m.bad] == alone[3] and [m.measure(k) for k in range(len(m))] == alone[1]

    monkeypatch.setattr(scans, "SLACK_S", 3600.0)
    monkeypatch.setattr(scans.time, "sleep", lambda s: pytest.fail("waited for a part no peer can store"))
    monkeypatch.setenv("GENIEBLUE_CACHE", str(path))  # "scans" under a file: nothing can be stored
    m = MixtureSamples.from_sources([Source(path)], proc, seed=3, share=(0, 2)).mixture
    assert [[b.record_id, b.reason] for b in m.bad] == alone[3] and [m.measure(k) for k in range(len(m))] == alone[1]


def test_rows_packed_on_estimates_too_short_are_packed_again_exactly(tmp_path, tok, monkeypatch):
    """Estimates that fall short (digits after a sample of prose) never make a row longer than
    max_length nor lose a token: a step's samples, encoded exactly, are packed again and a batch
    whose planned rows overflow gets one more row."""
    from genieblue.data import MixtureSamples, Source, lengths

    monkeypatch.setattr(lengths, "EXACT_FIRST", 40)
    monkeypatch.setattr(lengths, "EXACT_EVERY", 10**6)
    _png(tmp_path / "a.png")
    path = _write_json(
        tmp_path / "digits.jsonl", _varied_records(__import__("random").Random(1), 100, "a.png", 40), True
    )
    max_length = 512
    samples = MixtureSamples.from_sources(
        [Source(path)], GenieBlueProcessor(tok, SIZE, PER_TILE, max_length=max_length)
    )
    rows = first_fit(samples.lengths, max_length)
    short = 0
    for row in rows:
        encoded = [samples[i] for i in row]
        batch = pack(encoded, max_length=max_length, pad_id=0)
        assert batch["input_ids"].shape[1] <= max_length
        assert int((batch["labels"] != -100).sum()) == sum(int((s.labels[1:] != -100).sum()) for s in encoded)
        kept = sorted(batch["input_ids"][batch["input_ids"] != 0].tolist())
        assert kept == sorted(t for s in encoded for t in s.input_ids.tolist() if t != 0)  # every token, once
        short += batch["input_ids"].shape[0] > 1
    assert short > 0


def _labelled(sample) -> list[int]:
    return sample.labels[sample.labels != -100].tolist()


def test_labels_cover_exactly_the_assistant_replies(tok, proc):
    record = {
        "id": "r",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            *_chat("Hi there", "Hello! How can I help?", "2+2?", " It is 4.\n")["conversations"],
        ],
    }
    sample = proc.encode(record)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": " It is 4.\n"},
    ]
    assert sample.input_ids.tolist() == tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert sample.labels.shape == sample.input_ids.shape and sample.pixel_values is None
    expected = tok("Hello! How can I help?<|im_end|>", add_special_tokens=False)["input_ids"]
    expected += tok(" It is 4.\n<|im_end|>", add_special_tokens=False)["input_ids"]
    assert _labelled(sample) == expected
    ends = (sample.input_ids == tok.convert_tokens_to_ids("<|im_end|>")) & (sample.labels != -100)
    assert int(ends.sum()) == 2  # the end-of-turn token of each reply, nothing else
    assert tok.decode(sample.input_ids[-1]) == "\n" and sample.labels[-1] == -100


def test_image_placeholders_expand_to_tiles_times_tokens(tmp_path, tok, proc):
    _png(tmp_path / "wide.png", size=(200, 100))  # 2x1 grid + thumbnail = 3 tiles with max_tiles=6
    _png(tmp_path / "small.png", size=(20, 20))  # 1 tile
    record = _chat("Compare <image> and <image>.", "Same colour.", id="two", images=["wide.png", "small.png"])
    sample = proc.encode(record, tmp_path)
    assert sample.pixel_values.shape == (4, 3, SIZE, SIZE)
    visual = sample.input_ids == IMAGE_TOKEN_INDEX
    assert int(visual.sum()) == 4 * PER_TILE and (sample.labels[visual] == -100).all()
    assert tok.decode(_labelled(sample)) == "Same colour.<|im_end|>"
    single = GenieBlueProcessor(tok, SIZE, PER_TILE, max_tiles=1).encode(record, tmp_path)
    assert single.pixel_values.shape[0] == 2 and int((single.input_ids == IMAGE_TOKEN_INDEX).sum()) == 2 * PER_TILE
    prefixed = proc.encode(_chat("Colour?", "Red.", image="small.png"), tmp_path)
    text = tok.decode(prefixed.input_ids[prefixed.input_ids >= 0])
    assert "<|im_start|>user\n\nColour?" in text  # "<image>\n" went before the user text


def test_placeholder_mismatch_and_overlong_records(tmp_path, tok, proc):
    _png(tmp_path / "a.png")
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        proc.encode(_chat("<image><image>", "x", image="a.png"), tmp_path)
    with pytest.raises(ValueError, match="2 <image> placeholders but 3 images"):
        proc.prompt([{"role": "user", "content": "<image> <image>"}], [Image.new("RGB", (8, 8))] * 3)
    short = GenieBlueProcessor(tok, SIZE, PER_TILE, max_length=30)
    with pytest.raises(BadRecord, match=r"record long: \d+ tokens exceed max_length=30"):
        short.encode(_chat("word " * 40, "ok", id="long"))


def test_prompt_opens_the_assistant_turn(tok, proc):
    ids, pixels = proc.prompt([{"role": "user", "content": "What is this?"}], [Image.new("RGB", (64, 32))])
    assert ids.shape[0] == 1 and pixels.shape == (3, 3, SIZE, SIZE)
    assert int((ids == IMAGE_TOKEN_INDEX).sum()) == 3 * PER_TILE
    text = tok.decode(ids[0][ids[0] >= 0])
    assert text.endswith("<|im_start|>user\n\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")
    ids, pixels = proc.prompt([{"role": "user", "content": "Hi"}])
    assert pixels is None
    assert (
        ids[0].tolist()
        == tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)[
            "input_ids"
        ]
    )


# packing --------------------------------------------------------------------------------------
def test_first_fit_and_batch_layout():
    assert first_fit([5, 3, 4, 2, 8, 1], 8) == [[0, 1], [2, 3, 5], [4]]
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        first_fit([1, 9], 8)
    samples = [
        Sample(torch.arange(1, 6), torch.arange(1, 6), torch.full((1, 3, 2, 2), 1.0)),
        Sample(torch.arange(1, 4), torch.arange(1, 4)),
        Sample(torch.arange(1, 5), torch.arange(1, 5), torch.full((2, 3, 2, 2), 2.0)),
    ]
    batch = pack(samples, max_length=8, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 1, 2, 3], [1, 2, 3, 4, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, 2, 3, 4, 5, -100, 2, 3], [-100, 2, 3, 4, -100, -100, -100, -100]]
    assert batch["attention_mask"] is None and batch["use_cache"] is False
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0, 2.0]
    assert samples[0].labels[0] == 1  # the samples themselves are untouched
    padded = collate(samples, pad_id=0)
    assert padded["input_ids"].shape == (3, 5) and padded["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    assert padded["labels"][1].tolist() == [1, 2, 3, -100, -100]
    assert padded["position_ids"][1].tolist() == [0, 1, 2, 2, 2]
    assert pack(samples[1:2])["pixel_values"] is None


def _tiny_model(attn: str):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation=attn,
    )
    llm = LlamaForCausalLM(config).to(torch.float64)
    model = GenieBlueForConditionalGeneration.from_base(
        llm=llm, vision=TINY_VISION, strategy="genieblue-skip", dtype=torch.float64
    )
    for p in model.llm_delta_parameters():  # make the image path differ from the base
        p.data.normal_(0, 0.05)
    return model.eval()


def _samples(proc, tmp_path, images: bool) -> list[Sample]:
    """Encoded records of varied lengths, token ids folded into the tiny vocabulary."""
    _png(tmp_path / "wide.png", size=(100, 40), color=(10, 200, 60))
    _png(tmp_path / "tall.png", size=(30, 90), color=(90, 20, 250))
    replies = ["Yes.", "It is a long answer with many words in it.", "No", "Maybe later, thanks!", "Sure thing."]
    records = [_chat(f"Question {i}?" + " more" * i, reply) for i, reply in enumerate(replies)]
    if images:
        for i, record in enumerate(records[:4]):
            record["images"] = ["wide.png", "tall.png"][: 1 + i % 2]
    samples = [proc.encode(r, tmp_path) for r in records]
    for s in samples:
        s.input_ids = torch.where(s.input_ids >= 0, s.input_ids % VOCAB, s.input_ids)
        s.labels = torch.where(s.labels >= 0, s.labels % VOCAB, s.labels)
    return samples


@pytest.mark.parametrize("images", [False, True], ids=["text", "images"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_per_sample_losses(tmp_path, proc, attn, images):
    model = _tiny_model(attn)
    samples = _samples(proc, tmp_path, images)
    route = {"shared_base": True} if images else {}  # text-only samples take the image path too
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            out = model(s.input_ids[None], pixel_values=s.pixel_values, labels=s.labels[None], **route)
            n = int((s.labels[1:] != -100).sum())
            total, count = total + out.loss.item() * n, count + n
        max_length = 2 * max(len(s) for s in samples)
        batch = pack(samples, max_length=max_length, pad_id=proc.pad_id)
        assert 1 < batch["input_ids"].shape[0] < len(samples)  # really packed, over several rows
        packed = model(**batch, **route).loss.item()
        assert packed == pytest.approx(total / count, rel=1e-6)  # HF computes the loss in float32
        leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
        assert model(**leaky, **route).loss.item() != pytest.approx(packed, rel=1e-4)  # the test can see leaks


def test_damaged_prompt_settings_are_named(tmp_path):
    """A model folder's processor.json that does not hold a mapping is refused naming the file; one
    that is not there gives the defaults."""
    from genieblue.data.processor import processor_settings

    assert processor_settings(tmp_path) == {}
    for text in ("{cut", "[1]"):
        (tmp_path / "processor.json").write_text(text)
        with pytest.raises(ValueError, match=r"processor.json is damaged .*: write it again .* or delete it"):
            processor_settings(tmp_path)
