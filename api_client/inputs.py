"""The checks a job's inputs pass before anything is uploaded or queued, shared by every client and the worker.

`read_input(name, value, max_pixels)` turns an image or mask given as a PIL image, bytes or a path into a
`LocalImage` (the file's bytes, format and size, read from the header without decoding the pixels);
`check_submission(image, mask, prompt, options, limits)` runs every check a client can run before it sends the job:
readable PNG/JPEG/WEBP files, image and mask of one size, within the pixel limit, prompts and other fields within
their limits (s3:// inputs are the worker's to check). `open_header(name, data, max_pixels)` is the header check
itself, which the worker runs again on what it downloads. Every refusal is a `schema.JobError` with a §5 code.
"""
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from api_client import schema

__all__ = ["LocalImage", "read_input", "open_header", "check_submission"]

@dataclass(frozen=True)
class LocalImage:
    name: str         # "image" or "mask"
    source: str       # what the caller gave, for messages: a path, "bytes" or "PIL image"
    body: bytes       # the file as it is sent
    extension: str    # png, jpeg or webp
    width: int
    height: int

    @property
    def content_type(self) -> str:
        return schema.CONTENT_TYPES[self.extension]


def open_header(name: str, data: bytes, max_pixels: int) -> Image.Image:
    """The image, opened but not decoded: a PNG, JPEG or WEBP within `max_pixels`. Pillow's decompression-bomb
    warning and error (a header claiming a huge size) become limit_exceeded, anything unreadable invalid_input.
    Only the accepted formats' parsers ever see the bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=tuple(schema.INPUT_FORMATS))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise schema.JobError(schema.LIMIT_EXCEEDED, f"{name}: {error} The service's limit is {max_pixels} "
                                                         "pixels (INPAINT_MAX_PIXELS).") from None
        except UnidentifiedImageError:   # its message only names the in-memory file object
            raise schema.JobError(schema.INVALID_INPUT, f"{name}: not a readable "
                                                        f"{', '.join(schema.INPUT_FORMATS)} image") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise schema.JobError(schema.INVALID_INPUT, f"{name}: not a readable "
                                                        f"{', '.join(schema.INPUT_FORMATS)} image ({error})") from None
    schema.check_pixels(name, image.width, image.height, max_pixels)
    if getattr(image, "n_frames", 1) > 1:
        raise schema.JobError(schema.INVALID_INPUT, f"{name}: an animated image ({image.n_frames} frames); send "
                                                    "a single frame")
    if min(image.size) < schema.SIZE_MULTIPLE:
        raise schema.JobError(schema.INVALID_INPUT, f"{name}: {image.width}x{image.height} is smaller than "
                                                    f"{schema.SIZE_MULTIPLE}x{schema.SIZE_MULTIPLE} pixels")
    return image


def read_input(name: str, value, max_pixels: int) -> LocalImage:
    """The image or mask as the file to send (PIL images are encoded as PNG, files sent as they are)."""
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        source, body = "PIL image", buffer.getvalue()
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise schema.JobError(schema.INVALID_INPUT, f"{name}: no such file: {path}")
        source, body = str(path), path.read_bytes()
    elif isinstance(value, (bytes, bytearray, memoryview)):
        source, body = "bytes", bytes(value)
    else:
        raise schema.JobError(schema.INVALID_INPUT, f"{name}: expected a PIL image, bytes, a path or an s3:// URI, "
                                                    f"got {type(value).__name__}")
    where = name if source in ("PIL image", "bytes") else f"{name} {source}"
    with open_header(where, body, max_pixels) as image:
        return LocalImage(name, source, body, schema.INPUT_FORMATS[image.format], image.width, image.height)


def check_submission(image, mask, prompt: str, options: dict, limits: schema.Limits) -> dict:
    """Check a job before it is sent; returns {"image": ..., "mask": ...}, each a LocalImage or the s3:// URI as
    given. `options` are the job's other fields (DESIGN §3 names); type errors are left to the schema."""
    inputs = {name: value if _is_s3_uri(value) else read_input(name, value, limits.max_pixels)
              for name, value in (("image", image), ("mask", mask))}
    local_image, local_mask = inputs["image"], inputs["mask"]
    if isinstance(local_image, LocalImage) and isinstance(local_mask, LocalImage):
        if (local_mask.width, local_mask.height) != (local_image.width, local_image.height):
            raise schema.JobError(schema.INVALID_INPUT, f"mask: size {local_mask.width}x{local_mask.height} "
                                                        f"differs from the image's "
                                                        f"{local_image.width}x{local_image.height}")
    limits.check_fields({"prompt": prompt, **options})
    if isinstance(local_image, LocalImage):
        width, height = options.get("width"), options.get("height")
        limits.check_size(width if isinstance(width, int) else local_image.width,
                          height if isinstance(height, int) else local_image.height)
    return inputs


def _is_s3_uri(value) -> bool:
    return isinstance(value, str) and value.startswith("s3://")
