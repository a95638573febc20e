"""Decode one image for the model: encoded bytes in, uint8 ``[size, size, 3]`` RGB out.

Pure: no network and no I/O. Pillow's global settings are left alone;
warning filters change only inside a local ``warnings.catch_warnings()``.
Every way an image can fail becomes :class:`labelmill.errors.ImageError` with
one of the kinds ``empty``, ``decompression_bomb``, ``unsupported`` or
``decode``, so one bad object yields one error line and never fails a batch.

The work is ordered so that a large photo stays cheap: the header is checked
before any pixel is decoded, JPEGs are decoded at a reduced scale (draft
mode), and everything after the resize (compositing, grey to RGB, EXIF
orientation) happens on ``size x size`` pixels only.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from io import BytesIO

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from labelmill.errors import ImageError

SIZE = 299
"""Inception-v3's input side."""

# Bilinear is what Inception's own preprocessing used; Pillow's version is
# antialiased (the kernel widens with the scale factor), and at this size it
# costs 40% less than bicubic. reducing_gap lets Pillow first shrink by an
# integer factor with a cheap box filter while staying 3x above the target,
# which Pillow documents as indistinguishable from a full resample.
RESAMPLE = Image.Resampling.BILINEAR
REDUCING_GAP = 3.0

BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited onto white, as browsers show them."""

_ORIENTATION_TAG = 0x0112
# The same table as ImageOps.exif_transpose.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_TRANSPARENCY_MODES = frozenset({"1", "L", "RGB", "P"})

UInt8Image = npt.NDArray[np.uint8]


Hold = Callable[[int], AbstractContextManager[object]]
"""Reserve this many bytes of memory for the block (``workers.budget``)."""


def preprocess(
    data: bytes,
    *,
    max_pixels: int,
    allowed_formats: Collection[str],
    size: int = SIZE,
    hold: Hold | None = None,
) -> UInt8Image:
    """Encoded image bytes -> C-contiguous uint8 array ``[size, size, 3]``, RGB.

    The whole frame is squashed to a square, aspect ratio not preserved: that
    is how Inception-v3 was trained (full image, resized) and it keeps every
    pixel in view, where a centre crop would cut off the subject of a portrait
    or panorama. Only the first frame of an animation or multi-page file is
    used. Raises :class:`ImageError` (``empty``, ``decompression_bomb``,
    ``unsupported``, ``decode``). ``hold(n)`` is entered with what decoding
    will take (:func:`decode_cost`) before any pixel is decoded, and left once
    the image is down to ``size x size``.
    """
    with warnings.catch_warnings():
        _quiet_pillow()
        img = _open_checked(data, max_pixels=max_pixels, allowed_formats=allowed_formats, size=size)
        try:
            with hold(decode_cost(img)) if hold else contextlib.nullcontext():
                _load(img, max_pixels)
                try:
                    orientation = _orientation(img)
                    out = _to_rgb(img, size)
                    if orientation is not None:
                        out = out.transpose(orientation)
                    array = np.array(out, dtype=np.uint8)
                except Exception as exc:
                    # The pixels decoded, so a failure here means an odd mode or
                    # palette in an untrusted file; it is that image's fault alone.
                    raise ImageError("decode", f"cannot convert {img.mode} image: {exc}") from exc
        finally:
            img.close()
    return array


# Bytes per pixel of a decoded frame in Pillow's memory: "RGB" is stored as
# four bytes, like "RGBA" and "CMYK".
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def decode_cost(img: Image.Image) -> int:
    """Bytes that decoding ``img`` (opened, draft applied) and resizing it will hold at most.

    The decoded frame, plus the full-size copy that a mode conversion makes
    (palette, CMYK, ...) or the float32 arrays of a high-depth image; the
    reduced and resized images are at most (3 x 299)^2 pixels and not counted.
    """
    pixels = img.size[0] * img.size[1]
    mode = img.mode
    cost = pixels * _BYTES_PER_PIXEL.get(mode, 4)
    if mode in _HIGH_DEPTH_MODES:
        cost += pixels * 4 * 3  # float32 values, the finite mask's where(), the resize input
    elif mode not in ("RGB", "L", "RGBA", "LA"):
        cost += pixels * 4
    return cost


def decode(
    data: bytes, *, max_pixels: int, allowed_formats: Collection[str], size: int = SIZE
) -> Image.Image:
    """Encoded bytes -> the loaded first frame, in its own mode, not yet resized.

    JPEGs come back at the smallest DCT scale (1/2, 1/4, 1/8) that is still at
    least ``size`` on both axes; other formats at full size. EXIF orientation
    is not applied yet. Raises :class:`ImageError` like :func:`preprocess`.
    """
    with warnings.catch_warnings():
        _quiet_pillow()
        img = _open_checked(data, max_pixels=max_pixels, allowed_formats=allowed_formats, size=size)
        _load(img, max_pixels)
        return img


def _open_checked(
    data: bytes, *, max_pixels: int, allowed_formats: Collection[str], size: int
) -> Image.Image:
    """The image, opened and checked but not decoded; JPEGs set to decode scaled down."""
    if size < 1:
        msg = f"size must be at least 1, got {size}"
        raise ValueError(msg)
    if not data:
        raise ImageError("empty", "the object has zero bytes")
    img = _open(data, _known_formats(allowed_formats))
    _check_pixels(img, max_pixels)
    try:
        # Draft mode makes libjpeg decode at 1/2, 1/4 or 1/8 scale, never
        # below the requested size; on other formats it does nothing.
        img.draft("RGB", (size, size))
    except Exception as exc:
        raise ImageError("decode", f"cannot decode {img.format} image: {exc}") from exc
    return img


def _load(img: Image.Image, max_pixels: int) -> None:
    """Decode the pixels; ImageError for a truncated, corrupt or oversized image."""
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageError("decompression_bomb", str(exc)) from exc
    except Exception as exc:
        # Decoders report truncated or corrupt data with assorted types
        # (OSError, SyntaxError, ValueError, struct.error, EOFError...).
        raise ImageError("decode", f"cannot decode {img.format} image: {exc}") from exc
    # Some formats (ICO, GIF frames) settle their size only when loaded.
    _check_pixels(img, max_pixels)


def _quiet_pillow() -> None:
    """Silence Pillow's remarks on the input, inside the caller's catch_warnings()."""
    # Pillow warns above its global MAX_IMAGE_PIXELS (about 89 Mpx), below our
    # own default limit (100 Mpx). Our explicit check is the one that decides.
    # Pillow's hard error (twice that limit) still applies and is reported as
    # decompression_bomb.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    # Corrupt metadata (EXIF, APNG chunks, MPO headers) is reported with a
    # UserWarning and then skipped. Silencing it makes the outcome the same
    # whatever the process's warning filters: under "error" (pytest, -W
    # error) it would otherwise reject an image whose pixels are fine.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")


def _known_formats(allowed_formats: Collection[str]) -> list[str]:
    Image.init()  # a no-op after the first call
    formats = [name.upper() for name in allowed_formats]
    unknown = sorted(set(formats) - Image.OPEN.keys())
    if unknown:
        msg = f"unknown image format(s) {', '.join(unknown)}; Pillow names them like JPEG, PNG"
        raise ValueError(msg)
    return formats


def _open(data: bytes, formats: list[str]) -> Image.Image:
    # Only the allowed formats' parsers read the header: less attack surface.
    try:
        return Image.open(BytesIO(data), formats=formats)
    except Image.DecompressionBombError as exc:
        raise ImageError(
            "decompression_bomb", f"image header claims too many pixels: {exc}"
        ) from exc
    except UnidentifiedImageError:
        pass
    except Exception as exc:
        raise ImageError("decode", f"cannot read image header: {exc}") from exc
    # Not one of the allowed formats: tell "a format we refuse" from "not an
    # image at all" with a second, unrestricted look at the header.
    recognised = _identify(data)
    if recognised is not None:
        allowed = ", ".join(sorted(formats)) or "none"
        raise ImageError("unsupported", f"{recognised} is not an allowed format ({allowed})")
    raise ImageError("decode", "cannot identify image file")


def _identify(data: bytes) -> str | None:
    try:
        with Image.open(BytesIO(data)) as img:
            return img.format or "unknown"
    except Image.DecompressionBombError:
        return "this image format"  # recognised, with enormous dimensions
    except Exception:
        return None


def _check_pixels(img: Image.Image, max_pixels: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            "decompression_bomb",
            f"{width}x{height} image has {width * height} pixels, more than the limit of "
            f"{max_pixels}",
        )
    if width < 1 or height < 1:
        raise ImageError("decode", f"image has no pixels ({width}x{height})")


def _orientation(img: Image.Image) -> Image.Transpose | None:
    try:
        value = img.getexif().get(_ORIENTATION_TAG)
        return _TRANSPOSE.get(value) if isinstance(value, int) else None
    except Exception:
        # Broken EXIF is common in the wild; the pixels are still good.
        return None


def _to_rgb(img: Image.Image, size: int) -> Image.Image:
    """Resize to ``size x size`` and end in RGB, doing per-pixel work at the small size."""
    mode = img.mode
    if mode in _HIGH_DEPTH_MODES:
        return _stretch_to_l(img, size).convert("RGB")
    if mode in _TRANSPARENCY_MODES and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode == "1":
        img = img.convert("L")  # Pillow resizes 1-bit images with NEAREST only
    elif mode in ("P", "PA", "RGBa"):
        img = img.convert("RGBA" if mode != "P" else "RGB")
    elif mode not in ("RGB", "L", "RGBA", "LA"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX
    # Resizing L and LA before widening to RGB saves two thirds of the work;
    # Pillow resizes RGBA and LA premultiplied, so edges do not darken.
    img = img.resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP)
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return img if img.mode == "RGB" else img.convert("RGB")


def _stretch_to_l(img: Image.Image, size: int) -> Image.Image:
    """16-bit, 32-bit and float images -> 8-bit grey, scaled from their own range.

    The darkest value maps to 0 and the brightest to 255 (a plain convert
    would clip everything above 255 to white); a constant image maps to 0.
    """
    values = np.asarray(img, dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        values = np.where(finite, values, values[finite].min() if finite.any() else 0.0)
    low, high = float(values.min()), float(values.max())
    small = np.asarray(
        Image.fromarray(values).resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP)
    )
    scale = 255.0 / (high - low) if high > low else 0.0
    levels = np.clip((small - low) * scale + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(levels)
