"""Small self-contained SVG scatter plots for the leaderboard page (no plotting dependency)."""

from __future__ import annotations

import html
import math
from typing import Sequence

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12)))
    if (hi - lo) / step < 3:
        step /= 2
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 2)]


def scatter_svg(
    points: Sequence[tuple[str, float, float]],
    x_label: str,
    y_label: str,
    title: str,
    log_x: bool = False,
    width: int = 460,
    height: int = 320,
) -> str:
    """An SVG scatter plot of labelled (name, x, y) points; lower y is better, so the axis says so."""
    points = [(n, x, y) for n, x, y in points if x is not None and y is not None and (x > 0 or not log_x)]
    if not points:
        return f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='40'><text x='8' y='24'>{html.escape(title)}: no data</text></svg>"
    left, right, top, bottom = 56, 16, 30, 44
    xs = [math.log10(x) if log_x else x for _, x, _ in points]
    ys = [y for _, _, y in points]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(0.0, min(ys)), max(ys)
    pad_x = (x_hi - x_lo) * 0.12 or 0.5
    x_lo, x_hi = x_lo - pad_x, x_hi + pad_x
    y_hi = y_hi * 1.1 if y_hi > 0 else 1.0

    def px(v: float) -> float:
        return left + (v - x_lo) / (x_hi - x_lo) * (width - left - right)

    def py(v: float) -> float:
        return height - bottom - (v - y_lo) / (y_hi - y_lo) * (height - top - bottom)

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' font-size='11'>",
        f"<text x='{width / 2}' y='16' text-anchor='middle' font-size='13'>{html.escape(title)}</text>",
        f"<line x1='{left}' y1='{height - bottom}' x2='{width - right}' y2='{height - bottom}' stroke='#444'/>",
        f"<line x1='{left}' y1='{top}' x2='{left}' y2='{height - bottom}' stroke='#444'/>",
        f"<text x='{(left + width - right) / 2}' y='{height - 8}' text-anchor='middle'>{html.escape(x_label)}</text>",
        f"<text x='14' y='{(top + height - bottom) / 2}' text-anchor='middle' transform='rotate(-90 14 {(top + height - bottom) / 2})'>{html.escape(y_label)}</text>",
    ]
    x_ticks = _ticks(10**x_lo, 10**x_hi, True) if log_x else _ticks(x_lo, x_hi, False)
    for t in x_ticks:
        v = math.log10(t) if log_x else t
        if x_lo <= v <= x_hi:
            parts.append(f"<line x1='{px(v):.1f}' y1='{height - bottom}' x2='{px(v):.1f}' y2='{height - bottom + 4}' stroke='#444'/>")
            parts.append(f"<text x='{px(v):.1f}' y='{height - bottom + 16}' text-anchor='middle'>{t:g}</text>")
    for t in _ticks(y_lo, y_hi, False):
        if y_lo <= t <= y_hi:
            parts.append(f"<line x1='{left - 4}' y1='{py(t):.1f}' x2='{width - right}' y2='{py(t):.1f}' stroke='#ddd'/>")
            parts.append(f"<text x='{left - 6}' y='{py(t) + 4:.1f}' text-anchor='end'>{t:g}</text>")
    for i, ((name, _, y), x) in enumerate(zip(points, xs)):
        color = PALETTE[i % len(PALETTE)]
        parts.append(f"<circle cx='{px(x):.1f}' cy='{py(y):.1f}' r='5' fill='{color}'><title>{html.escape(name)}</title></circle>")
        parts.append(f"<text x='{px(x) + 7:.1f}' y='{py(y) - 6:.1f}' fill='{color}'>{html.escape(name)}</text>")
    parts.append("</svg>")
    return "".join(parts)
