"""Rendering a report `Document`: one self-contained HTML file and the same content as Markdown.

Every text is escaped for its format: HTML with `html.escape`; Markdown with a backslash before each
character Markdown gives a meaning to, and control characters (newlines included) shown as visible escapes,
so a class or folder name like `a|b*<script>` can neither break a table nor inject markup.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence

from cifarlab.report.common import png_size
from cifarlab.report.sections import Block, Bullets, Details, Document, Figure, Paragraph, Table

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1d1d1f;max-width:1180px;
margin:0 auto;padding:24px 28px 64px;line-height:1.45;background:#fff}
h1{font-size:1.6em;margin:.2em 0 .1em}
h2{font-size:1.25em;margin-top:2em;padding-bottom:.25em;border-bottom:2px solid #e5e5ea}
nav{font-size:.9em;margin:.6em 0 1.2em}nav a{margin-right:1em;color:#0b62c4;text-decoration:none}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em}
th,td{padding:4px 10px;border-bottom:1px solid #e5e5ea;text-align:left;vertical-align:top}
th{background:#f5f5f7;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.drop td{background:#f3f3f3}tr.best td:first-child{font-weight:700}tr.stop td{background:#fdecea}
tr.total td{font-weight:600;background:#fafafa}
figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555;margin-top:.3em}ul{padding-left:1.3em}li{margin:.3em 0}
.meta{color:#666;font-size:.9em}
details{margin:.8em 0}summary{cursor:pointer;color:#0b62c4;font-size:.92em}details[open] summary{margin-bottom:.3em}
.warning{border:2px solid #d62728;background:#fdecea;color:#5f1111;padding:10px 14px;margin:1em 0;border-radius:4px}
"""


def _is_num(s: str) -> bool:
    t = s.replace(",", "").replace("%", "").replace(" s", "").replace("+", "").replace("−", "-").strip()
    try:
        float(t)
        return True
    except ValueError:
        return False


def numeric_columns(rows: Sequence[Sequence[str]]) -> set[int]:
    """Columns (after the first, which names the row) whose cells are all numbers: right-aligned."""
    if not rows:
        return set()
    return {j for j in range(1, len(rows[0])) if all(j < len(r) and (_is_num(r[j]) or r[j] == "–") for r in rows)}


# -- HTML ------------------------------------------------------------------------------------------------------


def _html_table(t: Table) -> list[str]:
    e = html.escape
    numeric = numeric_columns(t.rows)
    out = ["<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.header) + "</tr></thead><tbody>"]
    for i, r in enumerate(t.rows):
        cls = t.row_classes[i] if t.row_classes else ""
        cells = "".join(f'<td class="n">{e(c)}</td>' if j in numeric else f"<td>{e(c)}</td>" for j, c in enumerate(r))
        out.append(f'<tr class="{e(cls)}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    return out


def _img_size(data: bytes, scale: int) -> str:
    """width/height attributes at 1x of a PNG saved at `scale`x, so it shows at its layout size, sharp."""
    try:
        w, h = png_size(data)
    except ValueError:
        return ""
    return f' width="{round(w / scale)}" height="{round(h / scale)}"'


def _html_block(b: Block, images: Mapping[str, bytes], scale: int) -> list[str]:
    e = html.escape
    if isinstance(b, Paragraph):
        return [f"<p>{e(b.text)}</p>"]
    if isinstance(b, Bullets):
        return ["<ul>" + "".join(f"<li>{e(t)}</li>" for t in b.items) + "</ul>"]
    if isinstance(b, Table):
        return _html_table(b)
    if isinstance(b, Figure) and b.key in images:
        data = base64.b64encode(images[b.key]).decode("ascii")
        return [
            f'<figure><img src="data:image/png;base64,{data}"{_img_size(images[b.key], scale)} alt="{e(b.caption)}">'
            f"<figcaption>{e(b.caption)}</figcaption></figure>"
        ]
    if isinstance(b, Details):
        inner = [line for c in b.blocks for line in _html_block(c, images, scale)]
        return [f"<details><summary>{e(b.summary)}</summary>", *inner, "</details>"]
    return []


def render_html(doc: Document, images: Mapping[str, bytes], scale: int = 2) -> str:
    """One self-contained HTML file: inline CSS, images as base64 data URIs, no scripts, no external links.
    Figures are PNGs saved at `scale` x their layout size; they are shown at 1x (sharp on HiDPI screens)."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(doc.title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{e(doc.title)}</h1>",
        *(f'<p class="warning" role="alert"><strong>Warning:</strong> {e(w)}</p>' for w in doc.warnings),
        f'<p class="meta">{e(doc.meta)}</p>',
        "<nav>" + "".join(f'<a href="#{e(s.anchor)}">{e(s.heading)}</a>' for s in doc.sections) + "</nav>",
    ]
    for s in doc.sections:
        out.append(f'<section id="{e(s.anchor)}"><h2>{e(s.heading)}</h2>')
        for b in s.blocks:
            out += _html_block(b, images, scale)
        out.append("</section>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


# -- Markdown ----------------------------------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~$])")  # $: GitHub renders $...$ as math
_MD_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def md_escape(text: str) -> str:
    """`text` as literal Markdown text, for a table cell or a line: Markdown's special characters
    (\\ ` * _ [ ] < > | & ~) get a backslash, control characters (newlines too) become visible escapes."""

    def control(m: re.Match[str]) -> str:
        return f"\\\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\\\u{ord(m.group()):04x}"

    return _MD_CONTROL.sub(control, _MD_SPECIAL.sub(r"\\\1", text))


def _md_table(t: Table) -> list[str]:
    numeric = numeric_columns(t.rows)
    out = ["| " + " | ".join(md_escape(h) or " " for h in t.header) + " |"]
    out.append("|" + "|".join(" ---: " if i in numeric else " --- " for i in range(len(t.header))) + "|")
    out += ["| " + " | ".join(md_escape(c) for c in r) + " |" for r in t.rows]
    return [*out, ""]


def _md_block(b: Block, figures: Mapping[str, str]) -> list[str]:
    if isinstance(b, Paragraph):
        return [md_escape(b.text), ""]
    if isinstance(b, Bullets):
        return [f"- {md_escape(t)}" for t in b.items] + [""]
    if isinstance(b, Table):
        return _md_table(b)
    if isinstance(b, Figure) and b.key in figures:
        caption = md_escape(b.caption)
        return [f"![{caption}]({figures[b.key]})", "", f"_{caption}_", ""]
    if isinstance(b, Details):  # nothing folds in plain Markdown: the blocks follow a small heading
        return [f"#### {md_escape(b.summary)}", "", *(line for c in b.blocks for line in _md_block(c, figures))]
    return []


def render_markdown(doc: Document, figures: Mapping[str, str]) -> str:
    """The same content as Markdown, figures linked relative to the run folder (plots/*.png)."""
    out = [f"# {md_escape(doc.title)}", ""]
    for w in doc.warnings:
        out += [f"> **Warning:** {md_escape(w)}", ""]
    out += [f"_{md_escape(doc.meta)}_", ""]
    for s in doc.sections:
        out += [f"## {md_escape(s.heading)}", ""]
        for b in s.blocks:
            out += _md_block(b, figures)
    return "\n".join(out)
