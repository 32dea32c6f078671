"""Token-level GVM values as a coloured page and picture (the paper's Figure 4 case study).

Each response token is drawn on a background whose colour encodes its value: red below zero,
green above, white at zero, saturated at ``value_range`` (the preference labels are +-1, so +-1 by
default). Prompt tokens are shown in grey for context.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass
class TokenValueRow:
    """One response to show: its title, the prompt text, response tokens and their values."""

    title: str
    prompt_text: str
    token_texts: list[str]
    values: list[float]


def value_colour(value: float, value_range: float = 1.0) -> tuple[int, int, int]:
    """RGB on a red-white-green scale; |value| >= value_range is fully saturated."""
    strength = max(-1.0, min(1.0, value / value_range))
    fade = int(round(255 * (1 - abs(strength))))
    return (255, fade, fade) if strength < 0 else (fade, 255, fade)


def render_html(rows: Sequence[TokenValueRow], title: str, value_range: float = 1.0) -> str:
    """A self-contained HTML page; hovering a token shows its value."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".prompt{color:#777;white-space:pre-wrap;margin-bottom:.5em}"
        ".tok{white-space:pre-wrap;border-radius:2px;padding:1px 0}"
        ".row{border:1px solid #ddd;padding:1em;margin:1em 0}"
        ".legend span{padding:2px 6px;margin-right:4px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<div class='legend'>value: " + "".join(
            f"<span style='background:rgb{value_colour(v * value_range, value_range)}'>{v * value_range:+.1f}</span>"
            for v in (-1.0, -0.5, 0.0, 0.5, 1.0)) + "</div>",
    ]
    for row in rows:
        mean = sum(row.values) / max(len(row.values), 1)
        parts.append(f"<div class='row'><h3>{html.escape(row.title)} &mdash; mean value {mean:+.4f}, "
                     f"last token {row.values[-1]:+.4f}</h3>")
        parts.append(f"<div class='prompt'>{html.escape(row.prompt_text)}</div><div>")
        for text, value in zip(row.token_texts, row.values):
            parts.append(f"<span class='tok' title='{value:+.4f}' "
                         f"style='background:rgb{value_colour(value, value_range)}'>{html.escape(text)}</span>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "".join(parts)


def render_png(rows: Sequence[TokenValueRow], path: str | Path, title: str, value_range: float = 1.0,
               width: int = 1000, font_size: int = 16) -> Path:
    """The same view as a PNG: tokens wrapped into lines, one block per response."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    line_height = font_size + 8
    margin = 16
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def layout(tokens: Sequence[tuple[str, tuple[int, int, int] | None]]):
        """Place tokens left to right, wrapping at the margin; newlines start a new line."""
        placed, x, y = [], margin, 0
        for text, colour in tokens:
            for index, piece in enumerate(text.split("\n")):
                if index > 0:
                    x, y = margin, y + line_height
                if not piece:
                    continue
                piece_width = measure.textlength(piece, font=font)
                if x + piece_width > width - margin and x > margin:
                    x, y = margin, y + line_height
                placed.append((x, y, piece, colour, piece_width))
                x += piece_width
        return placed, y + line_height

    blocks, height = [], margin + line_height * 2
    for row in rows:
        header = f"{row.title}: mean {sum(row.values) / max(len(row.values), 1):+.3f}, last {row.values[-1]:+.3f}"
        prompt_placed, prompt_height = layout([(row.prompt_text, None)])
        token_placed, token_height = layout(list(zip(row.token_texts, (value_colour(v, value_range)
                                                                       for v in row.values))))
        blocks.append((header, prompt_placed, prompt_height, token_placed, token_height))
        height += line_height + prompt_height + token_height + margin

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, margin), title, fill="black", font=font)
    y0 = margin + line_height * 2
    for header, prompt_placed, prompt_height, token_placed, token_height in blocks:
        draw.text((margin, y0), header, fill="black", font=font)
        y0 += line_height
        for x, y, piece, _, _ in prompt_placed:
            draw.text((x, y0 + y), piece, fill=(120, 120, 120), font=font)
        y0 += prompt_height
        for x, y, piece, colour, piece_width in token_placed:
            draw.rectangle([x, y0 + y, x + piece_width, y0 + y + line_height - 2], fill=colour)
            draw.text((x, y0 + y + 2), piece, fill="black", font=font)
        y0 += token_height + margin
    path = Path(path)
    image.save(path)
    return path
