"""data: URLs, as the HTTP API and evaluation sets carry images: decoded, or refused naming why."""

from __future__ import annotations

import base64

import pytest

from modalign.core.images import InvalidImage, decode_data_url


def test_a_base64_data_url_gives_its_bytes_and_mime_type() -> None:
    assert decode_data_url("data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()) == (b"\x89PNG", "image/png")


@pytest.mark.parametrize(("url", "why"), [
    ("image/png;base64,AAAA", "must be a data: URL"),
    ("data:image/png,AAAA", "must be a data: URL with base64 content"),
    ("data:image/png;base64", "must be a data: URL"),
    ("data:image/png;base64,not base64!", "not valid base64"),
])
def test_anything_else_is_refused_naming_why(url: str, why: str) -> None:
    with pytest.raises(InvalidImage, match=why):
        decode_data_url(url)
