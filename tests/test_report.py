"""The report's renderings: a self-contained, escaped HTML page, heat maps, sizes by part, the comparison view."""

from __future__ import annotations

import copy
import json
import re

import pytest

from sparsify.report import (
    fmt_pct,
    fmt_sig,
    model_card,
    render_compare_html,
    render_compare_markdown,
    render_html,
    render_markdown,
    summary_rows,
)
from sparsify.sizes import size_breakdown, tensor_parameters, tensor_part

MODULES = ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]
PRUNE_COLUMNS = [
    ["name", "Linear", "text"],
    ["method", "method", "text"],
    ["sparsity", "sparsity", "pct"],
    ["rel_error", "rel. error", "err"],
    ["seconds", "time", "s"],
]
QUANT_COLUMNS = [
    ["name", "Linear", "text"],
    ["scheme", "scheme", "text"],
    ["weight_error", "weight error", "err"],
    ["rel_error", "output error", "err"],
    ["qat_loss", "QAT loss (before → after)", "text"],
]


def _report(output: str = "/out/wanda", ppl_after: float = 12.5, nbytes: int = 600_000, layers: int = 3) -> dict:
    """A report as the pipeline writes it: one prune pass then one quantize pass over ``layers`` layers."""
    records = []
    for p, kind in enumerate(("prune", "quantize")):
        for i in range(layers):
            for j, m in enumerate(MODULES):
                rec = {"kind": kind, "name": f"model.layers.{i}.{m}", "layer": i, "pass": p, "seconds": 0.01}
                if kind == "prune":
                    rec.update(method="wanda", sparsity=0.5, rel_error=0.01 * (i + 1) + 0.001 * j, status="pruned")
                else:
                    rec.update(scheme="w8a8", bits=8, weight_error=1e-5 * (i + j + 1), rel_error=0.02, qat_loss=None)
                records.append(rec)
    return {
        "sparsify_version": "0.1.0",
        "run_id": "abc",
        "loader": "transformers",
        "created": "2026-01-01T00:00:00+00:00",
        "model": "/models/llama",
        "output": output,
        "model_type": "llama",
        "recipe": {"passes": [{"type": "prune", "method": "wanda", "sparsity": 0.5}, {"type": "quantize"}]},
        "passes": [
            {
                "index": 0,
                "type": "prune",
                "kind": "prune",
                "description": "prune wanda 50%",
                "settings": {"sparsity": 0.5},
            },
            {"index": 1, "type": "quantize", "kind": "quantize", "description": "quantize w8a8", "settings": {}},
        ],
        "seed": 0,
        "calibration": {"text": "builtin:x", "windows": 8, "seq_len": 64},
        "summary": [["target sparsity", "50.0%"], ["quantized Linears", "9: w8a8"]],
        "summary_by_kind": {"prune": [["target sparsity", "50.0%"]], "quantize": [["quantized Linears", "9: w8a8"]]},
        "tables": [
            {"kind": "prune", "title": "Pruning, per Linear", "columns": PRUNE_COLUMNS},
            {"kind": "quantize", "title": "Quantization, per Linear", "columns": QUANT_COLUMNS},
        ],
        "layers": records,
        "totals": {
            "parameters": 190_000,
            "quantized_parameters": 0,
            "input_bytes": 760_000,
            "nonzeros": 115_000,
            "bytes": nbytes,
            "wall_seconds": 7.0,
            "peak_rss_bytes": 400 * 2**20,
            "overall_sparsity": 0.39,
        },
        "eval": {"seq_len": 256, "windows": 16, "text": "heldout", "before": 12.0, "after": ppl_after},
        "quality": {"status": "ok", "ppl_ratio": ppl_after / 12.0, "limit": 3.0, "message": ""},
        "sizes": {
            "input": {
                "embeddings": {"bytes": 160_000, "parameters": 40_000},
                "mlp": {"bytes": 600_000, "parameters": 150_000},
            },
            "output": {
                "embeddings": {"bytes": 160_000, "parameters": 40_000},
                "mlp": {"bytes": 440_000, "parameters": 150_000},
            },
        },
        "latency": {"seq_len": 256, "before_s": 0.5, "after_s": 0.25},
        "notes": ["pass 0: a note about the prune pass", "a general note"],
    }


