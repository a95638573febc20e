"""Deterministic test images, as the encoded bytes a worker would fetch.

Every factory returns ``bytes`` and gives the same bytes for the same
arguments, so unit, integration and security tests can share them. Photo-like
content is smooth gradients plus seeded noise: it compresses and decodes like
a photograph without needing sample files. The expensive ones are cached.

Colours used by the tests that check content are module constants (``RED``,
``GREEN``, ``BLUE``...), so an assertion can name what it expects.
"""

from __future__ import annotations

import functools
import struct
import zipfile
import zlib
from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
YELLOW = (255, 255, 0)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GREY = (128, 128, 128)

# Outside labelmill's default allow-list but recognised by Pillow.
UNSUPPORTED_FORMAT = "ICO"


def encode(img: Image.Image, format: str, **params: Any) -> bytes:
    """Encode a Pillow image in ``format`` (Pillow's name) with save ``params``."""
    buffer = BytesIO()
    img.save(buffer, format, **params)
    return buffer.getvalue()


def photo(w: int = 640, h: int = 480, seed: int = 0) -> Image.Image:
    """An RGB image that looks like a photo to a codec: smooth waves and gradients, plus grain."""
    rng = np.random.default_rng(seed)
    # The smooth part is drawn small and enlarged, so 12 Mpx costs little.
    sw, sh = max(2, w // 16), max(2, h // 16)
    y, x = np.mgrid[0:sh, 0:sw].astype(np.float32)
    x /= sw - 1
    y /= sh - 1
    channels = []
    for c in range(3):
        fx, fy, phase = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (fx * x + fy * y) + phase) * 60 + 128
        channels.append(wave + (x if c == 0 else y) * 50)
    smooth = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(smooth).resize((w, h), Image.Resampling.BILINEAR))
    # A tile of grain repeated over the image: detail for the codec, at no cost.
    grain = rng.integers(-8, 9, size=(64, 64, 1), dtype=np.int16)
    tiled = np.tile(grain, ((h + 63) // 64, (w + 63) // 64, 1))[:h, :w]
    return Image.fromarray(np.clip(base + tiled, 0, 255).astype(np.uint8))


def solid(color: tuple[int, int, int], w: int = 64, h: int = 48) -> Image.Image:
    """A one-colour RGB image."""
    return Image.new("RGB", (w, h), color)


def halves(left: tuple[int, ...], right: tuple[int, ...], mode: str = "RGB") -> Image.Image:
    """A 64x48 image in ``mode``: the left half one colour, the right half another."""
    img = Image.new(mode, (64, 48), left)
    img.paste(Image.new(mode, (32, 48), right), (32, 0))
    return img


def jpeg(w: int = 640, h: int = 480, seed: int = 0, quality: int = 90) -> bytes:
    """A baseline JPEG photo (YCbCr, 4:2:0)."""
    return encode(photo(w, h, seed), "JPEG", quality=quality)


def png(w: int = 640, h: int = 480, seed: int = 0) -> bytes:
    """An RGB PNG photo."""
    return encode(photo(w, h, seed), "PNG")


def bmp(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    """A 24-bit BMP photo."""
    return encode(photo(w, h, seed), "BMP")


def gif(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    """A single-frame GIF photo (palette)."""
    return encode(photo(w, h, seed), "GIF")


def progressive_jpeg(w: int = 640, h: int = 480, seed: int = 0) -> bytes:
    """A progressive JPEG photo."""
    return encode(photo(w, h, seed), "JPEG", quality=90, progressive=True)


def gray_jpeg(w: int = 640, h: int = 480, seed: int = 0) -> bytes:
    """A one-channel (L) JPEG photo."""
    return encode(photo(w, h, seed).convert("L"), "JPEG", quality=90)


def cmyk_jpeg() -> bytes:
    """A 64x48 CMYK JPEG (Adobe, as Pillow writes it): left half RED, right half BLUE."""
    return encode(halves(RED, BLUE).convert("CMYK"), "JPEG", quality=95)


def exif_rotated_jpeg(w: int = 400, h: int = 200) -> bytes:
    """A landscape JPEG stored sideways with EXIF orientation 6 (rotate 90° clockwise).

    As stored, the top-left quadrant is RED and the rest BLUE. Displayed
    correctly (portrait, ``h`` x ``w``), RED is the top-right quadrant.
    """
    img = Image.new("RGB", (w, h), BLUE)
    img.paste(Image.new("RGB", (w // 2, h // 2), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def big_jpeg(w: int = 4032, h: int = 3024) -> bytes:
    """A 12-megapixel camera-sized JPEG photo (cached)."""
    return _big_jpeg(w, h)


@functools.cache
def _big_jpeg(w: int, h: int) -> bytes:
    return encode(photo(w, h, seed=12), "JPEG", quality=90)


def truncated_jpeg() -> bytes:
    """A valid JPEG cut in half: the header reads, the pixel data ends early."""
    data = jpeg(320, 240)
    return data[: len(data) // 2]


def tiff(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    """An uncompressed RGB TIFF photo."""
    return encode(photo(w, h, seed), "TIFF")


def multipage_tiff() -> bytes:
    """A two-page TIFF: page 0 RED, page 1 GREEN."""
    return encode(solid(RED), "TIFF", save_all=True, append_images=[solid(GREEN)])


def webp(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    """A lossy WebP photo."""
    return encode(photo(w, h, seed), "WEBP", quality=90)


def animated_gif() -> bytes:
    """A three-frame 64x48 GIF: frame 0 RED, frame 1 GREEN, frame 2 BLUE."""
    frames = [solid(c).convert("P") for c in (RED, GREEN, BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def animated_webp() -> bytes:
    """A two-frame 64x48 lossless WebP: frame 0 RED, frame 1 GREEN."""
    frames = [solid(RED), solid(GREEN)]
    return encode(
        frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True
    )


def one_by_one_png() -> bytes:
    """A 1x1 RED PNG."""
    return encode(solid(RED, 1, 1), "PNG")


def strip_png(w: int = 8000, h: int = 4) -> bytes:
    """A very long, very thin PNG photo (a panorama strip)."""
    return encode(photo(w, h), "PNG")


def rgba_png() -> bytes:
    """A 64x48 RGBA PNG: left half fully transparent BLACK, right half opaque RED.

    Flattened onto white the left half is WHITE; a decoder that drops the
    alpha channel shows it black.
    """
    return encode(halves((0, 0, 0, 0), (*RED, 255), mode="RGBA"), "PNG")


def la_png() -> bytes:
    """A 64x48 grey+alpha PNG: left half fully transparent black, right half opaque grey 128."""
    return encode(halves((0, 0), (128, 255), mode="LA"), "PNG")


def palette_transparent_png() -> bytes:
    """A 64x48 palette PNG whose index 0 (RED) is transparent: left half index 0, right GREEN.

    Flattened onto white the left half is WHITE; a decoder that ignores the
    tRNS chunk shows it RED.
    """
    img = Image.new("P", (64, 48), 0)
    img.putpalette([*RED, *GREEN] + [0, 0, 0] * 254)
    img.paste(1, (32, 0, 64, 48))
    return encode(img, "PNG", transparency=0)


def png16(w: int = 256, h: int = 16) -> bytes:
    """A 16-bit greyscale PNG: a horizontal ramp from 0 (left) to 65535 (right).

    Clipping to 8 bits instead of scaling turns all but the leftmost column white.
    """
    ramp = np.linspace(0, 65535, w).round().astype(np.uint16)
    return encode(Image.fromarray(np.tile(ramp, (h, 1))), "PNG")


def as_mode(mode: str, format: str = "TIFF", w: int = 120, h: int = 90) -> bytes:
    """A photo converted to Pillow ``mode`` and saved as ``format`` (which must support it).

    For float and 32-bit modes the photo's grey levels are spread over a wide
    range (-1000..1000 for F, 0..1,000,000 for I), like scientific data.
    """
    img = photo(w, h)
    if mode == "F":
        levels = np.asarray(img.convert("L"), dtype=np.float32)
        img = Image.fromarray(levels / 255 * 2000 - 1000)
    elif mode == "I":
        levels = np.asarray(img.convert("L"), dtype=np.int32)
        img = Image.fromarray(levels * 3921)
    else:
        img = img.convert(mode)
    return encode(img, format)


def ico_bytes() -> bytes:
    """A 32x32 Windows icon: a format Pillow reads but labelmill refuses by default."""
    return encode(photo(32, 32), "ICO", sizes=[(32, 32)])


def empty() -> bytes:
    """Zero bytes."""
    return b""


def text_as_jpg() -> bytes:
    """Plain text, as found in an object misleadingly named ``*.jpg``."""
    return b"This is not a JPEG, just a note someone saved as photo.jpg.\n" * 4


def html_bytes() -> bytes:
    """An HTML error page, as a misconfigured proxy or CDN returns instead of an image."""
    return (
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
        b"<body><h1>Not Found</h1><img src='cat.jpg'></body></html>\n"
    )


def svg_bytes() -> bytes:
    """An SVG drawing: an image, but vector, which labelmill does not rasterise."""
    return (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48">'
        b'<rect width="64" height="48" fill="red"/></svg>\n'
    )


def zip_bytes() -> bytes:
    """A ZIP archive holding a JPEG (fixed timestamps, so the bytes never change)."""
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(
            zipfile.ZipInfo("photo.jpg", date_time=(2024, 1, 1, 0, 0, 0)), jpeg(64, 48)
        )
    return buffer.getvalue()


def blank_png(w: int, h: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, built without holding its pixels.

    Deflate shrinks the zero rows about a thousandfold, so a file of a few
    tens of kilobytes decodes to hundreds of megapixels.
    """
    return _blank_png(w, h)


@functools.cache
def _blank_png(w: int, h: int) -> bytes:
    row = bytes(1 + (w + 7) // 8)  # filter byte 0, then the packed bits
    deflate = zlib.compressobj(9)
    rows_per_chunk = max(1, (1 << 20) // len(row))
    chunks = []
    for start in range(0, h, rows_per_chunk):
        chunks.append(deflate.compress(row * min(rows_per_chunk, h - start)))
    chunks.append(deflate.flush())
    return _png_container(w, h, bit_depth=1, color_type=0, idat=b"".join(chunks))


def decompression_bomb_png(side: int = 20_000) -> bytes:
    """A real ``side`` x ``side`` 1-bit PNG (400 Mpx by default) in about 50 KB (cached)."""
    return blank_png(side, side)


def huge_header_png(w: int = 100_000, h: int = 100_000) -> bytes:
    """A PNG of a few dozen bytes whose IHDR (with a correct CRC) claims ``w`` x ``h`` RGB."""
    return _png_container(w, h, bit_depth=8, color_type=2, idat=zlib.compress(bytes(4)))


def huge_header_bmp(w: int = 100_000, h: int = 100_000) -> bytes:
    """A 24-bit BMP whose header claims ``w`` x ``h`` but that carries 16 bytes of pixels."""
    pixels = bytes(16)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    offset = 14 + len(info)
    header = struct.pack("<2sIHHI", b"BM", offset + len(pixels), 0, 0, offset)
    return header + info + pixels


def _png_container(w: int, h: int, *, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
