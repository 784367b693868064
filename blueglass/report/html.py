"""Small HTML helpers for the static report: escaping, tables, notes, images and the page shell.

No JavaScript and no external resources: the CSS is inline, images are PNG files referenced by relative
paths, so ``reports/index.html`` opens from disk (or from an archived copy of ``reports/``) with no network.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d2330;
       background: #fff; margin: 0 auto; max-width: 1200px; padding: 16px 24px 48px; }
h1 { color: #0b3d91; margin: 8px 0 4px; font-size: 26px; }
h2 { color: #0b3d91; border-bottom: 2px solid #d6e2f5; padding-bottom: 4px; margin-top: 36px; }
h3 { margin: 22px 0 8px; font-size: 16px; }
nav { margin: 8px 0 16px; }
nav a { margin-right: 14px; color: #0b5cd5; text-decoration: none; }
code { background: #f2f4f8; padding: 1px 4px; border-radius: 3px; font-size: 12.5px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13px; }
th, td { border: 1px solid #d9dee7; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #eef3fb; font-weight: 600; }
td.l, th.l { text-align: left; }
td.learned { background: #dff3e3; }
td.notlearned { color: #8a93a3; }
.note { background: #f7f7f2; border-left: 4px solid #c9c28f; padding: 6px 10px; margin: 8px 0;
        color: #555; }
.note.missing { border-left-color: #b7c3d6; background: #f5f7fb; }
.note.error { border-left-color: #d9534f; background: #fdf2f2; color: #7a2220; }
figure { display: inline-block; margin: 6px 10px 10px 0; vertical-align: top; }
figure img { border: 1px solid #d9dee7; image-rendering: pixelated; }
figure.plot img { image-rendering: auto; max-width: 100%; }
figcaption { font-size: 12px; color: #444; max-width: 260px; }
.grid figure img { width: 240px; }
.muted { color: #8a93a3; }
"""


@dataclass
class Section:
    """One report section: an anchor id, a title, its HTML body and whether any of its inputs existed."""

    id: str
    title: str
    body: str
    present: bool


def fmt(v: Any, digits: int = 3) -> str:
    """A cell value: None/NaN → an em dash, bools → ✓/✗, floats with ``digits`` decimals."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "✓" if v else "✗"
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.{digits}f}"
    return escape(str(v))


def pct(v: Any) -> str:
    return "—" if v is None or isinstance(v, bool) else f"{float(v):.1%}"


def note(text: str, kind: str = "") -> str:
    """A boxed remark (``kind``: "" | "missing" | "error"); ``text`` is escaped."""
    return f'<p class="note {kind}">{escape(text)}</p>'


def not_run(what: str, inputs: str) -> str:
    """The placeholder of a section (or part) whose inputs do not exist yet."""
    return note(f"Not run yet: {what} (no {inputs}).", "missing")


def table(
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    left: int = 1,
    classes: Iterable[Sequence[str]] | None = None,
) -> str:
    """An HTML table; the first ``left`` columns are left-aligned labels; cells are formatted with
    :func:`fmt` unless they are :class:`Raw`; ``classes`` optionally gives a CSS class per cell."""
    out = ["<table><tr>"]
    out += [
        f'<th class="l">{escape(h)}</th>' if i < left else f"<th>{escape(h)}</th>"
        for i, h in enumerate(header)
    ]
    out.append("</tr>")
    cls_rows = iter(classes) if classes is not None else None
    for row in rows:
        cls = next(cls_rows) if cls_rows is not None else [""] * len(row)
        out.append("<tr>")
        for i, cell in enumerate(row):
            c = " ".join(x for x in ("l" if i < left else "", cls[i] if i < len(cls) else "") if x)
            text = cell.html if isinstance(cell, Raw) else fmt(cell)
            out.append(f'<td class="{c}">{text}</td>' if c else f"<td>{text}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


@dataclass(frozen=True)
class Raw:
    """Table cell content that is already HTML."""

    html: str


def img(src: str, alt: str, caption: str = "", cls: str = "") -> str:
    """A figure with an image at relative path ``src`` (from the report's folder) and a caption."""
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    c = f' class="{cls}"' if cls else ""
    return f'<figure{c}><img src="{escape(src, quote=True)}" alt="{escape(alt, quote=True)}">{cap}</figure>'


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole page: title, a table of contents and the sections in order."""
    nav = "".join(f'<a href="#{s.id}">{escape(s.title)}</a>' for s in sections)
    body = "\n".join(
        f'<section id="{s.id}">\n<h2>{escape(s.title)}</h2>\n{s.body}\n</section>' for s in sections
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f'<h1>{escape(title)}</h1>\n<p class="muted">{escape(subtitle)}</p>\n<nav>{nav}</nav>\n'
        f"{body}\n</body>\n</html>\n"
    )
