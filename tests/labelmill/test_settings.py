"""Settings: the image formats a worker accepts."""

from __future__ import annotations

import pytest
from PIL import Image
from pydantic import ValidationError

from labelmill.settings import DEFAULT_FORMATS, Settings


def test_the_default_formats_are_pillow_format_names() -> None:
    Image.init()
    assert set(DEFAULT_FORMATS) <= set(Image.OPEN)


def test_formats_are_read_from_a_comma_list_and_checked_against_pillow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LABELMILL_ALLOWED_FORMATS", "jpeg, png,JPEG2000")
    assert Settings().allowed_formats == ["JPEG", "PNG", "JPEG2000"]
    monkeypatch.setenv("LABELMILL_ALLOWED_FORMATS", "jpeg,jpg")
    with pytest.raises(ValidationError, match="unknown image formats"):
        Settings()
