"""How the report reads: comparisons only of like with like, graded quality badges, window counts and lengths named,
one time format, a short terminal view, and pages that fit a phone."""

from __future__ import annotations

import copy
import json
import re

import pytest
import typer.testing

from sparsify.report import (
    QUALITY_GRADES,
    eval_protocol,
    fmt_seconds,
    protocol_groups,
    quality_verdict,
    render_compare_html,
    render_compare_markdown,
    render_compare_text,
    render_html,
    render_markdown,
    render_text,
    summary_rows,
)
from tests.test_report import _report

CACHED = "/root/.cache/sparsify/gguf/SmolLM2-135M-Instruct.Q4_1-c8504e634d41d902"


def _measured(output: str, after: float, windows: int = 16, digest: str | None = None, before: float = 12.0) -> dict:
    report = copy.deepcopy(_report(output, after))
    report["eval"].update(windows=windows, before=before, **({"digest": digest} if digest else {}))
    report["quality"]["ppl_ratio"] = after / before
    return report


def _tags(page: str) -> dict[str, list[str]]:
    """Each compare row's output name and the tags in its cells (but "smallest")."""
    rows = page[page.index('<table class="cmp">') : page.index("</table>")].split("<tr")[2:]
    tag = r'class="tag[^"]*"[^>]*>((?!smallest)[^<]*)<'
    return {re.search(r"<b>([^<]*)</b>", r).group(1): re.findall(tag, r) for r in rows}


def test_a_compare_picks_the_best_only_among_outputs_measured_alike():
    """16 and 32 windows of the same text: the 32-window output's lower perplexity is no win over the others."""
    reports = [_measured("/out/a", 13.0), _measured("/out/b", 12.5), _measured("/out/c", 12.1, windows=32, before=11.0)]
    page = render_compare_html(reports)
    line = "quality measured under 2 evaluation protocols; outputs compared only within one:"
    assert (
        line in page and "A = heldout, 16 windows × 256 tokens (a, b); B = heldout, 32 windows × 256 tokens (c)" in page
    )
    assert _tags(page) == {"a": ["A"], "b": ["A", "best of A"], "c": ["B"]}
    text = render_compare_markdown(reports)
    assert line in text
    lines = {row.split(" | ")[0][2:]: row for row in text.splitlines() if row.startswith("| /out/")}
    assert "(best of A)" in lines["/out/b"] and "best" not in lines["/out/a"] + lines["/out/c"]
    alike = render_compare_html([_measured("/out/a", 13.0), _measured("/out/b", 12.5)])
    assert "evaluation protocols" not in alike and _tags(alike)["b"] == ["best"]
    assert "Measured on heldout, 16 windows × 256 tokens." in alike


def test_the_windows_digest_tells_protocols_apart_where_both_have_one():
    def p(digest):
        return eval_protocol(_measured("/out/x", 13.0, digest=digest))

    assert protocol_groups([p("aa"), p(None), p("aa")]) == [[0, 1, 2]]  # an older report joins the one digest
    assert protocol_groups([p("aa"), p("bb"), p(None), p("aa")]) == [[0, 3], [1], [2]]
    assert protocol_groups([p("aa"), eval_protocol(_old_eval()), p(None)]) == [[0, 2]]  # not measured: no group
    page = render_compare_html([_measured("/out/a", 13.0, digest="a" * 64), _measured("/out/b", 12.0, digest="b" * 64)])
    assert "windows aaaaaaaaaaaa (a); B = heldout, 16 windows × 256 tokens, windows bbbbbbbbbbbb (b)" in page
    assert "best" not in str(_tags(page))


def _old_eval() -> dict:
    report = _report()
    del report["eval"]
    return report


