"""Image and mask preparation for the inpainting pipeline, and pasting results back.

The resizing, cropping and overlay steps follow the same PIL operations as diffusers' `VaeImageProcessor`, so that a
seed gives the same pixels as diffusers' `StableDiffusionInpaintPipeline` (DESIGN §2, seed parity).
"""
import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

RESAMPLE = Image.Resampling.LANCZOS


def default_size(image: Image.Image, height: int | None, width: int | None, multiple: int) -> tuple[int, int]:
    """(height, width): the given values, else the image's, rounded down to a multiple of the VAE's factor."""
    height = image.height if height is None else height
    width = image.width if width is None else width
    return height - height % multiple, width - width % multiple


def mask_crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """The mask's bounding box plus `pad`, grown to the processing aspect ratio: (x1, y1, x2, y2)."""
    m = np.array(mask.convert("L"))
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    if cols.size == 0:
        raise ValueError("mask: padding_mask_crop needs a mask with at least one white pixel")
    h, w = m.shape
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow_span(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), h)
    else:
        x1, x2 = _grow_span(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow_span(lo: int, hi: int, grow: int, limit: int) -> tuple[int, int]:
    # Centre the growth, then shift back inside [0, limit] (diffusers' get_crop_region arithmetic).
    lo, hi = lo - grow // 2, hi + grow - grow // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def _resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Fit inside (width, height) keeping the aspect ratio; fill the borders by stretching the edge rows/columns."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=RESAMPLE)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio and (fill := height // 2 - src_h // 2) > 0:
        out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                  box=(0, fill + src_h))
    elif ratio > src_ratio and (fill := width // 2 - src_w // 2) > 0:
        out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                  box=(fill + src_w, 0))
    return out


def _resize_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Cover (width, height) keeping the aspect ratio, centred, cropping the excess."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=RESAMPLE)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def _fit(image: Image.Image, height: int, width: int, crop: tuple[int, int, int, int] | None) -> Image.Image:
    if crop is not None:
        return _resize_and_fill(image.crop(crop), width, height)
    return image.resize((width, height), resample=RESAMPLE)


def image_to_tensor(image: Image.Image, height: int, width: int, crop=None) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1]."""
    array = np.asarray(_fit(image, height, width, crop), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def mask_to_tensor(mask: Image.Image, height: int, width: int, crop=None) -> torch.Tensor:
    """Mask -> (1, 1, H, W) float32 of 0 (keep) and 1 (repaint), binarised at 0.5."""
    array = np.asarray(_fit(mask, height, width, crop).convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((array >= 0.5).astype(np.float32))[None, None]


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB images, rounded as diffusers rounds."""
    array = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (array * 255).round().astype("uint8")]


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    mask = mask.convert("L")
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def paste_back(original: Image.Image, generated: Image.Image, mask: Image.Image,
               crop: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The original where the mask is black, the generated image where it is white, blended in between.

    Where the mask is exactly 0 the result is exactly the original's pixels. With `crop`, the generated image covers
    only that box of the original (diffusers' apply_overlay).
    """
    width, height = original.size
    keep = Image.new("RGBa", (width, height))
    keep.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    if crop is not None:
        # The original around the box, not black: a blurred mask can reach past the box's edge.
        x1, y1, x2, y2 = crop
        canvas = original.copy()
        canvas.paste(_resize_and_crop(generated, x2 - x1, y2 - y1), (x1, y1))
        generated = canvas
    elif generated.size != original.size:
        generated = generated.resize(original.size, resample=RESAMPLE)
    result = generated.convert("RGBA")
    result.alpha_composite(keep.convert("RGBA"))
    return result.convert("RGB")
