"""Pictures of a run folder's images: boxes drawn in each subject's colour, contact sheets.

Shared by both wings (generation draws the requested boxes; evaluation adds the detected ones)."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageOps

# tab10: distinct, print-friendly
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
MIN_SIDE = 256  # tiny images are upscaled to this for viewing


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def upscale(image: Image.Image, min_side: int = MIN_SIDE) -> Image.Image:
    factor = max(1, -(-min_side // min(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def draw_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str] | None = None,
               colours: Sequence[str] | None = None, dashed: bool = False) -> Image.Image:
    """A copy of ``image`` with normalized boxes drawn (``dashed`` for detections beside requests)."""
    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    w, h = image.size
    width = max(2, min(w, h) // 128)
    for i, box in enumerate(boxes):
        c = colours[i] if colours else colour(i)
        x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w - 1, box[3] * h - 1
        if dashed:
            step = 4 * width
            for x in range(int(x0), int(x1), 2 * step):
                draw.line([(x, y0), (min(x + step, x1), y0)], fill=c, width=width)
                draw.line([(x, y1), (min(x + step, x1), y1)], fill=c, width=width)
            for y in range(int(y0), int(y1), 2 * step):
                draw.line([(x0, y), (x0, min(y + step, y1))], fill=c, width=width)
                draw.line([(x1, y), (x1, min(y + step, y1))], fill=c, width=width)
        else:
            draw.rectangle([x0, y0, x1, y1], outline=c, width=width)
        if labels:  # white text on the box's colour: readable on any image
            left, top, right, bottom = draw.textbbox((x0 + width, y0 + width), labels[i])
            draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=c)
            draw.text((x0 + width, y0 + width), labels[i], fill="white")
    return image


def contact_sheet(images: Sequence[Image.Image], captions: Sequence[str], boxes: Sequence[Sequence[float]],
                  labels: Sequence[str], thumbnails: Sequence[Image.Image], title: str = "") -> Image.Image:
    """Subject thumbnails (framed in their colours) in a column on the left, then the images side by side
    with the requested boxes drawn; a caption under each image and a title line on top."""
    tiles = [draw_boxes(upscale(im), boxes, labels) for im in images]
    side = tiles[0].height if tiles else MIN_SIDE
    thumb = max(side // max(len(thumbnails), 1), 32)
    pad, text_h = 8, 14
    width = pad + thumb + pad + sum(t.width + pad for t in tiles)
    height = text_h + pad + side + text_h + pad
    sheet = Image.new("RGB", (width, max(height, text_h + pad + thumb * len(thumbnails) + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 2), title, fill="black")
    for i, t in enumerate(thumbnails):
        t = ImageOps.fit(t.convert("RGB"), (thumb - 6, thumb - 6))
        framed = ImageOps.expand(t, border=3, fill=colour(i))
        sheet.paste(framed, (pad, text_h + pad + i * thumb))
    x = pad + thumb + pad
    for tile, caption in zip(tiles, captions):
        sheet.paste(tile, (x, text_h + pad))
        draw.text((x, text_h + pad + side + 2), caption, fill="black")
        x += tile.width + pad
    return sheet
