"""Draw the example picture and its mask: `python examples/make_example.py [DIR]` (default: this folder).

image.png: a 512x512 scene drawn from code (sky gradient, sun, two hills, a house), so the repository ships no
third-party pictures. mask.png: white over the house (the part to repaint), black elsewhere.
"""
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 512
HOUSE_BOX = (200, 250, 330, 360)        # walls: left, top, right, bottom
ROOF_PEAK = (265, 185)
MASK_MARGIN = 12                        # the mask covers the house plus this many pixels, for a clean edge


def draw_scene() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    _sky(draw)
    draw.ellipse((380, 50, 450, 120), fill=(255, 214, 90))
    draw.ellipse((-200, 300, 420, 760), fill=(96, 160, 72))
    draw.ellipse((180, 320, 760, 780), fill=(70, 138, 58))
    _house(draw)
    # A light blur so the picture looks less like flat vector art to an image model.
    return image.filter(ImageFilter.GaussianBlur(1))


def _sky(draw: ImageDraw.ImageDraw) -> None:
    top, bottom = (58, 112, 196), (186, 220, 246)
    for y in range(SIZE):
        t = y / (SIZE - 1)
        draw.line((0, y, SIZE, y), fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))


def _house(draw: ImageDraw.ImageDraw) -> None:
    left, top, right, bottom = HOUSE_BOX
    draw.rectangle(HOUSE_BOX, fill=(214, 190, 150))
    draw.polygon([(left - 15, top), ROOF_PEAK, (right + 15, top)], fill=(150, 52, 40))
    draw.rectangle((250, 300, 280, bottom), fill=(105, 70, 40))
    for x in (215, 290):
        draw.rectangle((x, 275, x + 25, 300), fill=(170, 210, 235), outline=(80, 60, 40), width=2)


def draw_mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    left, top, right, bottom = HOUSE_BOX
    margin = MASK_MARGIN
    ImageDraw.Draw(mask).rectangle((left - 15 - margin, ROOF_PEAK[1] - margin, right + 15 + margin,
                                    bottom + margin), fill=255)
    return mask


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0]) if args else Path(__file__).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    draw_scene().save(folder / "image.png", optimize=True)
    draw_mask().save(folder / "mask.png", optimize=True)
    print(f"wrote {folder / 'image.png'} and {folder / 'mask.png'}")


if __name__ == "__main__":
    main()
