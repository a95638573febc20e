"""Unit tests for workers.preprocess: bytes in, 299x299x3 uint8 out, or one ImageError."""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Callable
from io import BytesIO

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageFile

from labelmill.errors import ImageError
from labelmill.settings import DEFAULT_FORMATS
from tests import images
from workers.preprocess import decode, preprocess

MAX_PIXELS = 100_000_000
Pixels = npt.NDArray[np.uint8]


def run(data: bytes, **overrides: object) -> Pixels:
    options: dict[str, object] = {"max_pixels": MAX_PIXELS, "allowed_formats": DEFAULT_FORMATS}
    options.update(overrides)
    return preprocess(data, **options)  # type: ignore[arg-type]


def error_kind(data: bytes, **overrides: object) -> str:
    with pytest.raises(ImageError) as caught:
        run(data, **overrides)
    return caught.value.kind


def region(out: Pixels, rows: slice, cols: slice) -> npt.NDArray[np.float64]:
    """Mean colour of a region, as floats."""
    mean: npt.NDArray[np.float64] = out[rows, cols].reshape(-1, 3).mean(axis=0)
    return mean


def assert_colour(
    actual: npt.NDArray[np.float64], expected: tuple[int, int, int], tol: float = 12.0
) -> None:
    assert np.abs(actual - np.array(expected)).max() <= tol, f"{actual} is not {expected}"


LEFT, RIGHT, ALL = slice(20, 130), slice(170, 280), slice(20, 280)
TOP, BOTTOM = slice(20, 130), slice(170, 280)


# Every input shape and mode ends as the same array.

FACTORIES: dict[str, Callable[[], bytes]] = {
    "jpeg": images.jpeg,
    "progressive_jpeg": images.progressive_jpeg,
    "gray_jpeg": images.gray_jpeg,
    "cmyk_jpeg": images.cmyk_jpeg,
    "exif_rotated_jpeg": images.exif_rotated_jpeg,
    "png": images.png,
    "png16": images.png16,
    "rgba_png": images.rgba_png,
    "la_png": images.la_png,
    "palette_transparent_png": images.palette_transparent_png,
    "one_by_one_png": images.one_by_one_png,
    "strip_png": images.strip_png,
    "bmp": images.bmp,
    "gif": images.gif,
    "animated_gif": images.animated_gif,
    "tiff": images.tiff,
    "multipage_tiff": images.multipage_tiff,
    "webp": images.webp,
    "animated_webp": images.animated_webp,
}


@pytest.mark.parametrize("name", FACTORIES)
def test_every_sample_gives_299_square_uint8_rgb(name: str) -> None:
    out = run(FACTORIES[name]())
    assert out.shape == (299, 299, 3)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("1", "PNG"),
        ("1", "BMP"),
        ("L", "PNG"),
        ("P", "PNG"),
        ("RGB", "PNG"),
        ("RGBA", "TIFF"),
        ("LA", "TIFF"),
        ("PA", "TIFF"),
        ("I;16", "TIFF"),
        ("I;16B", "TIFF"),
        ("I", "TIFF"),
        ("F", "TIFF"),
        ("CMYK", "TIFF"),
        ("YCbCr", "TIFF"),
        ("LAB", "TIFF"),
    ],
)
def test_every_pillow_mode_gives_299_square_uint8_rgb(mode: str, fmt: str) -> None:
    data = images.as_mode(mode, fmt)
    with decode(data, max_pixels=MAX_PIXELS, allowed_formats=DEFAULT_FORMATS) as img:
        assert img.mode == mode  # the case really exercises that mode
    out = run(data)
    assert out.shape == (299, 299, 3)
    assert out.dtype == np.uint8
    assert out.std() > 10  # the photo survived, not a flat fill


@pytest.mark.parametrize(("mode", "fmt", "tolerance"), [
    ("RGB", "PNG", 1.0),
    ("RGBA", "TIFF", 1.0),
    ("P", "PNG", 10.0),  # Pillow's fixed web palette
    ("CMYK", "TIFF", 1.0),
    ("YCbCr", "TIFF", 3.0),
    ("LAB", "TIFF", 3.0),
])  # fmt: skip
def test_colour_modes_keep_the_colours(mode: str, fmt: str, tolerance: float) -> None:
    reference = np.asarray(images.photo(120, 90).resize((299, 299), Image.Resampling.BILINEAR))
    out = run(images.as_mode(mode, fmt)).astype(np.float64)
    assert np.abs(out - reference).mean() <= tolerance


