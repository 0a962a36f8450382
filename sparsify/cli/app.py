"""The Typer application, its shared options (model, output, evaluation, run flags) and logging."""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from sparsify.cli_options import Option, config_options, field_option
from sparsify.errors import one_line
from sparsify.progress import NOTICE

# Typer vendors Click (``typer._click``) in recent releases and uses the real one before; take whichever it runs.
_click = importlib.import_module(TyperGroup.__mro__[1].__module__.rsplit(".", 1)[0] + ".exceptions")


HELP = {"help_option_names": ["-h", "--help"]}


class _OneLineErrors(TyperGroup):
    """Flag and argument errors as one line (``error: ...``) with exit code 2, not a usage block; bare
    ``sparsify`` shows the help on stdout and exits 0."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except _click.NoArgsIsHelpError as e:
            sys.stdout.write(e.ctx.get_help() + "\n")
            sys.exit(0)
        except _click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            # typer checks values with pydantic, whose messages start "Value error, ": the user is told the problem only
            _say(f"error: {e.format_message().replace(': Value error, ', ': ')}{where}")
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


class _Command(TyperCommand):
    """Help as users read it: ``Usage: sparsify prune MODEL [OPTIONS]``, arguments by name (no Python types)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        args = [p.display_name_raw for p in self.get_params(ctx) if p.param_type_name == "argument"]
        return [*args, self.options_metavar or "[OPTIONS]"]

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args = [(p.display_name_raw, p.help or "") for p in self.get_params(ctx) if p.param_type_name == "argument"]
        opts = [r for p in self.get_params(ctx) if p.param_type_name == "option" and (r := p.get_help_record(ctx))]
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


app = typer.Typer(
    name="sparsify",
    cls=_OneLineErrors,
    help="Compress Hugging Face transformer checkpoints into ones the ecosystem loads as-is.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=HELP,
)


out_console = Console(soft_wrap=True)


err_console = Console(stderr=True, soft_wrap=True)


F = TypeVar("F", bound=Callable[..., Any])


class Format(StrEnum):
    md = "md"
    html = "html"
    json = "json"


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# The model and the run settings every compressing command shares: declared once -----------------------------
ModelArg = Annotated[
    str,
    typer.Argument(metavar="MODEL", help="model folder, Hugging Face Hub repo id, or .gguf file", show_default=False),
]


RevisionOpt = Annotated[
    str | None,
    typer.Option("--revision", metavar="REV", help="Hub repo id only: branch, tag or commit [default: main]"),
]


DeviceOpt = Annotated[
    str,
    typer.Option("--device", metavar="DEVICE", help="where calibration and evaluation run: cpu, cuda, cuda:N or auto"),
]


TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="allow the model folder's own Python code")]


JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON only")]


DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks and debug logs")]


VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="show progress notes on stderr (info logs)")]


OutputOpt = Annotated[
    Path,
    typer.Option(
        "--output",
        "-o",
        metavar="OUT",
        show_default=False,
        help="output folder (appears only when complete and checked)",
    ),
]


EvalOpt = Annotated[
    str | None,
    typer.Option(
        "--eval",
        metavar="FILE",
        help="text of the perplexity measured before and after ('heldout': the embedded held-out text) [default:"
        " windows of the calibration text held out from calibration]",
    ),
]


EvalLenOpt = Annotated[
    list[int] | None,
    typer.Option(
        "--eval-seq-len",
        metavar="N",
        min=2,
        show_default=False,
        help="context length of that perplexity (repeatable) [default: 512; 512 and 2048 for attention patterns]",
    ),
]


NoEvalOpt = Annotated[bool, typer.Option("--no-eval", help="skip the perplexity before and after")]


MaxPplOpt = Annotated[
    float | None,
    typer.Option(
        "--max-ppl-ratio",
        metavar="R",
        min=1.0,
        show_default=False,
        help="fail (exit 1, output kept) when perplexity after / before exceeds R [default: a warning above 3]",
    ),
]


OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="replace an existing sparsify output (or discard an unfinished run's work)")
]


ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="continue an unfinished run into the same output (same model, recipe and settings): an interrupted"
        " run keeps its finished layers for it",
    ),
]


LatencyOpt = Annotated[
    bool, typer.Option("--latency", help="measure a forward's wall time (512 tokens) before and after, for the report")
]


RUN_OPTIONS: list[tuple[str, Any, Any]] = [  # (parameter, annotation, default): pipeline.Options and the CLI's own
    ("eval_data", EvalOpt, None),
    ("eval_seq_len", EvalLenOpt, None),
    ("no_eval", NoEvalOpt, False),
    ("max_ppl_ratio", MaxPplOpt, None),
    ("latency", LatencyOpt, False),
    ("overwrite", OverwriteOpt, False),
    ("resume", ResumeOpt, False),
    ("device", DeviceOpt, "cpu"),
    ("revision", RevisionOpt, None),
    ("trust_remote_code", TrustOpt, False),
    ("json_out", JsonOpt, False),
    ("verbose", VerboseOpt, False),
    ("debug", DebugOpt, False),
]


_MODEL = inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=ModelArg)


_OUTPUT = inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY, annotation=OutputOpt)


def _keyword(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def _recipe_options(calibrates: bool = True) -> list[Option]:
    """The calibration settings (for a command whose pass calibrates) and the compute dtype, from the recipe's
    own fields."""
    from sparsify.recipe import Calibration, Recipe

    dtype = field_option("dtype", Recipe.model_fields["dtype"], ("recipe", "dtype"))
    assert dtype is not None
    return [*(config_options(Calibration, ("calibration",)) if calibrates else []), dtype]


# ------------------------------------------------------------------------------------------------- logging


class _LogLines(logging.Handler):
    """Log records as lines on stderr, never wrapped (logs are read in files as often as on terminals): info as it
    is, warnings and errors prefixed with their level, as the CLI's own lines are; above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno == NOTICE:
                message = f"note: {message}"
            elif record.levelno != logging.INFO:
                message = f"{record.levelname.lower()}: {message}"
            err_console.print(message, markup=False, highlight=False)
        except Exception:  # a logging failure must not end the run
            self.handleError(record)


def _setup_logging(debug: bool, verbose: bool = False) -> None:
    """stderr stays quiet but for warnings, unless asked (``-v``: info, ``--debug``: everything)."""
    level = logging.DEBUG if debug else logging.INFO if verbose else NOTICE
    handler = _LogLines()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s" if debug else "%(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("sparsify").setLevel(level)
    for noisy in ("transformers", "datasets", "huggingface_hub", "filelock", "urllib3", "fsspec", "torch"):
        # CRITICAL: their own error lines would repeat ours (sparsify turns each failure into one line)
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.CRITICAL)
    if not debug:
        try:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
        except ImportError:
            pass


def _version(value: bool) -> None:
    if value:
        from sparsify._version import __version__

        out_console.print(f"sparsify {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Compress Hugging Face transformer checkpoints into ones the ecosystem loads as-is."""


# ------------------------------------------------------------------------------------------------- errors


def _say(message: str) -> None:
    err_console.print(one_line(message), markup=False, highlight=False)