def _old(report: dict) -> dict:
    """The same report as an earlier sparsify wrote it: none of the fields added since."""
    old = copy.deepcopy(report)
    for key in ("sizes", "latency", "summary_by_kind", "tables", "quality", "eval"):
        old.pop(key)
    old["passes"] = [{k: v for k, v in p.items() if k in ("index", "type", "description")} for p in old["passes"]]
    for rec in old["layers"]:
        rec.pop("pass")
    old["totals"] = {k: v for k, v in old["totals"].items() if k not in ("input_bytes", "peak_rss_bytes")}
    return old


def _external_references(page: str) -> list[str]:
    """src/href/url() values that load something from elsewhere (a fragment #id stays in the page)."""
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page) + re.findall(r"url\(([^)]*)\)", page)
    return [r for r in refs if not r.startswith("#")]


def test_the_page_is_self_contained():
    for page in (render_html(_report()), render_compare_html([_report(), _report("/out/b")])):
        assert page.startswith("<!doctype html>")
        assert _external_references(page) == []
        assert "<script" not in page and "@import" not in page and "<link" not in page


def test_every_value_is_escaped():
    evil = "<script>alert(1)</script>"
    report = _report(output=evil)
    report["model"] = evil
    report["notes"].append(evil)
    report["passes"][0]["description"] = evil
    report["passes"][0]["settings"] = {"targets": [evil]}
    report["summary_by_kind"]["prune"].append([evil, evil])
    report["quality"] = {"status": "warning", "ppl_ratio": 4.0, "limit": 3.0, "message": evil}
    for rec in report["layers"]:
        rec.update(name=f"model.layers.{rec['layer']}.{evil}", method=evil)
    for page in (render_html(report), render_compare_html([report, _report()])):
        assert "<script" not in page and "&lt;script&gt;" in page


def test_the_heat_map_has_one_cell_per_layer_and_module_with_its_value():
    report = _report(layers=4)
    del report["layers"][1]  # layer 0's k_proj was not pruned: its cell says so
    report["layers"][1]["rel_error"] = None  # layer 0's down_proj was pruned, its error not measured
    page = render_html(report)
    prune = page[page.index('id="pass-0"') : page.index('id="pass-1"')]
    error_map = prune[prune.index("<h3>relative output error</h3>") :]
    error_map = error_map[: error_map.index("</svg>")]
    cells = re.findall(r'<rect class="cell( empty)?"[^>]*><title>([^<]*)</title>', error_map)
    assert len(cells) == 4 * len(MODULES)
    assert {c for c in cells if c[0]} == {
        (" empty", "layer 0 · self_attn.k_proj: not in this pass"),
        (" empty", "model.layers.0.mlp.down_proj: relative output error not measured"),
    }
    titles = {t for _, t in cells}
    assert "model.layers.3.mlp.down_proj: relative output error 0.042" in titles
    for label in ("q_proj", "k_proj", "down_proj", "layer →", "module →"):  # labelled axes
        assert f">{label}</text>" in error_map


def test_a_uniform_metric_is_a_sentence_not_a_flat_map():
    page = render_html(_report())
    assert "50.0% in every one of the 9 Linears" in page and "8 in every one of the 9 Linears" in page