def test_size_is_configurable() -> None:
    assert run(images.jpeg(), size=64).shape == (64, 64, 3)


def test_aspect_is_squashed_not_cropped_or_padded() -> None:
    wide = images.halves(images.RED, images.BLUE).resize((400, 20))
    out = run(images.encode(wide, "PNG"))
    assert_colour(region(out, slice(0, 10), LEFT), images.RED)  # no letterbox bars
    assert_colour(region(out, slice(289, 299), RIGHT), images.BLUE)


# Orientation, transparency, bit depth, colour spaces, animation.


def test_exif_orientation_6_rotates_clockwise() -> None:
    out = run(images.exif_rotated_jpeg())
    assert_colour(region(out, TOP, RIGHT), images.RED)
    for rows, cols in ((TOP, LEFT), (BOTTOM, LEFT), (BOTTOM, RIGHT)):
        assert_colour(region(out, rows, cols), images.BLUE)


def test_broken_exif_is_ignored_not_fatal() -> None:
    garbage = b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xff" + bytes(range(40))
    data = images.encode(images.halves(images.RED, images.BLUE), "JPEG", exif=garbage)
    out = run(data)
    assert_colour(region(out, ALL, LEFT), images.RED)  # decoded, not rotated


@pytest.mark.parametrize(
    ("factory", "right"),
    [
        (images.rgba_png, images.RED),
        (images.la_png, (128, 128, 128)),
        (images.palette_transparent_png, images.GREEN),
    ],
)
def test_transparent_pixels_become_white(
    factory: Callable[[], bytes], right: tuple[int, int, int]
) -> None:
    out = run(factory())
    assert_colour(region(out, ALL, LEFT), images.WHITE, tol=1)
    assert_colour(region(out, ALL, RIGHT), right, tol=1)


def test_16_bit_is_scaled_to_8_bit_not_clipped() -> None:
    ramp = run(images.png16())[150, :, 0].astype(int)
    assert ramp[0] <= 2 and ramp[-1] >= 253
    assert 110 <= ramp[149] <= 146  # mid-grey in the middle, not white
    assert (ramp == 255).mean() < 0.05  # clipping would saturate nearly all of it
    assert (np.diff(ramp) >= 0).all()


@pytest.mark.parametrize("mode", ["I", "F"])
def test_wide_range_modes_span_0_to_255(mode: str) -> None:
    out = run(images.as_mode(mode, "TIFF"))
    assert out.min() <= 2 and out.max() >= 250
    assert (out >= 250).mean() < 0.01  # only the brightest pixels, not a clipped half


def test_cmyk_jpeg_colours() -> None:
    out = run(images.cmyk_jpeg())
    assert_colour(region(out, ALL, LEFT), images.RED, tol=15)
    assert_colour(region(out, ALL, RIGHT), images.BLUE, tol=15)


@pytest.mark.parametrize(
    "factory", [images.animated_gif, images.animated_webp, images.multipage_tiff]
)
def test_animations_and_multipage_use_the_first_frame(factory: Callable[[], bytes]) -> None:
    with Image.open(BytesIO(factory())) as img:
        assert getattr(img, "n_frames", 1) > 1  # the sample really has frames
    assert_colour(region(run(factory()), ALL, ALL), images.RED, tol=3)


# JPEG draft mode.


@pytest.mark.parametrize(
    ("size", "drafted"),
    [
        ((4032, 3024), (504, 378)),  # 1/8
        ((1920, 1080), (960, 540)),  # 1/2: 1/4 would be 270 high, below 299
        ((598, 598), (299, 299)),  # 1/2 lands exactly on the target
        ((597, 597), (597, 597)),  # under twice the target: full size
        ((500, 375), (500, 375)),
    ],
)
def test_jpeg_is_decoded_at_a_reduced_scale_never_below_the_target(
    size: tuple[int, int], drafted: tuple[int, int]
) -> None:
    data = images.big_jpeg(*size) if size[0] > 1000 else images.jpeg(*size)
    with decode(data, max_pixels=MAX_PIXELS, allowed_formats=DEFAULT_FORMATS) as img:
        assert img.size == drafted
        assert min(img.size) >= 299


def test_draft_mode_keeps_the_picture() -> None:
    data = images.big_jpeg()
    full = Image.open(BytesIO(data)).convert("RGB").resize((299, 299))
    difference = np.abs(run(data).astype(int) - np.asarray(full).astype(int))
    assert difference.mean() < 3