def test_each_protocol_has_its_own_chart_and_the_legend_promises_only_what_is_drawn():
    reports = [_measured("/out/a", 13.0), _measured("/out/b", 12.5), _measured("/out/c", 12.1, windows=32, before=11.0)]
    section = render_compare_html(reports).split("Size against quality")[1]
    charts = section.split('<div class="chart">')[1:]
    assert len(charts) == 2 and all("<svg" in c for c in charts)
    assert charts[0].startswith('<p class="small muted">protocol A: heldout, 16 windows × 256 tokens;')
    assert charts[1].startswith('<p class="small muted">protocol B: heldout, 32 windows × 256 tokens;')
    for chart in charts:  # one input each: drawn, and said
        assert chart.count('<circle class="input"') == 1 and "grey: the input" in chart
    other_input = _measured("/out/b", 12.5, before=12.4)  # the outputs disagree on the input's perplexity
    chart = render_compare_html([_measured("/out/a", 13.0), other_input]).split("Size against quality")[1]
    assert '<circle class="input"' not in chart and "grey" not in chart
    chart = render_compare_html([_measured("/out/a", 13.0), _old_eval()]).split("Size against quality")[1]
    assert '<circle class="input"' in chart and "grey: the input" in chart  # one output measured, and its input


@pytest.mark.parametrize(
    ("after", "grade", "colour"),
    [(12.3, "near lossless", "ok"), (14.4, "small loss", "ok"), (20.0, "noticeable loss", "warning"),
     (28.0, "large loss", "failed")],
)  # fmt: skip
def test_the_quality_badge_is_graded_by_the_perplexity_ratio(after, grade, colour):
    """Before 12: 1.025×, 1.2×, 1.67×, 2.33×; the run's verdict stays ok below its 3× warning."""
    report = _measured("/out/a", after)
    assert quality_verdict(report["eval"], None, 3.0)["status"] == "ok"
    page = render_html(report)
    assert f'<span class="chip {colour}">{grade} · perplexity ×{after / 12:.2f}</span>' in page
    assert "quality ok" not in page
    assert dict(summary_rows(report))["quality"] == f"{grade}: perplexity {after / 12:.2f}× the input's"
    assert f"quality       {grade}" in render_text(report)
    pair = [report, _measured("/out/b", 12.0)]
    assert f"| {grade} |" in render_compare_markdown(pair) and f">{grade}</span>" in render_compare_html(pair)
    assert [bound for bound, _, _ in QUALITY_GRADES] == sorted(bound for bound, _, _ in QUALITY_GRADES)


def test_a_warning_keeps_its_banner_beside_the_grade():
    report = _measured("/out/a", 48.0)
    report["quality"] = quality_verdict(report["eval"], None, 3.0)
    assert report["quality"]["status"] == "warning"
    assert "on heldout, 16 windows × 256 tokens: 4× the input's" in report["quality"]["message"]
    page = render_html(report)
    assert 'class="banner warning"' in page and '<span class="chip failed">large loss · perplexity ×4.00</span>' in page
    assert "large loss; warning" in render_compare_markdown([report, _measured("/out/b", 12.0)])


def test_perplexity_is_shown_with_its_window_count_and_length():
    report = _measured("/out/a", 12.5)
    report["eval"]["by_length"] = [
        {"seq_len": 256, "windows": 16, "before": 12.0, "after": 12.5},
        {"seq_len": 1024, "windows": 4, "before": 11.0, "after": 11.2},
    ]
    del report["latency"]  # its "256 tokens" is one forward pass
    html_text = re.sub(r"<[^>]+>", " ", render_html(report))
    for text in (html_text, render_markdown(report), render_text(report), render_text(report, full=True)):
        flat = " ".join(text.replace("\\", "").split())
        assert "16 windows × 256 tokens" in flat
        bare = re.findall(r"(\S+ \S+) (?:256|1024) tokens", flat)
        assert bare and all(b.endswith(("windows ×", "window ×")) for b in bare), bare
    assert "8 windows × 64 tokens of builtin:x" in dict(summary_rows(report))["calibration"]