@pytest.mark.parametrize(
    ("model_type", "name", "part"),
    [
        ("llama", "model.embed_tokens.weight", "embeddings"),
        ("llama", "lm_head.weight", "embeddings"),
        ("llama", "model.layers.0.self_attn.q_proj.weight", "attention"),
        ("llama", "model.layers.11.mlp.down_proj.weight_packed", "mlp"),
        ("llama", "model.layers.11.mlp.down_proj.weight_scale", "mlp"),
        ("llama", "model.layers.0.input_layernorm.weight", "norms"),
        ("llama", "model.norm.weight", "norms"),
        ("gpt2", "wte.weight", "embeddings"),
        ("gpt2", "transformer.wpe.weight", "embeddings"),
        ("gpt2", "h.0.attn.c_attn.weight", "attention"),
        ("gpt2", "h.0.attn.c_proj.bias", "attention"),
        ("gpt2", "transformer.h.1.mlp.c_proj.weight", "mlp"),
        ("gpt2", "h.0.ln_1.weight", "norms"),
        ("gpt2", "ln_f.bias", "norms"),
        ("bert", "bert.embeddings.word_embeddings.weight", "embeddings"),
        ("bert", "embeddings.LayerNorm.weight", "norms"),
        ("bert", "encoder.layer.0.attention.self.query.weight", "attention"),
        ("bert", "encoder.layer.0.attention.output.dense.weight", "attention"),
        ("bert", "encoder.layer.0.attention.output.LayerNorm.bias", "norms"),
        ("bert", "bert.encoder.layer.1.intermediate.dense.weight", "mlp"),
        ("bert", "encoder.layer.1.output.dense.weight", "mlp"),
        ("bert", "pooler.dense.weight", "other"),
        ("mixtral", "model.layers.0.block_sparse_moe.experts.3.w1.weight", "experts"),
        ("mixtral", "model.layers.0.block_sparse_moe.gate.weight", "mlp"),  # the router
        ("mixtral", "model.layers.0.self_attn.o_proj.weight", "attention"),
        ("mixtral", "model.embed_tokens.weight", "embeddings"),
        ("qwen2_moe", "model.layers.0.mlp.shared_expert.up_proj.weight", "experts"),
        ("some_new_family", "blocks.0.attn.qkv.weight", "attention"),
    ],
)
def test_size_classifier(model_type, name, part):
    assert tensor_part(name, model_type) == part


def test_size_breakdown_sums_bytes_and_parameters_per_part():
    entries = [
        ("model.embed_tokens.weight", 400, 100),
        ("model.layers.0.mlp.up_proj.weight_packed", 64, tensor_parameters("x.weight_packed", (4, 4), num_bits=4)),
        ("model.layers.0.mlp.up_proj.weight_scale", 8, tensor_parameters("x.weight_scale", (4, 1))),
        ("model.layers.0.self_attn.q_proj.weight", 16, 16),
    ]
    assert size_breakdown(entries, "llama") == {
        "embeddings": {"bytes": 400, "parameters": 100},
        "attention": {"bytes": 16, "parameters": 16},
        "mlp": {"bytes": 72, "parameters": 128},  # 16 int32 of 8 nibbles; the scales have no parameters
    }


def test_sizes_are_drawn_when_the_report_has_them_and_not_otherwise():
    page = render_html(_report())
    assert "Where the bytes are" in page and "0.73×" in page  # mlp 600 kB → 440 kB
    assert "Size by part" in render_markdown(_report())
    report = _report()
    del report["sizes"]
    assert "Where the bytes are" not in render_html(report) and "Size by part" not in render_markdown(report)


def test_the_compare_page_lists_each_output_and_marks_the_best():
    reports = [_report("/out/a", 13.0, 700_000), _report("/out/b", 12.2, 650_000), _report("/out/c", 15.0, 300_000)]
    page = render_compare_html(reports)
    rows = page[page.index('<table class="cmp">') : page.index("</table>")].split("<tr")[2:]
    assert len(rows) == 3 and all(f"/out/{x}" in row for x, row in zip("abc", rows, strict=True))
    assert '<span class="tag">best</span>' in rows[1] and '<span class="tag">smallest</span>' in rows[2]
    assert "tag" not in rows[0]
    text = render_compare_markdown(reports)
    lines = [line for line in text.splitlines() if line.startswith("| /out/")]
    assert len(lines) == 3 and "(best)" in lines[1] and "(smallest)" in lines[2]


