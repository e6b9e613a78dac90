"""The run report: matplotlib figures, a self-contained `report.html`, `report.md` and `metrics.json`.

The report is built once as a `Document` of sections made of neutral blocks (paragraphs, lists, tables,
figures); the HTML and Markdown renderers walk the same document, so both files say the same thing. Every
number shown also lands in `metrics.json` (merged into training's, whose keys are kept).

Modules: `figures` (matplotlib figures), `reading` (the plain-language reading computed from the numbers),
`sections` (the document, one function per section), `render` (HTML and Markdown), `build` (evaluate and
write every file through `cifarlab.files`).
"""

from __future__ import annotations

from cifarlab.report.build import (
    PLOTS,
    REPORT_HTML,
    REPORT_MD,
    ReportWriteError,
    build_report,
    report_paths,
    write_report,
)
from cifarlab.report.figures import FIGURES, make_figures
from cifarlab.report.reading import plain_reading
from cifarlab.report.render import md_escape, render_html, render_markdown
from cifarlab.report.sections import Bullets, Document, Figure, Paragraph, Section, Table, build_document

__all__ = [
    "FIGURES",
    "PLOTS",
    "REPORT_HTML",
    "REPORT_MD",
    "Bullets",
    "Document",
    "Figure",
    "Paragraph",
    "ReportWriteError",
    "Section",
    "Table",
    "build_document",
    "build_report",
    "make_figures",
    "md_escape",
    "plain_reading",
    "render_html",
    "render_markdown",
    "report_paths",
    "write_report",
]
