"""A small server-side SVG chart: flags and blocks per day, stacked bars, no JavaScript.

The markup is built from numbers and escaped labels only, so it can be inserted into a page as-is.
Colours are presentation attributes (fill=...), which the console's CSP allows (it forbids inline styles).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

WIDTH, HEIGHT = 360, 90  # px, the plot area; labels sit below it
LABEL_H = 16  # px for the first/last day under the axis
BAR_MAX_W = 24  # px: a range of one or two days still looks like bars, not a wall
FLAG_FILL, BLOCK_FILL = "#e0a100", "#c0392b"


def day_label(day: Any) -> str:
    """Series days are ISO dates or unix seconds; either becomes YYYY-MM-DD."""
    if isinstance(day, int | float):
        import time

        return time.strftime("%Y-%m-%d", time.gmtime(day))
    return str(day)


def series_svg(series: Sequence[Sequence[Any]], title: str) -> str:
    """Stacked bars (blocks at the bottom, flags above) for [(day, flags, blocks), ...]."""
    points = [(day_label(d), int(f), int(b)) for d, f, b in series]
    total_h = HEIGHT + LABEL_H
    head = (
        f'<svg class="chart" role="img" aria-label="{escape(title)}" width="{WIDTH}" height="{total_h}" '
        f'viewBox="0 0 {WIDTH} {total_h}" xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
    )
    axis = f'<line x1="0" y1="{HEIGHT}" x2="{WIDTH}" y2="{HEIGHT}" stroke="#888" stroke-width="1"/>'
    if not points:
        empty = f'<text x="{WIDTH // 2}" y="{HEIGHT // 2}" text-anchor="middle" font-size="11">no data</text>'
        return head + axis + empty + "</svg>"
    peak = max(max(f + b for _, f, b in points), 1)
    slot = WIDTH / len(points)
    bar_w = min(max(slot * 0.8, 1.0), BAR_MAX_W)
    bars = []
    for i, (day, flags, blocks) in enumerate(points):
        x = i * slot + (slot - bar_w) / 2
        h_block = HEIGHT * blocks / peak
        h_flag = HEIGHT * flags / peak
        tip = escape(f"{day}: {flags} flagged, {blocks} blocked")
        bars.append(
            f'<g class="bar"><title>{tip}</title>'
            f'<rect x="{x:.1f}" y="{HEIGHT - h_block:.1f}" width="{bar_w:.1f}" height="{h_block:.1f}" '
            f'fill="{BLOCK_FILL}"/>'
            f'<rect x="{x:.1f}" y="{HEIGHT - h_block - h_flag:.1f}" width="{bar_w:.1f}" '
            f'height="{h_flag:.1f}" fill="{FLAG_FILL}"/></g>'
        )
    labels = (
        f'<text x="0" y="{total_h - 3}" font-size="10">{escape(points[0][0])}</text>'
        f'<text x="{WIDTH}" y="{total_h - 3}" font-size="10" text-anchor="end">{escape(points[-1][0])}</text>'
    )
    top = f'<text x="2" y="10" font-size="10">{peak}</text>'
    return head + axis + "".join(bars) + labels + top + "</svg>"
