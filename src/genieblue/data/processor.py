"""Records and chat messages -> model inputs: the tokenizer's chat template renders the text, each
`<image>` becomes `tiles * tokens_per_tile` copies of `IMAGE_TOKEN_INDEX`, and labels keep only the
assistant replies (their text and end-of-turn token; everything else is -100).

Assistant spans are found in characters by rendering the conversation incrementally (the prompt
up to each reply with the generation prompt, then the prompt including the reply) and mapped to
tokens through the tokenizer's offsets, so no template-specific markers are hard-coded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .._io import write_json
from ..model.modeling import IMAGE_TOKEN_INDEX
from .images import image_tiles, image_to_tensor
from .records import IMAGE_PLACEHOLDER, ROLES, TOO_LONG, BadRecord, check_record, prepend_placeholders

IGNORE_INDEX = -100


@dataclass
class Sample:
    """One encoded record: input_ids and labels (T,), pixel_values (tiles, 3, S, S) or None."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None = None
    id: str | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


class GenieBlueProcessor:
    """Turns records (any format `check_record` reads) into training `Sample`s and chat messages
    into generation prompts. `from_model` and `load_processor` build one matching a model.

    Args:
        tokenizer: the base's tokenizer, with a chat template.
        image_size: tile side in pixels, the vision tower's.
        tokens_per_tile: image tokens one tile makes in the model.
        max_tiles: tiles per image (plus a thumbnail above 1); 1: single-patch mode.
        vision_type: the encoder's `model_type`, which picks the pixel normalisation.
        max_length: the longest sample in tokens (longer records are refused, never truncated).
        system_prompt: the system turn added to training records and image prompts without one.

    Raises:
        ValueError: the tokenizer has no chat template.
    """

    def __init__(
        self,
        tokenizer,
        image_size: int,
        tokens_per_tile: int,
        max_tiles: int = 1,
        vision_type: str = "siglip_vision_model",
        max_length: int = 4096,
        system_prompt: str | None = None,
    ):
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template; use an instruct / chat tokenizer")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.tokens_per_tile = tokens_per_tile
        self.max_tiles = max_tiles
        self.vision_type = vision_type
        self.max_length = max_length
        self.system_prompt = system_prompt  # training records and image prompts without a system turn

    @classmethod
    def from_model(
        cls, model, tokenizer, max_tiles: int = 1, max_length: int = 4096, system_prompt: str | None = None
    ) -> GenieBlueProcessor:
        """A processor matching `model`'s vision tower (tile size, tokens per tile, normalisation)."""
        vision = model.vision
        return cls(
            tokenizer,
            vision.image_size,
            vision.tokens_per_tile,
            max_tiles,
            vision.vit.config.model_type,
            max_length,
            system_prompt,
        )

    def measure_key(self) -> str:
        """A digest of everything `lengths` and `encode` depend on (the tokenizer whole, its chat
        template, the tiling and the length limit): equal keys measure every record alike."""
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
        settings = [tok.chat_template, tok.eos_token, tok.bos_token, self.image_size, self.tokens_per_tile]
        settings += [self.max_tiles, self.vision_type, self.max_length, self.system_prompt]
        return hashlib.sha256((vocab + json.dumps(settings)).encode()).hexdigest()

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # public -----------------------------------------------------------------------------------
    def encode(self, record: dict, image_folder: str | Path | None = None) -> Sample:
        """A training sample from a record (validated and normalised with `check_record`). Raises
        `BadRecord` for an invalid record or one longer than `max_length` (never truncated), and
        `ImageError` for an image that cannot be read, and `ValueError` for a chat template that
        renders earlier turns differently once later ones follow (replies cannot be located)."""
        record, messages, text = self._rendered(record, image_folder)
        pixels = [self._pixels(path) for path in record.get("images", [])]
        ids, starts = self._tokenize(text, [len(p) for p in pixels])
        if len(ids) > self.max_length:
            raise self._too_long(record, len(ids))
        spans = self._assistant_spans(messages, text)
        labels = [i if any(a <= s < b for a, b in spans) else IGNORE_INDEX for i, s in zip(ids, starts)]
        return Sample(torch.tensor(ids), torch.tensor(labels), torch.cat(pixels) if pixels else None, record["id"])

    def lengths(self, records: list[dict], image_folder: str | Path | None = None) -> list:
        """`len(self.encode(record))` of each record, without decoding a pixel (tile counts come
        from the image headers, all text goes through one tokenizer call): what packing needs
        before training. Each entry is the length, or the error `encode` would raise for it."""
        out, pieces = [], []
        for record in records:
            try:
                record, _, text = self._rendered(record, image_folder)
                tiles = self._tiles(record)
                parts = text.split(IMAGE_PLACEHOLDER)
                _check_placeholders(parts, tiles)
                out.append((record, len(pieces), len(parts), sum(tiles) * self.tokens_per_tile))
                pieces += parts
            except ValueError as err:  # BadRecord and ImageError included
                out.append(err)
        counts = [len(ids) for ids in self.tokenizer(pieces, add_special_tokens=False)["input_ids"]] if pieces else []
        for k, entry in enumerate(out):
            if not isinstance(entry, ValueError):
                record, first, n, image_tokens = entry
                out[k] = image_tokens + sum(counts[first : first + n])
                if out[k] > self.max_length:
                    out[k] = self._too_long(record, out[k])
        return out

    def image_tokens(self, record: dict) -> int:
        """How many image tokens a checked record's images make, from their headers alone; raises
        `ImageError` for an image whose header cannot be read."""
        return sum(self._tiles(record)) * self.tokens_per_tile

    def prompt(self, messages: list[dict], images: list | tuple = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input_ids (1, T), pixel_values or None) for generation: the chat template with the
        assistant turn opened.

        A text-only conversation is exactly what the base's own tokenizer makes of it
        (`apply_chat_template(messages, add_generation_prompt=True)`, nothing added, the training
        `system_prompt` left out), so it runs as the base. With images, a conversation without a
        system turn gets the training `system_prompt` (the delta learnt with it); a system turn of
        its own wins. `images` are PIL images, paths or bytes; without any `<image>` in the
        messages they go before the first user text.

        Raises:
            ValueError: images but no user message, or `<image>` placeholders that do not match
                the images in number.
            ImageError: an image that cannot be read.
        """
        if not images:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
            return torch.tensor([ids]), None
        messages = self._with_system(_with_image_prefix(messages, len(images)))
        pixels = [self._pixels(image) for image in images]
        ids, _ = self._tokenize(self._render(messages, add_generation_prompt=True), [len(p) for p in pixels])
        return torch.tensor([ids]), (torch.cat(pixels) if pixels else None)

    # internals --------------------------------------------------------------------------------
    def _rendered(self, record: dict, image_folder) -> tuple[dict, list[dict], str]:
        """(the checked record, its chat messages, the rendered conversation)."""
        record = check_record(record, image_folder)
        messages = self._with_system(
            [{"role": ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
        )
        return record, messages, self._render(messages, add_generation_prompt=False)

    def _tiles(self, record: dict) -> list[int]:
        return [image_tiles(path, self.image_size, self.max_tiles) for path in record.get("images", [])]

    def _too_long(self, record: dict, length: int) -> BadRecord:
        return BadRecord(record["id"], f"{length} tokens {TOO_LONG}={self.max_length}")

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt is None or (messages and messages[0]["role"] == "system"):
            return messages
        return [{"role": "system", "content": self.system_prompt}, *messages]

    def _pixels(self, image: str | Path | bytes | Image.Image) -> torch.Tensor:
        return image_to_tensor(image, self.image_size, self.max_tiles, self.vision_type)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _assistant_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """Character spans of each assistant reply in `text`: from the end of the generation prompt
        to the end of the reply's turn (its end-of-turn token; trailing whitespace excluded)."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1], add_generation_prompt=False).rstrip()
            if not (text.startswith(before) and text.startswith(through)):
                raise ValueError(
                    "the chat template renders earlier turns differently once later turns follow, so "
                    "assistant replies cannot be located; use a template without such rewriting"
                )
            spans.append((len(before), len(through)))
        return spans

    def _tokenize(self, text: str, tiles: list[int]) -> tuple[list[int], list[int]]:
        """Token ids of `text` with each `<image>` expanded to its image's tiles times
        `tokens_per_tile` image tokens, and each token's start character in `text` (-1 for image
        tokens)."""
        pieces = text.split(IMAGE_PLACEHOLDER)
        _check_placeholders(pieces, tiles)
        ids, starts, offset = [], [], 0
        for k, piece in enumerate(pieces):
            if k:
                n = tiles[k - 1] * self.tokens_per_tile
                ids += [IMAGE_TOKEN_INDEX] * n
                starts += [-1] * n
                offset += len(IMAGE_PLACEHOLDER)
            enc = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
            ids += enc["input_ids"]
            starts += [offset + a for a, _ in enc["offset_mapping"]]
            offset += len(piece)
        return ids, starts