def test_the_compare_page_warns_when_the_numbers_do_not_compare():
    other = _report("/out/b")
    other["model"] = "/models/qwen"
    other["eval"]["seq_len"] = 2048
    page = render_compare_html([_report("/out/a"), other])
    assert "come from different models" in page and "under 2 evaluation protocols" in page
    assert "banner" not in render_compare_html([_report("/out/a"), _report("/out/b")]).split("</style>")[1]


def test_small_numbers_keep_their_digits():
    assert fmt_sig(3e-6) == "3.00e-6" and fmt_sig(0.07571) == "0.0757" and fmt_sig(0.0) == "0"
    assert fmt_pct(0.5) == "50.0%" and fmt_pct(2e-4) == "<0.1%" and fmt_pct(0.9999) == ">99.9%"
    report = _report()
    for rec in report["layers"]:
        rec["rel_error"] = 3e-6 + 1e-7 * rec["layer"]
    for text in (render_html(report), render_markdown(report)):
        assert "3.00e-6" in text and "0.0000" not in text


def test_empty_columns_are_dropped():
    page = render_html(_report())
    assert "QAT loss" not in page and "weight error" in page


def test_a_verdict_that_is_not_ok_is_a_banner():
    report = _report(ppl_after=60.0)
    report["quality"] = {"status": "failed", "ppl_ratio": 5.0, "limit": 3.0, "message": "perplexity 12 → 60"}
    page = render_html(report)
    assert 'class="banner failed"' in page and "perplexity 12 → 60" in page
    assert 'class="banner' not in render_html(_report())


def test_headline_has_perplexity_and_latency():
    page = render_html(_report())
    head = page[: page.index('id="pass-0"')]
    assert "perplexity" in head and "12.50" in head and "12.00" in head
    assert "250 ms" in head and "2.00×" in head  # latency after, and the speed-up
    assert "latency" in dict(summary_rows(_report()))


def test_old_reports_without_the_new_fields_still_render():
    old = _old(_report())
    page = render_html(old)
    assert "prune wanda 50%" in page and "Where the bytes are" not in page and "<svg" in page
    assert "model.layers.0.self\\_attn.q\\_proj" in render_markdown(old)
    assert dict(summary_rows(old))["passes"] == "prune wanda 50%; quantize w8a8"
    assert "# llama compressed with sparsify" in model_card(old)
    assert "/out/wanda" in render_compare_html([old, _report()])


SVG = "<svg onload=alert(1)>"


def _forged() -> dict:
    """A report with markup in every field a page shows, numbers included (as strings, where JSON allows any)."""
    report = copy.deepcopy(_report())  # _report() shares its column lists
    for key in ("model", "output", "model_type", "created", "run_id", "loader", "sparsify_version", "seed"):
        report[key] = SVG
    report["eval"] = {"seq_len": SVG, "windows": SVG, "text": SVG, "before": 12.0, "after": 12.5}
    report["eval"]["by_length"] = [{**report["eval"]}, {**report["eval"], "seq_len": f"{SVG}2"}]
    report["eval"]["before_recovery"] = {"perplexity": 13.0, "step": SVG}
    report["latency"]["seq_len"] = SVG
    report["calibration"] = {"text": SVG, "windows": SVG, "seq_len": SVG, "why": SVG}
    report["quality"] = {"status": SVG, "ppl_ratio": 1.04, "limit": 3.0, "message": SVG}
    report["tables"][0]["title"] = SVG
    report["tables"][0]["columns"][1][1] = SVG
    report["summary"].append([SVG, SVG])
    report["passes"][1]["type"] = SVG
    report["passes"][1]["settings"] = {SVG: {SVG: [SVG]}}
    for rec in report["layers"]:
        rec.update(name=f"model.layers.{rec['layer']}.{SVG}", kind=rec["kind"], scheme=SVG)
    return report


