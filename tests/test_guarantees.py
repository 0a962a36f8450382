"""Nothing lost, whatever happens: output folders, signals, concurrent runs, resume (docs/guarantees.md).

Signals are real: the CLI runs in a fresh process (``tests/faults.py``) that injects one fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers as T

from sparsify.cli import app
from tests import zoo
from tests.test_cli import FAST, assert_user_error, run

ROOT = Path(__file__).resolve().parents[1]
PRUNE = ["--method", "wanda", "--sparsity", "0.5", *FAST]


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path → sha256), symlinks as their targets."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _weights(out: Path) -> dict[str, str]:
    """The output's bytes that must be reproducible: weights, index, config, recipe (not the report or the
    model card, which say when and how the run went)."""
    return {k: v for k, v in _tree(out).items() if k not in ("sparsify_report.json", "README.md")}


def _fault(fault: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "tests.faults", fault, "--", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error: ", "interrupted"))]


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Path:
    """A 4-layer Llama, so that a run can die with layers both done and to do."""
    return zoo.save("llama", tmp_path_factory.mktemp("deep") / "llama4", layers=4)


def _leftovers(parent: Path, out: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ------------------------------------------------------------------------------------------ output paths


def test_overwrite_onto_a_folder_holding_the_model_is_refused(model_dir, tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    model = proj / "models" / "llama"
    model.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(model_dir("llama"), model)
    (tmp_path / "link").symlink_to(proj)
    before = _tree(proj)
    for out in (proj, tmp_path / "link", model / ".." / "..", proj / "models"):
        assert_user_error(run("prune", model, "-o", out, *PRUNE, "--overwrite"), None, "model folder")
    monkeypatch.chdir(proj)
    assert_user_error(run("prune", model, "-o", ".", *PRUNE, "--overwrite"), None, "current folder")
    monkeypatch.chdir(model)
    assert_user_error(run("prune", ".", "-o", "../..", *PRUNE, "--overwrite"), None, "current folder")
    assert _tree(proj) == before


def test_output_must_not_contain_what_the_run_reads(model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    calib = data / "calib.txt"
    calib.write_text("\n\n".join(zoo.training_text()))
    (data / "sparsify_report.json").write_text("{}")  # even an earlier output is not replaced over its input
    assert_user_error(
        run("prune", model_dir("llama"), "-o", data, *PRUNE, "--calib", calib, "--overwrite"), None, "calib.txt"
    )
    assert calib.is_file()


def test_dangling_symlink_output_is_refused_and_symlinked_output_is_followed(model_dir, tmp_path):
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert_user_error(run("prune", model_dir("llama"), "-o", dangling, *PRUNE), None, "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling"]

    real = tmp_path / "disk" / "out"
    assert run("prune", model_dir("llama"), "-o", real, *PRUNE).exit_code == 0
    link = tmp_path / "out"
    link.symlink_to(real)
    r = run("prune", model_dir("llama"), "-o", link, "--method", "magnitude", "--sparsity", "0.3", "--overwrite")
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and "magnitude" in (real / "recipe.yaml").read_text()
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["out"]  # no .out.old-PID, no partial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "disk", "out"]


@pytest.mark.parametrize("existing", [False, True])
def test_a_failing_final_rename_leaves_nothing_behind(model_dir, tmp_path, monkeypatch, existing):
    import errno

    from sparsify.checkpoint import atomic, output

    out = tmp_path / "out"
    if existing:
        assert run("prune", model_dir("llama"), "-o", out, *PRUNE).exit_code == 0
    before = _tree(tmp_path)

    renameat2, rename = atomic.renameat2, os.rename

    def busy(original):  # renames onto OUT fail (a mount point, say); the others work
        def call(src, dst, *args):
            if Path(dst) == out:
                raise OSError(errno.EBUSY, "Device or resource busy")
            return original(src, dst, *args)

        return call

    monkeypatch.setattr(atomic, "renameat2", busy(renameat2))
    monkeypatch.setattr(output.os, "rename", busy(rename))
    r = run("prune", model_dir("llama"), "-o", out, *PRUNE, "--overwrite")
    assert_user_error(r, None, "cannot move the finished output", "busy")
    assert _tree(tmp_path) == before and _leftovers(tmp_path, out) == []


@pytest.mark.slow
def test_output_that_appears_during_the_run_is_not_replaced(deep, tmp_path):
    out = tmp_path / "out"
    r = _fault("appear@2", "prune", deep, "-o", out, *PRUNE)
    assert r.returncode == 1, r.stderr
    assert _error_lines(r.stderr) == [f"error: {out} appeared during the run; it is not replaced without --overwrite"]
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert _leftovers(tmp_path, out) == []


@pytest.mark.slow
def test_two_overlapping_runs_into_one_output_end_with_exactly_one_success(deep, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tests.faults", "slow@0.5", "--", "prune", str(deep), "-o", str(out), *PRUNE]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "another sparsify run" in loser or "exists" in loser, loser
    assert _leftovers(tmp_path, out) == []
    T.AutoModelForCausalLM.from_pretrained(out)


# Two overlapping runs, each step of the claim forced into the interleaving that once made one of them fail
# with a traceback (FileNotFoundError) instead of a one-line refusal; in-process: flock conflicts between two
# descriptors of one process as between two processes.


def _live_run(folder: Path) -> int:
    """Make ``folder`` a work folder that a live run holds (as :func:`~sparsify.checkpoint.output._create` does);
    the descriptor of its lock."""
    from sparsify.checkpoint import output

    folder.mkdir()
    fd = output._lock(folder)
    assert fd is not None and fd >= 0
    (folder / output.STATE_DIR).mkdir()
    return fd


def test_a_claim_never_sweeps_nor_trips_on_a_staging_folder_that_another_run_renames_meanwhile(tmp_path, monkeypatch):
    from sparsify.checkpoint import output
    from sparsify.errors import SparsifyError

    out = tmp_path / "out"
    staging = tmp_path / ".out.partial-new-abcd1234"  # the other run, in _create: locked, before its rename
    fd = _live_run(staging)
    is_ours = output._is_ours

    def renamed_after_the_listing(folder):  # the sweep listed it, then the other run claimed .out.partial
        ours = is_ours(folder)
        if folder == staging and staging.exists():
            assert output.rename_noreplace(staging, tmp_path / ".out.partial")
        return ours

    monkeypatch.setattr(output, "_is_ours", renamed_after_the_listing)
    try:
        with (
            pytest.raises(SparsifyError, match="another sparsify run"),
            output.partial_output(output.check_output(out, [], None, False)),
        ):
            pass
        assert (
            _leftovers(tmp_path, out) == [".out.partial"] and (tmp_path / ".out.partial" / ".sparsify-state").is_dir()
        )
    finally:
        os.close(fd)


@pytest.mark.parametrize("when", ["before-open", "before-flock"])
def test_a_claim_that_finds_the_work_folder_of_a_run_that_then_finishes_is_refused_in_one_line(
    tmp_path, monkeypatch, when
):
    from sparsify.checkpoint import output
    from sparsify.errors import SparsifyError

    out = tmp_path / "out"
    target = output.check_output(out, [], None, False)
    held = [_live_run(tmp_path / ".out.partial")]

    def other_run_finishes():  # renames its work folder into place and ends (its lock goes with it)
        if held:
            os.rename(tmp_path / ".out.partial", out)
            os.close(held.pop())

    if when == "before-open":
        lock = output._lock
        monkeypatch.setattr(output, "_lock", lambda folder: (other_run_finishes(), lock(folder))[1])
    else:
        flock = output.fcntl.flock

        class Fcntl:
            LOCK_EX, LOCK_NB = output.fcntl.LOCK_EX, output.fcntl.LOCK_NB

            @staticmethod
            def flock(fd, op):  # this run opened the folder; the other finished before the lock was taken
                other_run_finishes()
                return flock(fd, op)

        monkeypatch.setattr(output, "fcntl", Fcntl)
    with pytest.raises(SparsifyError, match="out exists; pass --overwrite"), output.partial_output(target):
        pass
    assert not held and (out / output.STATE_DIR).is_dir() and _leftovers(tmp_path, out) == []


def test_a_run_that_claims_while_another_swaps_in_and_removes_the_old_output_is_refused(tmp_path, monkeypatch):
    from sparsify.checkpoint import atomic, output
    from sparsify.errors import SparsifyError

    probe = [tmp_path / "a", tmp_path / "b"]
    for d in probe:
        d.mkdir()
    if not atomic.renameat2(probe[0], probe[1], atomic.RENAME_EXCHANGE):
        pytest.skip("no renameat2 RENAME_EXCHANGE here")
    out = tmp_path / "out"
    out.mkdir()
    (out / output.REPORT_MARKER).write_text("{}")  # an earlier output, replaced with --overwrite
    target = output.check_output(out, [], None, True)
    remove_work, claims = output._remove_work, []

    def another_run_claims(folder):  # while the old output, swapped to .out.partial, is removed
        if folder == target.partial and not claims:
            claims.append("claimed")
            try:
                output._claim(target, True, False, [])  # it would have removed .out.partial, then made its own
            except SparsifyError as e:
                claims[0] = str(e)
        remove_work(folder)

    with output.partial_output(target, overwrite=True) as work:
        work.begin({"run": "first"}, True)
        (work.dir / output.REPORT_MARKER).write_text('{"new": true}')
        monkeypatch.setattr(output, "_remove_work", another_run_claims)
    assert len(claims) == 1 and "another sparsify run" in claims[0], claims
    assert (out / output.REPORT_MARKER).read_text() == '{"new": true}' and _leftovers(tmp_path, out) == []


def test_a_claim_makes_again_the_parent_folders_that_another_run_removed_as_it_ended(tmp_path, monkeypatch):
    from sparsify.checkpoint import output

    out = tmp_path / "new" / "deeper" / "out"
    target = output.check_output(out, [], None, False)
    sweep_new = output._sweep_new

    def other_run_ends(o, protect):  # it made new/deeper first and removed them as it ended, both empty
        (tmp_path / "new" / "deeper").rmdir()
        (tmp_path / "new").rmdir()
        sweep_new(o, protect)

    monkeypatch.setattr(output, "_sweep_new", other_run_ends)
    with pytest.raises(RuntimeError), output.partial_output(target):
        raise RuntimeError("this run fails too")
    assert not (tmp_path / "new").exists()  # made again by this run: removed as it ended
    (tmp_path / "new" / "deeper").mkdir(parents=True)  # the same again, for a run that succeeds
    with output.partial_output(target) as work:
        work.begin({"run": "second"}, False)
    assert out.is_dir() and not (out / output.STATE_DIR).exists()


@pytest.mark.slow
def test_an_unfinished_run_left_by_a_hard_death_is_kept_until_resumed_or_discarded(deep, tmp_path):
    out = tmp_path / "out"
    r = _fault("kill@2", "prune", deep, "-o", out, *PRUNE)
    assert r.returncode == -signal.SIGKILL
    assert _leftovers(tmp_path, out) == [".out.partial"] and not out.exists()
    assert_user_error(run("prune", deep, "-o", out, *PRUNE), None, "--resume", "--overwrite", "2 layers done")
    assert_user_error(
        run("prune", deep, "-o", out, "--method", "wanda", "--sparsity", "0.4", *FAST, "--resume"), None, "recipe"
    )
    r = run("prune", deep, "-o", out, *PRUNE, "--overwrite")  # discards it and starts over
    assert r.exit_code == 0, r.output
    assert _leftovers(tmp_path, out) == []


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.slow
def test_resume_after_a_kill_produces_the_same_bytes(deep, tmp_path):
    reference = tmp_path / "reference"
    assert run("prune", deep, "-o", reference, "--method", "sparsegpt", "--sparsity", "0.5", *FAST).exit_code == 0
    out = tmp_path / "out"
    args = ["prune", deep, "-o", out, "--method", "sparsegpt", "--sparsity", "0.5", *FAST]
    r = _fault("kill@2", *args)
    assert r.returncode == -signal.SIGKILL and not out.exists()
    r = _fault("run", *args, "--resume", "--json")  # a fresh process, as after a crash
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "sparsify_report.json").read_text())
    assert any(re.search(r"resumed at layer [12] of 4", n) for n in report["notes"]), report["notes"]  # see below
    assert [rec["layer"] for rec in report["layers"]] == sorted(rec["layer"] for rec in report["layers"])
    assert len(report["layers"]) == 4 * 7 and all(rec["rel_error"] is not None for rec in report["layers"])
    assert _weights(out) == _weights(reference)
    assert _leftovers(tmp_path, out) == []


def _kept(line: str, name: str, work: Path) -> tuple[int, list[str]]:
    """``(layers kept, the command's arguments after 'sparsify')`` of an interruption's line that kept work."""
    m = re.fullmatch(rf"interrupted \({name}\); (\d+) finished layers? kept in (.+); to continue, run: (.+)", line)
    assert m is not None and m[2] == str(work), line
    command = shlex.split(m[3])
    assert command[0] == "sparsify" and command.count("--resume") == 1, line
    return int(m[1]), command[1:]


@pytest.mark.slow
@pytest.mark.parametrize("first", [[], ["--resume"]], ids=["without-resume", "with-resume"])
def test_a_signal_keeps_finished_layers_and_the_command_it_names_continues(deep, tmp_path, first):
    """SIGTERM at layer 3 of 4 keeps the finished layers whether or not the run was given --resume, and its one
    line names the command that continues: the same command with --resume (once), which writes the bytes of a
    run never interrupted. A run without --resume is refused, the work kept (nothing lost silently)."""
    out = tmp_path / "my out"  # a space: the command is shell-quoted
    args = ["prune", str(deep), "-o", str(out), *PRUNE]
    r = _fault("sigterm@3", *args, *first)
    assert r.returncode == 143, r.stderr
    (line,) = _error_lines(r.stderr)
    # checkpoints are skipped when saving one costs more than ~10% of the run, so under load the last kept
    # one may be an earlier layer's: any count after 0 shows finished work was kept, and the resume starts there
    done, command = _kept(line, "SIGTERM", tmp_path / ".my out.partial")
    assert 1 <= done <= 3 and command == [*args, *first, *([] if first else ["--resume"])], line
    assert _leftovers(tmp_path, out) == [".my out.partial"]
    assert_user_error(run(*args), None, "--resume", "--overwrite", f"{done} layer")
    assert _leftovers(tmp_path, out) == [".my out.partial"]
    r = _fault("run", *command)
    assert r.returncode == 0, r.stderr
    notes = json.loads((out / "sparsify_report.json").read_text())["notes"]
    assert any(f"resumed at layer {done} of 4" in n for n in notes), notes
    reference = tmp_path / "reference"
    assert run("prune", deep, "-o", reference, *PRUNE).exit_code == 0
    assert _weights(out) == _weights(reference)
    assert _leftovers(tmp_path, out) == []


def _stop_at_layer(monkeypatch, layer: int, error) -> None:
    """Every layer-wise pass raises ``error()`` when it starts on ``layer`` (in this process)."""
    from sparsify.passes import PASSES

    for cls in {c for c in PASSES.values() if c.layerwise}:
        original = cls.compress_layer

        def compress_layer(self, work, _original=original):
            if work.index == layer:
                raise error()
            return _original(self, work)

        monkeypatch.setattr(cls, "compress_layer", compress_layer)


def test_a_stopped_run_keeps_its_finished_layers_unless_its_caller_cannot_resume(deep, tmp_path, monkeypatch):
    """In the library: a run stopped by a signal (Interrupted) or by another torchrun rank's end (PeerLost) once it
    finished a layer keeps its layers in the work folder, given resume or not, and the Interrupted says where and
    how many; one stopped in its first layer, or by an error, or with keep_interrupted off (the demo,
    which has no --resume) unless given resume, keeps nothing."""
    from sparsify.checkpoint.stage_state import StageState
    from sparsify.distributed import PeerLost
    from sparsify.interrupts import Interrupted
    from sparsify.pipeline import Options
    from sparsify.recipe import parse_recipe
    from tests.zoo import compress

    step = {"type": "prune", "method": "wanda", "sparsity": 0.5}
    recipe = parse_recipe({"calibration": {"samples": 4, "seq_len": 32}, "passes": [step]})
    out, work = tmp_path / "out", str(tmp_path / ".out.partial")
    plain, replace = Options(evaluate=False), Options(evaluate=False, overwrite=True)

    def stopped(at: int, error, opts: Options) -> BaseException:
        _stop_at_layer(monkeypatch, at, error)
        with pytest.raises(BaseException) as e:
            compress(deep, recipe, out, opts)
        assert not out.exists()
        return e.value

    e = stopped(2, lambda: Interrupted(signal.SIGINT), plain)
    assert e.kept == work and e.finished is None and not out.exists()
    assert e.kept_layers in (1, 2)  # 1: the checkpoint after layer 1 skipped (slow)
    assert _leftovers(tmp_path, out) == [".out.partial"]
    demo = Options(evaluate=False, overwrite=True, keep_interrupted=False)  # the demo's (it replaces its output)
    e = stopped(2, lambda: Interrupted(signal.SIGINT), demo)
    assert e.kept is None and _leftovers(tmp_path, out) == []
    e = stopped(2, lambda: Interrupted(signal.SIGINT), Options(resume=True, keep_interrupted=False))
    assert e.kept == work and _leftovers(tmp_path, out) == [".out.partial"]
    monkeypatch.undo()
    checkpoint = StageState.checkpoint

    def peer_lost(self, next_layer, *args):  # as _run_stages_with raises it when a collective fails
        checkpoint(self, next_layer, *args)
        raise PeerLost("torchrun: another rank ended")

    monkeypatch.setattr(StageState, "checkpoint", peer_lost)
    with pytest.raises(PeerLost) as lost:
        compress(deep, recipe, out, replace)
    assert _leftovers(tmp_path, out) == [".out.partial"] and not out.exists()
    from sparsify.cli.errors import _kept_after_peer

    assert lost.value.kept == work  # and the rank's line names it and the command (it said neither)
    assert _kept_after_peer(lost.value) == (
        f"; finished layers kept in {work}: run the same torchrun command with --resume to continue"
    )
    monkeypatch.undo()
    e = stopped(2, lambda: RuntimeError("a failure"), replace)
    assert isinstance(e, RuntimeError) and _leftovers(tmp_path, out) == []
    e = stopped(0, lambda: Interrupted(signal.SIGTERM), plain)
    assert e.kept is None and e.kept_layers is None and _leftovers(tmp_path, out) == []


def test_resume_with_nothing_to_resume_just_runs(model_dir, tmp_path):
    r = run("prune", model_dir("llama"), "-o", tmp_path / "out", *PRUNE, "--resume", "--json")
    assert r.exit_code == 0 and not any("resumed" in n for n in json.loads(r.stdout)["notes"])


# ------------------------------------------------------------------------------------------ signals


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "code", "name"), [("sigterm@0", 143, "SIGTERM"), ("del@0", 130, "SIGINT")])
def test_signals_stop_the_run_clean_up_and_exit_with_the_signal_code(deep, tmp_path, fault, code, name):
    """Stopped in its first layer (nothing finished, nothing worth keeping): everything goes, parents included."""
    out = tmp_path / "sub" / "out"
    before = _tree(deep)
    r = _fault(fault, "prune", deep, "-o", out, *PRUNE)
    assert r.returncode == code, r.stderr
    assert _error_lines(r.stderr) == [f"interrupted ({name}); no output was written"], r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr
    assert not (tmp_path / "sub").exists()
    assert _tree(deep) == before


@pytest.mark.slow
def test_signals_while_exporting_gguf_leave_the_file_whole_or_absent(model_dir, tmp_path):
    """A real signal (a fresh process, tests/faults.py) in the middle and at the very end: the exit code of the
    signal, one line that says whether the file was written, and no temporary file either way."""
    pytest.importorskip("gguf")
    from gguf import GGUFReader

    src = model_dir("llama")
    probe = _fault("count", "export", "gguf", src, "-o", tmp_path / "probe.gguf")
    assert probe.returncode == 0, probe.stderr
    total = int(probe.stderr.rsplit("calls=", 1)[1].split()[0])
    for at, name, code, done in ((total - 100, "SIGINT", 130, False), (total - 2, "SIGTERM", 143, True)):
        out = tmp_path / f"at{at}.gguf"  # at total - 100 calls the tensors are being written; at total - 2, done
        r = _fault(f"{name}@{at}", "export", "gguf", src, "-o", out)
        assert r.returncode == code and out.exists() == done, r.stderr
        written = f"interrupted ({name}) after {out} was written"
        assert _error_lines(r.stderr) == [written if done else f"interrupted ({name}); no output was written"]
        if done:
            assert len(GGUFReader(out).tensors) == 21
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_fault_injection_at_random_points(deep, tmp_path):
    """SIGINT, SIGTERM and SIGHUP at random calls into sparsify, and exceptions raised inside a pass:
    every time the input is intact, OUT is absent or complete, the exit is non-zero, and nothing is left beside
    OUT but, after a signal once a layer was finished, the work folder with those layers, which the command the
    line names finishes to the bytes of a run never interrupted."""
    probe = _fault("count", "prune", deep, "-o", tmp_path / "probe", *PRUNE)
    assert probe.returncode == 0, probe.stderr
    total = int(probe.stderr.rsplit("calls=", 1)[1].split()[0])
    rng = random.Random(0)
    signals = ("SIGINT", "SIGTERM", "SIGHUP")
    strata = 3  # one random point in each third of the run: import and load, the loop, assembly and rename
    faults = [
        f"{signals[i % 3]}@{rng.randint(total * i // strata + 1, total * (i + 1) // strata)}" for i in range(strata)
    ]
    faults += [f"{signals[k % 3]}@{total - k}" for k in (1, 16)]  # after the rename; around the report
    faults += ["raise@3"]
    before = _tree(deep)
    finished = kept = 0
    for i, fault in enumerate(faults):
        parent = tmp_path / f"run{i}"
        out = parent / "nested" / "out"
        r = _fault(fault, "prune", deep, "-o", out, *PRUNE)
        assert r.returncode != 0, (fault, r.stderr)
        if fault.startswith("SIG"):
            assert r.returncode == 128 + getattr(signal, fault.split("@")[0]), (fault, r.stderr)
        assert len(_error_lines(r.stderr)) == 1 and "Traceback" not in r.stderr, (fault, r.stderr)
        assert _tree(deep) == before, fault
        if out.exists():  # interrupted after the rename: complete
            finished += 1
            assert "after" in _error_lines(r.stderr)[0], fault
            assert (out / "sparsify_report.json").is_file() and (out / "model.safetensors").is_file()
            assert _leftovers(out.parent, out) == [], fault
        elif "kept in" in r.stderr:  # a signal after a layer was finished: kept, and the line says how to go on
            kept += 1
            name = fault.split("@")[0]
            _, command = _kept(_error_lines(r.stderr)[0], name, out.parent / ".out.partial")
            assert [p.name for p in parent.rglob("*") if ".out.partial" not in str(p)] == ["nested"], fault
            r = _fault("run", *command)
            assert r.returncode == 0, (fault, r.stderr)
            assert _weights(out) == _weights(tmp_path / "probe") and _leftovers(out.parent, out) == [], fault
        else:
            assert not parent.exists() or not any(parent.iterdir()), (fault, list(parent.rglob("*")))
    assert 0 < finished < len(faults) and kept > 0  # every outcome was exercised


# ------------------------------------------------------------------------------------------ one line


@pytest.mark.parametrize(
    "args",
    [
        ["--samples", "0"],
        ["--seq-len", "0"],
        ["--method", "nope"],
        ["--no-such-flag"],
    ],
)
def test_flag_errors_are_one_line(model_dir, tmp_path, args):
    r = run("prune", model_dir("llama"), "-o", tmp_path / "out", "--sparsity", "0.5", *args)
    assert r.exit_code == 2
    assert_user_error(r, tmp_path / "out")
    assert "Usage" not in r.output


def test_missing_output_flag_is_one_line(model_dir):
    r = run("prune", model_dir("llama"), "--sparsity", "0.5")
    assert r.exit_code == 2 and "--output" in r.stderr
    assert_user_error(r, None)


def test_no_arguments_still_show_help():
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, [])
    assert "Usage" in r.output and "prune" in r.output


def test_help_exits_zero():
    r = run("prune", "--help")
    assert r.exit_code == 0 and "--resume" in r.stdout


def test_the_line_of_an_interruption_that_kept_work_names_the_command_that_continues(capsys, monkeypatch):
    """The user's command line with --resume appended once (before a "--"), shell-quoted, as ``sparsify ...``
    however it was started, never cut; under torchrun the same torchrun command with --resume."""
    from sparsify.cli.errors import _interrupted
    from sparsify.interrupts import Interrupted

    def line(*argv: str, layers: int | None = 5, world: str = "1") -> str:
        monkeypatch.setattr(sys, "argv", list(argv))
        monkeypatch.setenv("WORLD_SIZE", world)
        e = Interrupted(signal.SIGINT)
        e.kept, e.kept_layers = "/w/.out.partial", layers
        assert _interrupted(e) == 130
        return capsys.readouterr().err.strip()

    head = "interrupted (SIGINT); 5 finished layers kept in /w/.out.partial; to continue, run"
    cmd = ["prune", "m", "-o", "out", "--method", "wanda"]
    assert line("/venv/bin/sparsify", *cmd) == f"{head}: sparsify prune m -o out --method wanda --resume"
    assert line("/src/sparsify/__main__.py", *cmd) == f"{head}: sparsify prune m -o out --method wanda --resume"
    assert line("sparsify", "prune", "my  model", "--resume", "-o", "o'ut") == (
        f"{head}: sparsify prune 'my  model' --resume -o 'o'\"'\"'ut'"
    )
    assert line("sparsify", "prune", "-o", "out", "--", "-m") == f"{head}: sparsify prune -o out --resume -- -m"
    deep = "/data/" + "d" * 700
    assert line("sparsify", "prune", deep, "-o", "out") == f"{head}: sparsify prune {deep} -o out --resume"
    assert line("sparsify", *cmd, layers=1, world="2") == (
        "interrupted (SIGINT); 1 finished layer kept in /w/.out.partial; to continue, run the same torchrun"
        " command with --resume: torchrun [its options] -m sparsify prune m -o out --method wanda --resume"
    )
    assert line("sparsify", "prune", "m\nx", "-o", "out") == f"{head} the same command with --resume"
    assert line("sparsify", *cmd, layers=None).startswith(
        "interrupted (SIGINT); its complete output kept in /w/.out.partial; to continue, run: sparsify prune"
    )


def test_interrupt_after_the_output_is_in_place_says_so(capsys):
    from sparsify.cli.errors import _interrupted
    from sparsify.interrupts import Interrupted

    e = Interrupted(signal.SIGHUP)
    e.finished = "OUT"
    assert _interrupted(e) == 129
    assert capsys.readouterr().err.strip() == "interrupted (SIGHUP) after OUT was written"


# ------------------------------------------------------------------------------- found by probing


@pytest.mark.parametrize("name", [".out.partial-new-mine", ".out.partial"])
def test_a_model_named_like_the_work_folder_is_never_deleted(model_dir, tmp_path, name):
    import shutil

    model = tmp_path / name
    shutil.copytree(model_dir("llama"), model)
    before = _tree(model)
    for extra in ([], ["--overwrite"], ["--resume"]):
        r = run("prune", model, "-o", tmp_path / "out", *PRUNE, *extra)
        assert_user_error(r, None, "work folder")
    assert _tree(model) == before


def test_a_stranger_folder_named_like_the_work_folder_is_left_alone(model_dir, tmp_path):
    stranger = tmp_path / ".out.partial"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert_user_error(run("prune", model_dir("llama"), "-o", tmp_path / "out", *PRUNE, *extra), None, "in the way")
    assert (stranger / "notes.txt").read_text() == "mine"
    half = tmp_path / ".out.partial-new-abc"  # a stranger's folder with the name of a half-made work folder
    half.mkdir()
    (half / "keep.txt").write_text("mine")
    stranger.rename(tmp_path / "elsewhere")
    assert run("prune", model_dir("llama"), "-o", tmp_path / "out", *PRUNE).exit_code == 0
    assert (half / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_overlapping_runs_with_overwrite_also_end_with_one_success(deep, tmp_path):
    """The work folder is locked from the start of a run, not only for its last steps. The first run holds at
    its first layer until the second has been refused (a gate file, not a timing)."""
    out = tmp_path / "out"
    gate = tmp_path / "gate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    held = [sys.executable, "-m", "tests.faults", f"gate@{gate}", "--", "prune", str(deep), "-o", str(out), *PRUNE]
    first = subprocess.Popen([*held, "--overwrite"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        while not (tmp_path / ".out.partial").exists():  # claimed: the first run holds the lock from here on
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        second = _fault(
            "run", "prune", deep, "-o", out, "--method", "magnitude", "--sparsity", "0.3", *FAST, "--overwrite"
        )
    finally:
        gate.touch()
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode == 1 and "another sparsify run" in second.stderr, second.stderr
    assert "wanda" in (out / "recipe.yaml").read_text()


def test_signals_while_starting_and_after_finishing_are_one_line(model_dir, tmp_path):
    """Before the command's handlers exist (imports) and after they are gone (interpreter shutdown)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "sparsify", "prune", str(model_dir("llama")), "-o", str(tmp_path / "o"), *PRUNE]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    import time

    time.sleep(0.3)  # importing torch and transformers
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip() == "interrupted (SIGTERM) no output was written", err
    late = (
        "import atexit, os, signal, time, sys; import sparsify.cli as c;"
        "c.main = lambda: print('done');"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(2)));"
        "from sparsify._entry import main; main()"
    )
    r = subprocess.run([sys.executable, "-c", late], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and r.stdout == "done\n", r
    assert r.stderr.strip() == "interrupted (SIGINT) after the command finished", r.stderr


def test_a_checkpoint_is_committed_by_its_progress_record(tmp_path):
    """The activations of a checkpoint go to a file of their own that the progress record then names: a run
    killed between the two writes resumes from the checkpoint before, its activations intact (never the new
    activations under the old layer number); the probe's windows and states travel with them."""
    import torch

    from sparsify.checkpoint.stage_state import StageState
    from sparsify.checkpoint.writer import save_tensors

    first = StageState(tmp_path / "stage", resumed=False)
    h2, d2, probe = (
        [torch.randn(2, 3, 4)],
        [torch.randn(2, 3, 4)],
        [(torch.arange(6).reshape(2, 3), torch.randn(2, 3, 4))],
    )
    first.checkpoint(2, h2, d2, probe)
    # the next checkpoint's activations written, the process killed before its progress record
    save_tensors({"hidden.0": torch.zeros(2, 3, 4)}, first.dir / "hidden-3.safetensors")
    layer, hidden, dense, saved = StageState(tmp_path / "stage", resumed=True).resume_point()
    assert layer == 2 and torch.equal(hidden[0], h2[0]) and torch.equal(dense[0], d2[0])
    assert torch.equal(saved[0][0], probe[0][0]) and torch.equal(saved[0][1], probe[0][1])
    first.checkpoint(3, [torch.ones(2, 3, 4)], None)  # committed: the older files go
    assert sorted(p.name for p in first.dir.glob("hidden*")) == ["hidden-3.safetensors"]
    layer, hidden, dense, saved = StageState(tmp_path / "stage", resumed=True).resume_point()
    assert layer == 3 and torch.equal(hidden[0], torch.ones(2, 3, 4)) and dense is None and saved is None


# ------------------------------------------------------------------------------- issue 31: a robustness probe


@pytest.mark.slow
def test_a_kill_between_finishing_and_the_rename_is_finished_by_resume(deep, tmp_path):
    """A hard death after the output is complete, before (or while) it is renamed into place: --resume renames it,
    --overwrite discards it; neither says the folder is not sparsify's."""
    reference = tmp_path / "reference"
    assert run("prune", deep, "-o", reference, *PRUNE).exit_code == 0
    out = tmp_path / "out"
    args = ["prune", deep, "-o", out, *PRUNE]
    r = _fault("killin@rename_noreplace#2", *args)  # the first claims the work folder, the second is the final one
    assert r.returncode == -signal.SIGKILL and not out.exists()
    assert _leftovers(tmp_path, out) == [".out.partial"]
    assert_user_error(run(*args), None, "complete", "--resume", "--overwrite")  # kept, not silently discarded
    r = run(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert _leftovers(tmp_path, out) == [] and not (out / ".sparsify-state").exists()
    assert _weights(out) == _weights(reference)
    T.AutoModelForCausalLM.from_pretrained(out)

    other = tmp_path / "other"
    assert _fault("killin@rename_noreplace#2", "prune", deep, "-o", other, *PRUNE).returncode == -signal.SIGKILL
    r = run("prune", deep, "-o", other, "--method", "magnitude", "--sparsity", "0.3", *FAST, "--overwrite")
    assert r.exit_code == 0, r.output
    assert "magnitude" in (other / "recipe.yaml").read_text() and _leftovers(tmp_path, other) == []

    # replacing with --overwrite: killed after the exchange, while the old output is removed
    r = _fault("killin@_remove_work", "prune", deep, "-o", out, "--method", "magnitude", "--sparsity", "0.3", *FAST,
               "--overwrite")  # fmt: skip
    assert r.returncode == -signal.SIGKILL and "magnitude" in (out / "recipe.yaml").read_text()
    assert not (out / ".sparsify-state").exists()
    r = run(*args, "--overwrite")  # the old output left beside OUT is discarded on the way
    assert r.exit_code == 0, r.output
    assert _leftovers(tmp_path, out) == []


def _flock_holders(folder: Path) -> set[int]:
    """The pids holding an flock on ``folder`` (Linux: /proc/locks)."""
    st = folder.stat()
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    lines = Path("/proc/locks").read_text().splitlines()
    return {int(f[4]) for line in lines if (f := line.split())[1] == "FLOCK" and f[5] == inode}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="needs /proc/locks")
def test_the_lock_refusal_names_the_live_holder_not_the_interrupted_run(deep, tmp_path):
    out = tmp_path / "out"
    args = ["prune", str(deep), "-o", str(out), *PRUNE]
    assert _fault("kill@2", *args).returncode == -signal.SIGKILL
    gate = tmp_path / "gate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    held = [sys.executable, "-m", "tests.faults", f"gate@{gate}", "--", *args, "--resume"]
    resumed = subprocess.Popen(held, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        while resumed.pid not in _flock_holders(tmp_path / ".out.partial"):  # it holds the work folder
            assert resumed.poll() is None, resumed.stderr.read()
            time.sleep(0.05)
        refused = run(*args, "--resume")
    finally:
        gate.touch()
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert_user_error(refused, None, f"another sparsify run (pid {resumed.pid}) is writing")


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A 4-layer Llama whose weight file is larger than 2 MiB (its middle is neither its first nor its last MiB)."""
    config = zoo.CONFIGS["llama"]()
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 256, 512, 4
    folder = tmp_path_factory.mktemp("wide") / "llama"
    T.LlamaForCausalLM(config).save_pretrained(folder)
    zoo.tokenizer().save_pretrained(folder)
    assert (folder / "model.safetensors").stat().st_size > 3 << 20
    return folder


@pytest.mark.slow
def test_a_weight_changed_between_the_kill_and_the_resume_is_refused(wide, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(wide, model)
    out = tmp_path / "out"
    args = ["prune", model, "-o", out, *PRUNE]
    assert _fault("kill@2", *args).returncode == -signal.SIGKILL
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of the file, in place
    weights.write_bytes(data)
    assert_user_error(run(*args, "--resume"), None, "another model", "model.safetensors changed")
    assert _leftovers(tmp_path, out) == [".out.partial"]  # kept for a resume with the right model
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(data)  # the same bytes again, written anew (touched, not changed): resumes
    r = run(*args, "--resume", "--json")
    assert r.exit_code == 0, r.output
    assert any("resumed at layer" in n for n in json.loads(r.stdout)["notes"])
