"""The size-vs-KLD chart of a report as a small, self-contained SVG (no plotting library): the page's plot,
for Hub visitors. White background and dark ink, so it reads the same on the Hub's light and dark themes."""

from __future__ import annotations

import math
from pathlib import Path
from xml.sax.saxutils import escape

from .report import Report, format_size

CHART_NAME = "size_vs_kld.svg"
WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 78, 24, 40, 56     # margins around the plotting area
LOG_SPREAD = 20.0      # a log y axis once the largest KLD is this many times the smallest


def chart_points(report: Report) -> list[tuple[str, int, float]]:
    """(variant, size in bytes, mean KLD) of every measured file, smallest file first."""
    points = [(f.variant, f.size_bytes, float(f.metrics["kld_mean"])) for f in report.files
              if f.metrics and f.metrics.get("kld_mean") is not None]
    return sorted(points, key=lambda p: (p[1], p[0]))


def has_chart(report: Report) -> bool:
    """A chart needs at least two measured files (one point shows no trade-off)."""
    return len(chart_points(report)) >= 2


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / max(1, target)
    power = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * power >= raw:
            return m * power
    return 10 * power


def _linear_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """A padded range and round tick values inside it."""
    if hi <= lo:
        lo, hi = lo - (abs(lo) or 1) * 0.1, hi + (abs(hi) or 1) * 0.1
    pad = (hi - lo) * 0.08
    lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo)
    first = math.ceil(lo / step) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return lo, hi, ticks


def _size_unit(max_bytes: float) -> tuple[str, float]:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if max_bytes >= scale:
            return unit, scale
    return "B", 1.0


def _num(v: float) -> str:
    return f"{v:.6g}"


def _kld_label(v: float) -> str:
    return f"{v:.0e}".replace("e-0", "e-") if v < 1e-3 else f"{v:.3g}"


def size_vs_kld_svg(report: Report) -> str | None:
    """The chart as SVG text, or None when fewer than two files were measured."""
    points = chart_points(report)
    if len(points) < 2:
        return None
    unit, scale = _size_unit(max(p[1] for p in points))
    xs = [p[1] / scale for p in points]
    ks = [p[2] for p in points]
    x_lo, x_hi, x_ticks = _linear_ticks(min(xs), max(xs))
    positive = min(ks) > 0
    log = positive and max(ks) / min(ks) >= LOG_SPREAD
    if log:
        y_lo, y_hi = math.floor(math.log10(min(ks))), math.ceil(math.log10(max(ks)))
        y_hi = max(y_hi, y_lo + 1)
        y_ticks = [10.0 ** e for e in range(y_lo, y_hi + 1)]
        y_of = lambda v: (math.log10(v) - y_lo) / (y_hi - y_lo)   # noqa: E731
    else:
        lo, y_hi, y_ticks = _linear_ticks(min(0.0, min(ks)) if positive else min(ks), max(ks))
        y_lo = 0.0 if positive else lo
        y_ticks = [t for t in y_ticks if t >= y_lo]
        y_of = lambda v: (v - y_lo) / (y_hi - y_lo)   # noqa: E731
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * pw

    def py(k: float) -> float:
        return TOP + ph - y_of(k) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="Helvetica, Arial, sans-serif" font-size="12">',
        f"<title>Size vs KL divergence: {escape(report.name)}</title>",
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="14" fill="#111">'
        f"{escape(report.name)}: file size vs KL divergence (lower is better)</text>",
    ]
    for t in x_ticks:
        x = _num(px(t))
        out.append(f'<line x1="{x}" y1="{TOP}" x2="{x}" y2="{TOP + ph}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{x}" y="{TOP + ph + 18}" text-anchor="middle" fill="#333">{t:g}</text>')
    for t in y_ticks:
        y = _num(py(t))
        out.append(f'<line x1="{LEFT}" y1="{y}" x2="{LEFT + pw}" y2="{y}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{LEFT - 8}" y="{y}" text-anchor="end" dominant-baseline="middle" fill="#333">'
                   f"{_kld_label(t)}</text>")
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{HEIGHT - 14}" text-anchor="middle" fill="#111">'
               f"File size ({unit})</text>")
    y_title = "Mean KLD (nats, log scale)" if log else "Mean KLD (nats)"
    out.append(f'<text transform="translate(18 {TOP + ph / 2}) rotate(-90)" text-anchor="middle" fill="#111">'
               f"{y_title}</text>")
    line = " ".join(f"{_num(px(x))},{_num(py(k))}" for x, k in zip(xs, ks))
    out.append(f'<polyline points="{line}" fill="none" stroke="#9bb7e0" stroke-width="1.5"/>')
    for (variant, size, kld), x, k in zip(points, xs, ks):
        cx, cy = _num(px(x)), _num(py(k))
        name = escape(variant)
        out.append(f'<circle class="point" data-variant="{name}" data-size="{size}" data-kld="{kld:.6g}" '
                   f'cx="{cx}" cy="{cy}" r="4.5" fill="#1f5fbf" stroke="#ffffff" stroke-width="1">'
                   f"<title>{name}: {format_size(size)}, KLD {kld:.5f}</title></circle>")
        right = px(x) > LEFT + pw * 0.6     # labels on the right half end at their point, inside the frame
        lx, anchor = (px(x) - 7, "end") if right else (px(x) + 7, "start")
        out.append(f'<text class="label" x="{_num(lx)}" y="{_num(py(k) - 7)}" text-anchor="{anchor}" '
                   f'fill="#111">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_chart(report: Report, folder: Path) -> Path | None:
    """folder/size_vs_kld.svg when the report has KLD for two files or more; else nothing is written."""
    svg = size_vs_kld_svg(report)
    if svg is None:
        return None
    path = folder / CHART_NAME
    path.write_text(svg, encoding="utf-8")
    return path
