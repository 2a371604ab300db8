"""Images in: safe loading of untrusted files, bytes or base64 `data:` URLs, InternVL-style
dynamic-resolution tiling (the best cols x rows grid for the aspect ratio, plus a global thumbnail),
the tile count of an image from its header alone (for packing before any pixel is decoded), and
normalisation to the (tiles, 3, S, S) float tensor the vision tower expects."""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

MAX_PIXELS = 4096 * 4096
"""Default ceiling on width * height, checked from the header before any pixel is decoded."""

IMAGE_STATS = {
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip_vision_model": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
"""Per-channel (mean, std) of each ViT type, for pixels scaled to [0, 1]."""

BACKBONE_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
"""ImageNet's (mean, std): what convolutional backbones (AutoBackbone: ResNet, ConvNeXt, ...) expect."""

_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError)
_ORIENTATION = 0x0112  # the EXIF tag `exif_transpose` follows


class ImageError(ValueError):
    """An image that cannot be used (missing, corrupt, too large); the message is one line."""


ImageSource = str | os.PathLike | bytes | Image.Image


def is_data_url(source) -> bool:
    return isinstance(source, str) and source.startswith("data:")


def _describe(source: ImageSource) -> str:
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<{source.width}x{source.height} image>"
    if is_data_url(source):
        return f"<data URL, {len(source)} characters>"
    return str(source)


def data_url_payload(url: str) -> str:
    """The base64 text of a `data:` URL; a one-line ValueError when the URL is not base64."""
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ValueError("data URLs must be base64 (data:image/png;base64,...)")
    return payload


def decode_base64(payload: str) -> bytes:
    """The bytes of base64 text; a one-line ValueError when it is not valid base64."""
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"not valid base64 ({_one_line(err)})") from None


def _data_url_bytes(url: str) -> bytes:
    try:
        return decode_base64(data_url_payload(url))
    except ValueError as err:
        raise ImageError(f"{_describe(url)}: {err}") from None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, bytes):
        return Image.open(io.BytesIO(source))
    if is_data_url(source):
        return Image.open(io.BytesIO(_data_url_bytes(source)))
    if not Path(source).is_file():
        raise ImageError(f"image not found: {source}")
    return Image.open(source)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB; transparent areas become white rather than black."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _opened(source: ImageSource, max_pixels: int, decode: bool):
    """`decode`: the decoded upright RGB image; else (width, height) upright, from the header only.

    The size is checked from the header before decoding, so decompression bombs cost nothing;
    every failure becomes an `ImageError` naming the source.
    """
    name = _describe(source)
    try:
        image = _open(source)
        if image.width * image.height > max_pixels:
            raise ImageError(f"{name}: {image.width}x{image.height} pixels exceeds max_pixels={max_pixels}")
        if not decode:
            # PNG keeps EXIF after the pixels unless it comes first: read it only when already there
            exif = image.getexif() if image.format != "PNG" or "exif" in image.info else {}
            turned = exif.get(_ORIENTATION, 1) in (5, 6, 7, 8)
            size = (image.height, image.width) if turned else image.size
            if not isinstance(source, Image.Image):
                image.close()
            return size
        image.load()
        return _to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:  # PIL's own hard limit, hit while reading the header
        raise ImageError(f"{name}: too many pixels ({_one_line(err)})") from err
    except _DECODE_ERRORS as err:
        raise ImageError(f"{name}: cannot decode image ({_one_line(err)})") from err


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A decoded RGB image from a path, a base64 `data:` URL, raw bytes or a PIL image."""
    return _opened(source, max_pixels, decode=True)


def image_tiles(source: ImageSource, image_size: int, max_tiles: int = 1, max_pixels: int = MAX_PIXELS) -> int:
    """How many tiles `image_to_tensor` makes of an image, read from its header (no pixel is
    decoded); raises `ImageError` like `load_image` for a missing, unreadable or too large image."""
    width, height = _opened(source, max_pixels, decode=False)
    cols, rows = best_grid(width, height, image_size, max_tiles)
    return cols * rows + (cols * rows > 1)


def best_grid(width: int, height: int, image_size: int, max_tiles: int) -> tuple[int, int]:
    """(cols, rows) with cols * rows <= max_tiles whose aspect ratio is closest to the image's.

    Ties go to the larger grid when the image has more than half its pixels (InternVL's rule),
    so a large square photo gets 2x2 tiles while a small one stays at 1x1.
    """
    grids = sorted(
        ((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles // c + 1)),
        key=lambda g: (g[0] * g[1], g),
    )
    aspect, best = width / height, (1, 1)
    for cols, rows in grids:
        diff, best_diff = abs(aspect - cols / rows), abs(aspect - best[0] / best[1])
        enough_pixels = width * height > 0.5 * image_size * image_size * cols * rows
        if diff < best_diff or (diff == best_diff and enough_pixels):
            best = (cols, rows)
    return best


def tile_image(image: Image.Image, image_size: int, max_tiles: int = 1) -> list[Image.Image]:
    """Square tiles of `image_size` pixels, row by row, then a global thumbnail when there is more
    than one tile. `max_tiles=1` is a plain resize (the phone's single-patch mode)."""
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    thumbnail = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    cols, rows = best_grid(image.width, image.height, image_size, max_tiles)
    if cols * rows == 1:
        return [thumbnail]
    grid = image.resize((cols * image_size, rows * image_size), Image.Resampling.BICUBIC)
    tiles = [
        grid.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    return tiles + [thumbnail]


def normalize(tiles: list[Image.Image], vision_type: str = "siglip_vision_model") -> torch.Tensor:
    """Stack RGB tiles into a (tiles, 3, S, S) float tensor with the tower's mean / std (a ViT's own,
    ImageNet's for any other encoder type)."""
    stats = IMAGE_STATS.get(vision_type, BACKBONE_STATS)
    mean, std = (np.asarray(v, dtype=np.float32)[:, None, None] for v in stats)
    pixels = np.stack([np.asarray(t, dtype=np.float32).transpose(2, 0, 1) / 255.0 for t in tiles])
    return torch.from_numpy((pixels - mean) / std)


def image_to_tensor(
    source: ImageSource,
    image_size: int,
    max_tiles: int = 1,
    vision_type: str = "siglip_vision_model",
    max_pixels: int = MAX_PIXELS,
) -> torch.Tensor:
    """Load, tile and normalise one image: (tiles, 3, image_size, image_size)."""
    return normalize(tile_image(load_image(source, max_pixels), image_size, max_tiles), vision_type)
