"""The report: built once as plain data, written as JSON, rendered as Markdown or a self-contained HTML page.

``data`` (build, schema, read/write) → ``views`` (numbers, the views every rendering shares) → ``text`` (the CLI's
summary, Markdown, terminal) → ``heatmap`` (layers × modules SVG) → ``html`` (the page) → ``compare`` (several
reports side by side) → ``card`` (the model card). A pass's records, table columns and summary rows feed them all;
a new pass needs no change here.
"""

from __future__ import annotations

from sparsify.report.card import model_card
from sparsify.report.compare import (
    eval_protocol,
    protocol_groups,
    protocol_label,
    render_compare_html,
    render_compare_markdown,
    render_compare_text,
)
from sparsify.report.data import REPORT_FILE, build_report, quality_verdict, read_report, write_report
from sparsify.report.html import render_html
from sparsify.report.text import render_markdown, render_text, summary_rows
from sparsify.report.views import QUALITY_GRADES, fmt_pct, fmt_seconds, fmt_sig, headline, quality_grade

__all__ = [
    "QUALITY_GRADES", "REPORT_FILE", "build_report", "eval_protocol", "fmt_pct", "fmt_seconds", "fmt_sig", "headline",
    "model_card", "protocol_groups", "protocol_label", "quality_grade", "quality_verdict", "read_report",
    "render_compare_html", "render_compare_markdown", "render_compare_text", "render_html", "render_markdown",
    "render_text", "summary_rows", "write_report",
]  # fmt: skip