def test_one_time_format_everywhere():
    report = _measured("/out/a", 12.5)
    report["totals"]["wall_seconds"] = 1254.1
    texts = [render_html(report), render_markdown(report), render_text(report), render_compare_html([report] * 2),
             render_compare_markdown([report] * 2)]  # fmt: skip
    assert all("20 min 54 s" in t.replace("\u00a0", " ") and "1254" not in t for t in texts)
    assert fmt_seconds(41.23) == "41.2 s" and fmt_seconds(0.25) == "250 ms" and fmt_seconds(59.97) == "1 min 0 s"
    assert fmt_seconds(0.9997) == "1 s" and fmt_seconds(3599.7) == "1 h 00 min" and fmt_seconds(7530) == "2 h 05 min"


def _many_layers() -> dict:
    return _measured("/out/a", 12.5) | {"layers": _report(layers=12)["layers"]}


def test_the_terminal_view_is_the_headline_and_the_worst_modules():
    report = _many_layers()
    text = render_text(report)
    lines = text.splitlines()
    assert "\\" not in text and "|" not in text
    report["eval"]["kl"] = {"mean": 0.01, "p99": 0.05, "top1": 0.9, "tokens": 4080, "seq_len": 256}
    text = render_text(report)
    lines = text.splitlines()
    for label in ("size on disk", "perplexity", "KL to input", "quality", "wall time"):
        assert any(line.startswith(label) for line in lines), label
    assert not any(line.startswith(("calibration", "target sparsity", "peak memory")) for line in lines)
    head = next(i for i, line in enumerate(lines) if line.startswith("largest relative output error"))
    assert lines[head].startswith("largest relative output error: 10 of 36 Linears")
    worst = lines[head + 2 : head + 12]
    assert worst[0].split()[:2] == ["model.layers.11.mlp.down_proj", "0.122"]  # 0.01 * 12 + 0.002
    assert all(line.startswith("model.layers.") for line in worst) and len(text.splitlines()) < 40
    full = render_text(report, full=True)
    assert "\\" not in full and full.count("model.layers.11.mlp.down_proj") == 2 and "Size by part" in full
    assert "calibration" in full and "every row: method wanda\n" in full


def test_the_cli_shows_the_terminal_view_on_a_terminal_and_markdown_elsewhere(tmp_path, monkeypatch):
    from tests.test_cli import run

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sparsify_report.json").write_text(json.dumps(_many_layers()))
    piped = run("report", tmp_path / "out")
    assert piped.exit_code == 0 and piped.stdout.startswith("# sparsify report") and "self\\_attn" in piped.stdout
    full = run("report", tmp_path / "out", "--full")
    assert "model.layers.0.self_attn.q_proj" in full.stdout and "\\" not in full.stdout
    monkeypatch.setattr(typer.testing._NamedTextIOWrapper, "isatty", lambda self: True)
    shown = run("report", tmp_path / "out")
    assert shown.exit_code == 0 and shown.stdout == render_text(_many_layers())
    assert run("report", tmp_path / "out", "--format", "md").stdout == piped.stdout
    compared = run("report", tmp_path / "out", "--compare", tmp_path / "out")
    assert compared.stdout.startswith("quality measured on heldout") and "\\" not in compared.stdout
    assert render_compare_text([_many_layers()] * 2) == compared.stdout


def test_the_pages_fit_a_phone():
    """Charts scale with the page, the size table has four columns, a cache folder's hash is left out of titles."""
    report = _measured("/root/.cache/sparsify/demo-out", 12.5) | {"model": CACHED}
    page = render_html(report)
    assert '<h1><span class="path" title="' + CACHED + '">SmolLM2-135M-Instruct.Q4_1</span>' in page
    sizes = page[page.index('<table class="sizes">') :]
    assert sizes[: sizes.index("</tr>")].count("<th") == 4
    reports = [report, _measured("/out/b", 12.0) | {"model": CACHED}]
    compare = render_compare_html(reports)
    assert ">SmolLM2-135M-Instruct.Q4_1</span></h1>" in compare
    chart = compare[compare.index('<div class="chart">') :]
    assert re.search(r'<svg [^>]*viewBox="0 0 \d+ \d+"', chart) and 'style="width:' not in chart
    assert ".chart svg{display:block;width:100%" in compare