def test_no_markup_from_the_data_reaches_the_page():
    """Every value from the report is escaped, numbers too (a forged report can hold anything in any field)."""
    report = _forged()
    for page in (render_html(report), render_compare_html([report, _report()])):
        assert "<svg onload" not in page and "<script" not in page, re.findall(r".{60}<svg onload.{20}", page)
        assert "&lt;svg onload=alert(1)&gt;" in page


def _write(folder, data) -> None:
    folder.mkdir(exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (folder / "sparsify_report.json").write_text(text)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda r: r["eval"].update(seq_len=SVG), f"eval.seq_len must be an integer, got '{SVG}'"),
        (lambda r: r.pop("model"), "model is missing"),
        (lambda r: r["totals"].update(parameters="many"), "totals.parameters must be an integer, got 'many'"),
        (lambda r: r["totals"].pop("nonzeros"), "totals.nonzeros is missing"),
        (lambda r: r.update(notes="none"), "notes must be a list"),
        (lambda r: r["layers"].append("x"), "layers.18 must be an object"),
        (lambda r: r["passes"][1].update(index="1"), "passes.1.index must be an integer, got '1'"),
        (lambda r: r["passes"][0].pop("description"), "passes.0.description is missing"),
        (lambda r: r["eval"].pop("windows"), "eval.windows is missing"),
        (lambda r: r["quality"].update(status=None), "quality.status must be a string, got None"),
        (lambda r: r["sizes"]["output"]["mlp"].update(bytes=1.5), "sizes.output.mlp.bytes must be an integer"),
        (lambda r: r["tables"][0]["columns"].append(["x"]), "tables.0.columns.5 must be a list of 3 items"),
        (lambda r: r["summary"].append(["x"]), "summary.2 must be a list of 2 items"),
        (lambda r: r["summary_by_kind"]["prune"].append("x"), "summary_by_kind.prune.1 must be a list, got 'x'"),
        (lambda r: r["latency"].update(after_s="fast"), "latency.after_s must be a number, got 'fast'"),
    ],
)
def test_a_malformed_report_is_one_line_through_the_cli(change, said, tmp_path):
    from tests.test_cli import assert_user_error, run

    report = copy.deepcopy(_report())  # _report() shares its column lists
    change(report)
    _write(tmp_path / "out", report)
    for fmt in ("md", "html", "json"):
        result = run("report", tmp_path / "out", "--format", fmt)
        assert_user_error(result, None, f"{tmp_path / 'out' / 'sparsify_report.json'}: ", said)
    _write(tmp_path / "good", _report())
    result = run("report", tmp_path / "good", "--compare", tmp_path / "out", "--format", "html")
    assert_user_error(result, None, str(tmp_path / "out" / "sparsify_report.json"), said)


@pytest.mark.parametrize(
    ("text", "said"),
    [("{not json", "is not valid JSON"), ("[1, 2]", "must be a JSON object, got a list"), ("", "is not valid JSON")],
)
def test_a_report_that_is_not_a_json_object_is_one_line(text, said, tmp_path):
    from tests.test_cli import assert_user_error, run

    _write(tmp_path / "out", text)
    assert_user_error(run("report", tmp_path / "out"), None, "sparsify_report.json", said)
    (tmp_path / "out" / "sparsify_report.json").write_bytes(b"\xff\xfe{")
    assert_user_error(run("report", tmp_path / "out"), None, "sparsify_report.json", "is not valid JSON")


def test_an_older_or_newer_report_reads_back(tmp_path):
    """Keys a renderer does not read are kept as they are; fields added since are optional."""
    from sparsify.report import read_report

    newer = _report()
    newer["eval"]["kl"] = {"mean": 0.1, "anything": [1, "x"]}
    newer["something_new"] = {"x": 1}
    for data in (_old(_report()), newer):
        _write(tmp_path / "out", data)
        assert read_report(tmp_path / "out") == data