# Errors: one kind per way of failing.


@pytest.mark.parametrize(
    ("factory", "kind"),
    [
        (images.empty, "empty"),
        (images.truncated_jpeg, "decode"),
        (images.text_as_jpg, "decode"),
        (images.html_bytes, "decode"),
        (images.svg_bytes, "decode"),
        (images.zip_bytes, "decode"),
        (images.decompression_bomb_png, "decompression_bomb"),
        (images.huge_header_png, "decompression_bomb"),
        (images.huge_header_bmp, "decompression_bomb"),
        (images.ico_bytes, "unsupported"),
    ],
)
def test_error_kinds(factory: Callable[[], bytes], kind: str) -> None:
    assert error_kind(factory()) == kind


def test_truncated_png_is_a_decode_error() -> None:
    data = images.png(64, 48)
    assert error_kind(data[: len(data) - 200]) == "decode"


def test_pixel_limit_is_checked_from_the_header() -> None:
    data = images.jpeg(640, 480)
    assert run(data, max_pixels=640 * 480).shape == (299, 299, 3)
    assert error_kind(data, max_pixels=640 * 480 - 1) == "decompression_bomb"
    assert error_kind(images.huge_header_png(3000, 3000), max_pixels=1_000_000) == (
        "decompression_bomb"
    )


def test_our_limit_decides_not_pillows_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    # 640x480 is above this Pillow warning threshold, below its error threshold.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)
    data = images.jpeg(640, 480)
    filters = list(warnings.filters)
    assert run(data).shape == (299, 299, 3)  # warnings are errors under pytest
    assert error_kind(data, max_pixels=300_000) == "decompression_bomb"
    assert warnings.filters == filters


def test_no_global_pillow_setting_changes() -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for factory in (images.decompression_bomb_png, images.truncated_jpeg, images.jpeg):
        with contextlib.suppress(ImageError):
            run(factory())
    assert before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)


def test_allow_list_restricts_formats() -> None:
    assert error_kind(images.png(64, 48), allowed_formats=["JPEG"]) == "unsupported"
    assert error_kind(images.huge_header_png(), allowed_formats=["JPEG"]) == "unsupported"
    assert error_kind(images.text_as_jpg(), allowed_formats=["JPEG"]) == "decode"
    assert run(images.png(64, 48), allowed_formats=["jpeg", "png"]).shape == (299, 299, 3)
    assert run(images.ico_bytes(), allowed_formats=["ICO"]).shape == (299, 299, 3)


def test_unknown_format_name_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="JPG"):
        run(images.jpeg(), allowed_formats=["JPG"])


def test_error_message_says_what_is_wrong() -> None:
    with pytest.raises(ImageError) as caught:
        run(images.ico_bytes())
    assert "ICO" in caught.value.message and "JPEG" in caught.value.message
    with pytest.raises(ImageError) as caught:
        run(images.jpeg(640, 480), max_pixels=1000)
    assert "640x480" in caught.value.message


# Fuzzing: whatever the bytes, the answer is an array or an ImageError.


def mutate(data: bytes, rng: random.Random) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        position = rng.randrange(len(buffer))
        if choice < 0.5:
            for _ in range(rng.randint(1, 8)):
                buffer[rng.randrange(len(buffer))] = rng.randrange(256)
        elif choice < 0.7:
            del buffer[position:]
        elif choice < 0.85:
            buffer[position:position] = rng.randbytes(rng.randint(1, 64))
        else:
            del buffer[position : position + rng.randint(1, 64)]
        if not buffer:
            break
    return bytes(buffer)


@pytest.mark.parametrize(
    "factory",
    [
        images.exif_rotated_jpeg,
        images.progressive_jpeg,
        images.palette_transparent_png,
        images.animated_gif,
        images.tiff,
        images.webp,
    ],
)
def test_mutated_images_never_raise_anything_but_image_error(
    factory: Callable[[], bytes],
) -> None:
    seed = factory.__name__
    rng = random.Random(seed)
    original = factory()
    kinds = set()
    for _ in range(200):
        data = mutate(original, rng)
        try:
            out = run(data, max_pixels=4_000_000)
        except ImageError as exc:
            kinds.add(exc.kind)
        else:
            assert out.shape == (299, 299, 3) and out.dtype == np.uint8
    assert kinds <= {"empty", "decode", "decompression_bomb", "unsupported"}
