"""What every report shares: the one number format, plots as base64 PNG, and the templates."""

from __future__ import annotations

import base64
import io
from functools import cache
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from training.atomic import write_text_atomic

TEMPLATES = Path(__file__).parent / "templates"
MAX_POINTS = 1500  # plotted points per curve: a 10,000-step run renders as fast as a short one


def fmt(value) -> str:
    """The one number format of every report (4 significant digits)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def downsample(xs: list, ys: list) -> tuple[list, list]:
    """At most `MAX_POINTS` evenly spaced points of a curve, always keeping its last one."""
    if len(xs) <= MAX_POINTS:
        return xs, ys
    step = len(xs) / MAX_POINTS
    idx = sorted({int(i * step) for i in range(MAX_POINTS)} | {len(xs) - 1})
    return [xs[i] for i in idx], [ys[i] for i in idx]


def pyplot():
    """matplotlib's pyplot on the Agg backend (reports render without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> str:
    """`fig` as a base64 PNG (for an inline `data:` URL); closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})  # no version stamp: same bytes
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@cache
def templates() -> Environment:
    """The Jinja environment over `reports/templates/` (HTML autoescaped, trailing newlines kept)."""
    return Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]), keep_trailing_newline=True)


def write_rendered(path: Path, template: str, **context) -> Path:
    """Render `template` with `context` into `path`, written whole (a reader never sees half a report)."""
    write_text_atomic(path, templates().get_template(template).render(**context))
    return path