def _check_placeholders(pieces: list[str], tiles: list[int]) -> None:
    if len(pieces) - 1 != len(tiles):
        raise ValueError(
            f"the text has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders but {len(tiles)} images were given"
        )


def _with_image_prefix(messages: list[dict], n_images: int) -> list[dict]:
    """Messages with `<image>\\n` per image before the first user text when none is placed."""
    if not n_images or any(IMAGE_PLACEHOLDER in m["content"] for m in messages):
        return messages
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first is None:
        raise ValueError("images were given but there is no user message to attach them to")
    return prepend_placeholders(messages, first, "content", n_images)


PROCESSOR_SETTINGS = "processor.json"


def save_processor_settings(model_dir: str | Path, max_tiles: int = 1, system_prompt: str | None = None) -> None:
    """Record how a model was trained to be prompted, beside its delta."""
    write_json(Path(model_dir) / PROCESSOR_SETTINGS, {"max_tiles": max_tiles, "system_prompt": system_prompt})


def processor_settings(model_dir: str | Path) -> dict:
    """The settings `save_processor_settings` wrote into a folder ({} when it has none: the defaults);
    ValueError, naming the file, when it does not hold a mapping."""
    path = Path(model_dir) / PROCESSOR_SETTINGS
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is damaged ({err}): write it again (save_processor_settings) or delete it") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} is damaged (not a mapping): write it again (save_processor_settings) or delete it")
    return settings


def load_processor(model_dir: str | Path, model, tokenizer, max_length: int = 4096) -> GenieBlueProcessor:
    """The processor a saved model was trained with.

    Args:
        model_dir: the saved folder; its `processor.json` holds the prompt settings (the defaults
            when it has none).
        model: the loaded model (its vision tower sets tile size, tokens per tile, normalisation).
        tokenizer: the base's tokenizer.
        max_length: the longest sample in tokens.

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    return GenieBlueProcessor.from_model(model, tokenizer, max_length=max_length, **processor_settings(model_dir))
