"""Local input images (PIL images, bytes or paths) as the file bytes a job reads; shared by the Redis and the HTTP
client."""
import io
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from api_client import schema

__all__ = ["encoded_image"]


def encoded_image(name: str, value) -> tuple[bytes, str]:
    """(file bytes, extension) of an input given as a PIL image, bytes or a path; PIL images are sent as PNG,
    files as they are (PNG, JPEG or WEBP)."""
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue(), "png"
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{name}: no such file: {path}")
        value = path.read_bytes()
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{name}: expected a PIL image, bytes, a path or an s3:// URI, got {type(value).__name__}")
    body = bytes(value)
    try:
        with Image.open(io.BytesIO(body)) as image:
            image_format = image.format
    except UnidentifiedImageError:
        raise ValueError(f"{name}: the bytes are not an image PIL can read") from None
    if image_format not in schema.INPUT_FORMATS:
        raise ValueError(f"{name}: {image_format} images are not accepted; send {', '.join(schema.INPUT_FORMATS)} "
                         "(or a PIL image, sent as PNG)")
    return body, schema.INPUT_FORMATS[image_format]
