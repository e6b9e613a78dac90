"""The run report: matplotlib figures, a self-contained `report.html`, `report.md` and `metrics.json`.

The report is built once as a `Document` of sections made of neutral blocks (paragraphs, lists, tables,
figures); the HTML and Markdown renderers walk the same document, so both files say the same thing. Every
number shown also lands in `metrics.json` (merged into training's, whose keys are kept).

Modules: `insights` (the images the report explains: confused-pair galleries with Grad-CAM overlays, top
losses, least certain predictions; and the model's parameters, FLOPs and CPU latency), `figures` (matplotlib
figures, saved at 2x for high-resolution screens), `reading` (the plain-language reading computed from the
numbers), `sections` (the document, one function per section; long tables folded in `Details`), `render` (HTML
and Markdown), `common` (history, steps.csv and eval_corruptions.json reading, number formats), `build`
(evaluate and write every file through `cifarlab.files`).
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
from cifarlab.report.sections import (
    Bullets,
    Details,
    Document,
    Figure,
    Paragraph,
    Section,
    Table,
    build_document,
)

__all__ = [
    "FIGURES",
    "PLOTS",
    "REPORT_HTML",
    "REPORT_MD",
    "Bullets",
    "Details",
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
