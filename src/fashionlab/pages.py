"""The shared kit for every HTML page fashionlab writes (exploration, run, study, explanation).

A page is a title and a list of sections; a section holds HTML fragments: tables, notes and
figures. Figures are matplotlib `Figure` objects rendered by Agg when saved (no display, no
global pyplot state), embedded as base64 PNG so one file opens offline and prints, and also
written as PNG files beside the page.

    figs = FigureWriter(out_dir)                       # PNGs go to out_dir/<name>.png
    sec = Section("Curves", [figs.add("curves", fig, "Loss and accuracy per epoch")])
    write_page(out_dir / "report.html", "Run cnn", [sec])
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
# Figures are matplotlib.figure.Figure objects saved with savefig: no pyplot and no backend switch,
# so a notebook's own inline plots keep working after fashionlab draws.
from matplotlib.figure import Figure

from . import atomic

DPI = 110


class InlineFigure(Figure):
    """A Figure that shows itself as a PNG when it ends a notebook cell, even where pyplot was never
    imported (Jupyter's inline backend only registers matplotlib's own display hook with pyplot)."""

    def _repr_png_(self) -> bytes:
        return figure_png(self)


def new_figure(width: float = 6.4, height: float = 4.0) -> InlineFigure:
    """A figure independent of pyplot's global state (safe in threads); savefig renders it with Agg."""
    return InlineFigure(figsize=(width, height), dpi=DPI, layout="constrained")


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def grid_shape(n: int, cols: int) -> tuple[int, int]:
    """(rows, cols) for n panels at most cols wide."""
    cols = min(cols, n)
    return int(np.ceil(n / cols)), cols


def hide_axes(ax) -> None:
    """An image panel: no ticks."""
    ax.set_xticks([])
    ax.set_yticks([])


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def img_tag(png: bytes, alt: str, name: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}" data-figure="{esc(name)}">'


def figure_html(fig: Figure, caption: str, name: str = "") -> str:
    return _figure_block(figure_png(fig), caption, name)


def _figure_block(png: bytes, caption: str, name: str) -> str:
    return f'<figure>{img_tag(png, caption, name)}<figcaption>{esc(caption)}</figcaption></figure>'


class FigureWriter:
    """Writes each figure as `<out_dir>/<name>.png` and returns its embedded HTML block.

    `names` records every figure added, so callers (and tests) know what a page must show.
    """

    def __init__(self, out_dir: str | Path | None, prefix: str = ""):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.prefix = prefix
        self.names: list[str] = []

    def add(self, name: str, fig: Figure, caption: str) -> str:
        name = self.prefix + name
        png = figure_png(fig)
        if self.out_dir is not None:
            write_bytes(self.out_dir / f"{name}.png", png)
        self.names.append(name)
        return _figure_block(png, caption, name)


@dataclass
class Section:
    title: str
    parts: list[str] = field(default_factory=list)  # HTML fragments, in order
    anchor: str = ""

    def add(self, *fragments: str) -> "Section":
        self.parts.extend(fragments)
        return self


def note(text: str, kind: str = "") -> str:
    return f'<p class="note {esc(kind)}">{esc(text)}</p>'


def paragraph(text: str) -> str:
    return f"<p>{esc(text)}</p>"


class Raw(str):
    """A table cell that is already HTML (a link, say) and must not be escaped."""


def _cell(value: Any) -> str:
    return value if isinstance(value, Raw) else esc(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], highlight: Iterable[int] = (),
          caption: str = "", numeric_from: int = 1) -> str:
    """An HTML table; cells are escaped text. Rows whose index is in `highlight` are marked.

    Columns from `numeric_from` on are right-aligned (numbers read best aligned on the digit).
    """
    marked = set(highlight)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="{"num" if j >= numeric_from else ""}">{_cell(c)}</td>' for j, c in enumerate(row))
        body.append(f'<tr class="{"hl" if i in marked else ""}">{cells}</tr>')
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<table>{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def key_values(items: Iterable[tuple[str, Any]]) -> str:
    """A two-column table of settings."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in items)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;
padding:1.2em 2em;color:#1a1a1a;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:1.8em}.subtitle{color:#555;margin-top:0}
nav{font-size:.9em;color:#555}nav a{margin-right:.8em;color:#2a5db0;text-decoration:none}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
thead th{background:#f3f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.hl td{background:#fff3c4;font-weight:600}caption{text-align:left;color:#555;padding-bottom:.3em}
table.kv th{background:#f8f8f8;font-weight:500}
figure{margin:.8em 0 1.4em;break-inside:avoid}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}.note{background:#f4f7fb;border-left:3px solid #2a5db0;padding:.4em .8em}
.note.warn{background:#fff6e5;border-color:#d98c00}
@media print{body{max-width:none;padding:0}nav{display:none}h2{break-after:avoid}table,figure{break-inside:avoid}}
"""


def _anchor(title: str, i: int) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
    return f"s{i}-{slug}"


def html_page(title: str, sections: Sequence[Section], subtitle: str = "", css: str = "") -> str:
    """One self-contained HTML document: inline CSS (the shared style, then `css`), embedded images, no
    scripts, no fetches."""
    anchors = [s.anchor or _anchor(s.title, i) for i, s in enumerate(sections)]
    nav = "".join(f'<a href="#{a}">{esc(s.title)}</a>' for a, s in zip(anchors, sections))
    body = "".join(f'<section id="{a}"><h2>{esc(s.title)}</h2>{"".join(s.parts)}</section>'
                   for a, s in zip(anchors, sections))
    sub = f'<p class="subtitle">{esc(subtitle)}</p>' if subtitle else ""
    # A data: favicon stops the browser from requesting /favicon.ico when the page is served.
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<title>{esc(title)}</title><style>{_CSS}{css}</style></head>"
            f"<body><h1>{esc(title)}</h1>{sub}<nav>{nav}</nav>{body}</body></html>\n")


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temporary name, then rename: a reader never sees half a file."""
    return atomic.write_bytes(path, data)


def write_page(path: str | Path, title: str, sections: Sequence[Section], subtitle: str = "", css: str = "") -> Path:
    return write_bytes(path, html_page(title, sections, subtitle, css).encode("utf-8"))


def fmt_mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    """'88.12 ± 0.31' (sample standard deviation over runs; a single run shows no spread)."""
    import numpy as np
    v = np.asarray(values, dtype=float) * scale
    if len(v) == 0:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}{unit} (1 run)"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}{unit}"
