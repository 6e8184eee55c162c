"""Decoding untrusted images: every check runs on the header before any pixel is decoded."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image

FORMAT_BY_MIME = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 8 * 1024 * 1024
    """Largest encoded image accepted."""
    max_pixels: int = 16_000_000
    """Largest decoded width x height accepted; larger headers are refused before decoding, which is
    what stops decompression bombs (a few KB that decode to gigabytes)."""


class InvalidImage(ValueError):
    """The image cannot be accepted; the message says why, for the client."""


def decode_data_url(url: str) -> tuple[bytes, str]:
    """The bytes and MIME type of a base64 data: URL (data:image/png;base64,...), or InvalidImage naming
    what is wrong with it."""
    header, comma, data = url.partition(",")
    if not (url.startswith("data:") and comma and header.endswith(";base64")):
        raise InvalidImage("must be a data: URL with base64 content (data:image/png;base64,...)")
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidImage(f"the data is not valid base64 ({error})") from error
    return decoded, header[len("data:"):-len(";base64")]


def decode_image(data: bytes, mime_type: str, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Returns the image as RGB, or raises InvalidImage naming the problem."""
    if not data:
        raise InvalidImage("is empty")
    if len(data) > limits.max_bytes:
        raise InvalidImage(f"is {len(data)} bytes, above the limit of {limits.max_bytes}")
    expected_format = FORMAT_BY_MIME.get(mime_type)
    if expected_format is None:
        raise InvalidImage(f"mime_type {mime_type!r} is not one of {sorted(FORMAT_BY_MIME)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[expected_format])
            width, height = image.size
            if width <= 0 or height <= 0:
                raise InvalidImage(f"has no pixels ({width}x{height})")
            if width * height > limits.max_pixels:
                raise InvalidImage(
                    f"is {width}x{height} = {width * height} pixels, above the limit of {limits.max_pixels}"
                )
            image.load()
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidImage(f"refused as a decompression bomb: {error}") from error
    except Exception as error:  # PIL raises many types for corrupt data; all mean "not a valid image"
        raise InvalidImage(f"is not a decodable {expected_format} image ({type(error).__name__})") from error
    return image.convert("RGB")
