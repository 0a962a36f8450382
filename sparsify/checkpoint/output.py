"""The output folder: checked before any work, built beside it, renamed into place only when complete.

Rules (docs/guarantees.md says how each is tested):

- OUT may not be, contain, or sit inside the model folder, nor contain any file the run reads
  (through symlinks and ``..`` alike), nor be or contain the current folder. A symlink OUT is
  followed; a dangling one is refused.
- An existing OUT is replaced only with ``--overwrite``, and only if it is empty or an earlier sparsify
  output (it holds ``sparsify_report.json``): ``--overwrite`` never deletes someone else's folder.
- The work happens in ``.OUT.partial`` beside OUT, locked (``flock`` on the folder) for as long as the
  run lives: a second run into the same OUT is refused at once. At the end OUT is re-checked: one that
  appeared during the run is never replaced without ``--overwrite``. The rename is atomic
  (``renameat2`` NOREPLACE, or EXCHANGE when replacing, where the kernel has them). Before it, the state
  records that the output is complete: a hard death until the rename leaves a folder ``--resume`` renames
  into place and ``--overwrite`` discards.
- Every way a run can end cleans up (the partial folder and the parent folders it created), except
  a hard death (SIGKILL, OOM killer, power loss), whose ``.OUT.partial`` a later ``--resume`` continues,
  and a run stopped by a signal (SIGINT/SIGTERM/SIGHUP) or by another torchrun rank's end after it finished
  a layer, which keeps its finished layers there for ``--resume`` too, whether or not it was given
  ``--resume`` (unless ``keep_interrupted`` is off: the demo, which cannot resume).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsify import interrupts
from sparsify.checkpoint import atomic
from sparsify.checkpoint.atomic import rename_noreplace
from sparsify.checkpoint.stage_state import StageState
from sparsify.checkpoint.writer import write_json
from sparsify.errors import SparsifyError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; concurrent runs are not detected
    fcntl = None  # type: ignore[assignment]

STATE_DIR = ".sparsify-state"
REPORT_MARKER = "sparsify_report.json"  # what makes a folder an earlier sparsify output
FINISHED = "finished"  # in the state folder: the output around it is complete, only its rename into place is left
HOLDER = "holder.json"  # in the state folder: the pid of the run that holds the folder's lock now


@dataclass(frozen=True)
class OutputPath:
    """A checked output location."""

    path: Path  # resolved (symlinks followed)
    shown: str  # as the user wrote it, for messages

    @property
    def partial(self) -> Path:
        return self.path.parent / f".{self.path.name}.partial"


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(out: str | Path, reads: list[Path], model_dir: Path | None, overwrite: bool) -> OutputPath:
    """Refuse an output that could destroy input or someone else's folder; nothing is created."""
    shown = str(out)
    p = Path(out).expanduser()
    if p.is_symlink() and not p.exists():
        raise SparsifyError(f"output {shown} is a symlink to {os.readlink(p)}, which does not exist")
    r = p.resolve()
    if r.parent == r:
        raise SparsifyError(f"output {shown} is the filesystem root; choose a new folder")
    cwd = Path.cwd().resolve()
    if _is_within(cwd, r):
        what = "the current folder" if r == cwd else "a folder that contains the current folder"
        raise SparsifyError(f"output {shown} is {what}; choose a new folder")
    if model_dir is not None:
        m = model_dir.resolve()
        if _is_within(r, m):
            raise SparsifyError(f"output {shown} is the model folder or inside it; choose another folder")
        if _is_within(m, r):
            raise SparsifyError(f"output {shown} contains the model folder {model_dir}; choose another folder")
    work = r.parent / f".{r.name}.partial"
    for read in reads:
        rr = read.resolve()
        if _is_within(rr, r):
            raise SparsifyError(f"output {shown} contains {read}, which this run reads; choose another folder")
        if _is_within(rr, work) or (rr.parent == r.parent and rr.name.startswith(f".{r.name}.partial")):
            raise SparsifyError(f"{read} has the name of {shown}'s work folder; rename it or choose another output")
    if r.exists():
        if not r.is_dir():
            raise SparsifyError(f"{shown} exists and is not a folder")
        check_replaceable(r, shown)  # the user's files: --overwrite would not help, so it is not suggested
        if not overwrite:
            raise SparsifyError(f"{shown} exists; pass --overwrite to replace it")
    return OutputPath(r, shown)


def check_replaceable(folder: Path, shown: str) -> None:
    """Refuse a folder that is neither empty nor an earlier sparsify output: ``--overwrite`` replaces nothing else."""
    entries = sorted(p.name for p in folder.iterdir())
    if entries and REPORT_MARKER not in entries:
        held = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}, e.g. {entries[0]}"
        raise SparsifyError(
            f"{shown} holds your files and is not a sparsify output (no {REPORT_MARKER}; {held}): choose another"
            " folder (sparsify writes a new or empty folder, or replaces its own earlier output with --overwrite)"
        )


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing ancestors; return the ones created, outermost first."""
    missing = []
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        missing.append(p)
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _remove_parents(created: list[Path]) -> None:
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            break


def _lock(folder: Path) -> int | None:
    """An exclusive ``flock`` on the folder itself; the descriptor, or None if another process holds it."""
    if fcntl is None:
        return -1  # no advisory locks here: nothing held, nothing to close
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _lock_in_place(folder: Path) -> int | None:
    """:func:`_lock` of a folder another run may rename or remove at any moment (the lock is only good while the
    folder is still where it was looked at): FileNotFoundError where it went before the lock was taken, or while
    it was taken (its holder renamed it into place, or removed it, then let go: the descriptor would lock a folder
    that is no longer at ``folder``)."""
    fd = _lock(folder)  # FileNotFoundError where it is already gone
    if fd is None or fd < 0:
        return fd
    try:
        here, held = os.stat(folder), os.fstat(fd)
    except FileNotFoundError:
        os.close(fd)
        raise
    if (here.st_dev, here.st_ino) != (held.st_dev, held.st_ino):
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "moved or removed while it was locked", str(folder))
    return fd


@dataclass
class Partial:
    """The locked folder a run builds its output in; ``state`` holds what ``--resume`` needs."""

    dir: Path
    fd: int | None
    run_info: dict[str, Any]
    resumed: bool = False
    begun: bool = False
    finished: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def state(self) -> Path:
        return self.dir / STATE_DIR

    def stage(self, index: int) -> StageState:
        return StageState(self.state / f"stage-{index}", self.resumed)

    def progress(self) -> int:
        """Layers finished across stages (0: nothing worth keeping for a resume); a complete output counts."""
        done = 1 if self.output_complete else 0
        for d in self.state.glob("stage-*"):
            stage = StageState(d, True)
            done += stage.progress() or (1 if stage.complete else 0)
        return done

    @property
    def output_complete(self) -> bool:
        """Whether the folder holds a complete output: its run died (SIGKILL, power loss) between finishing and
        the rename into place, which is all that is left to do."""
        return (self.state / FINISHED).is_file()

    @property
    def complete(self) -> bool:
        """A resumed folder whose output is complete (see :attr:`output_complete`)."""
        return self.resumed and self.output_complete

    def report(self) -> dict[str, Any]:
        """The report of the output in the folder (a complete one's)."""
        return json.loads((self.dir / REPORT_MARKER).read_text())

    def recorded_files(self) -> dict[str, dict[str, Any]] | None:
        """The model files' stamps and digests a resumed folder's run recorded (its files unchanged are not
        hashed again)."""
        files = (_read_run_info(self.dir) or {}).get("model_files") if self.resumed else None
        return files if isinstance(files, dict) else None

    def hold(self) -> None:
        """Record this process as the lock's holder (what a run refused by the lock is told)."""
        write_json(self.state / HOLDER, {"pid": os.getpid()})

    # ------------------------------------------------------------------ ending

    def begin(self, run_info: dict[str, Any], overwrite: bool) -> None:
        """This run's identity: recorded in a new folder; compared with a resumed one's (a mismatch is refused,
        or with ``overwrite`` the old state is discarded)."""
        info = {**run_info, "pid": os.getpid()}
        if self.resumed:
            old = _read_run_info(self.dir)
            diff = _differences(old, info) if old is not None else []
            if old is not None and not diff:  # recorded again: this pid, the files' stamps as they are now
                write_json(self.state / "run.json", info)
                self.run_info = info
                self.begun = True
                return
            if old is not None and not overwrite:
                changed = _changed_files(old.get("model_files"), info.get("model_files")) if "model" in diff else ""
                raise SparsifyError(
                    f"{self.dir} holds an unfinished run with another {', '.join(diff)}{changed}; resume it with the"
                    " same model, recipe and settings, or pass --overwrite to discard it"
                )
            shutil.rmtree(self.state, ignore_errors=True)
            for child in self.dir.iterdir():  # shards an earlier assembly finished
                if child.is_file():
                    child.unlink()
            self.state.mkdir()
            self.hold()
            self.resumed = False
        write_json(self.state / "run.json", info)
        self.run_info = info
        self.begun = True

    def release(self) -> None:
        if self.fd is not None and self.fd >= 0:
            os.close(self.fd)
        self.fd = None

    def discard(self) -> None:
        _remove_work(self.dir)
        self.release()

    def finish(self, out: OutputPath, overwrite: bool) -> None:
        """Rename into place: never onto an OUT that appeared without ``overwrite``; atomically where possible."""
        try:
            self._rename_into_place(out, overwrite)
        except OSError as e:
            raise SparsifyError(f"cannot move the finished output to {out.shown}: {e.strerror or e}") from e
        _sweep_followers(out)

    def _settle(self) -> None:
        """Mark the output complete, then remove the state only a resume of the layers needed (most of the state's
        bytes): a hard death from here to the rename leaves a folder that ``--resume`` renames into place and
        ``--overwrite`` discards."""
        write_json(self.state / FINISHED, {"finished": True})
        for child in self.state.iterdir():
            if child.name not in (FINISHED, HOLDER, "run.json"):
                _remove(child)

    def _rename_into_place(self, out: OutputPath, overwrite: bool) -> None:
        with interrupts.deferred():
            self._settle()
            dst = out.path
            if not (dst.exists() or dst.is_symlink()) and rename_noreplace(self.dir, dst):
                self.finished = True
                shutil.rmtree(dst / STATE_DIR, ignore_errors=True)  # a few bytes: a death before it leaves them
                return
            if not overwrite:
                raise SparsifyError(f"{out.shown} appeared during the run; it is not replaced without --overwrite")
            if not dst.is_dir() or dst.is_symlink():
                raise SparsifyError(f"{out.shown} appeared during the run and is not a folder; not replaced")
            check_replaceable(dst, out.shown)
            # The old output, locked before the swap brings it to the work folder's name: until it is removed
            # there, another run into OUT is told that this one is still writing (it is), and it neither mistakes
            # it for a user's folder nor discards it at the same time.
            old_lock = _lock(dst)
            try:
                swapped = atomic.renameat2(self.dir, dst, atomic.RENAME_EXCHANGE)
                if swapped:
                    self.finished = True
                    # The work folder now holds the old output: marked ours (not complete) before it is removed, so
                    # that a hard death while removing it leaves a folder the next run discards.
                    (self.state / FINISHED).unlink(missing_ok=True)
                    self.state.mkdir(exist_ok=True)
                    shutil.rmtree(dst / STATE_DIR, ignore_errors=True)
                    _remove_work(self.dir)
                    return
            finally:
                Partial(dst, old_lock, {}).release()
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            os.rename(dst, old)
            try:
                os.rename(self.dir, dst)
            except BaseException:
                os.rename(old, dst)
                raise
            self.finished = True
            shutil.rmtree(dst / STATE_DIR, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)


def _read_run_info(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / STATE_DIR / "run.json").read_text())
    except (OSError, ValueError):
        return None


NOT_COMPARED = ("pid", "started", "model_files")  # who ran, when, and the model files' stamps (their digests are)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if k not in NOT_COMPARED and old.get(k) != new.get(k)]


def _changed_files(old: Any, new: Any) -> str:
    """`` (model.safetensors changed since)``: the weight files whose bytes differ from the interrupted run's."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ""
    digests = [{name: (s or {}).get("sha256") for name, s in d.items()} for d in (old, new)]
    changed = sorted(n for n in set(old) | set(new) if digests[0].get(n) != digests[1].get(n))
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return f" ({', '.join(changed[:3])}{more} changed since it was interrupted)" if changed else ""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _remove_work(folder: Path) -> None:
    """Remove a work folder, its state last: a death midway leaves a folder still recognised as ours."""
    if folder.is_dir() and not folder.is_symlink():
        for child in folder.iterdir():
            if child.name != STATE_DIR:
                _remove(child)
    shutil.rmtree(folder, ignore_errors=True)


def _holder(folder: Path) -> int | None:
    """The pid of the live process holding the work folder's lock, where it recorded one."""
    try:
        pid = int(json.loads((folder / STATE_DIR / HOLDER).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)  # no such process: a holder that died before the next one wrote its pid
    except ProcessLookupError:
        return None
    except OSError:
        pass  # alive, another user's
    return pid


def _is_ours(folder: Path) -> bool:
    """A work folder sparsify made: it holds the state folder (user folders are never touched)."""
    return folder.is_dir() and not folder.is_symlink() and (folder / STATE_DIR).is_dir()


def _protected(folder: Path, protect: list[Path]) -> bool:
    r = folder.resolve()
    return any(_is_within(p.resolve(), r) or _is_within(r, p.resolve()) for p in protect)


def _sweep(out: OutputPath, pattern: str, protect: list[Path]) -> None:
    """Remove the work folders beside OUT matching ``pattern`` that are ours, unlocked and not an input."""
    for p in out.path.parent.glob(pattern):
        if not _is_ours(p) or _protected(p, protect):
            continue
        try:
            fd = _lock_in_place(p)
        except FileNotFoundError:  # its run renamed it into place or removed it since the listing: not stale
            continue
        if fd is not None:
            _remove_work(p)
            Partial(p, fd, {}).release()


def _sweep_followers(out: OutputPath) -> None:
    """Once OUT is in place: the scratch work of torchrun ranks but 0 that a killed job left beside it (their
    ``.OUT.rankN`` folders, kept for ``--resume`` until now); any still locked belongs to a rank still ending."""
    _sweep(out, f"..{out.path.name}.rank*.partial", [])


def _sweep_new(out: OutputPath, protect: list[Path]) -> None:
    """Remove half-created work folders of runs that died before claiming: unlocked, ours, not an input."""
    _sweep(out, f".{out.path.name}.partial-new-*", protect)


def _create(out: OutputPath, made: list[Path] | None = None) -> Partial | None:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.path.name}.partial-new-", dir=out.path.parent))
    except FileNotFoundError:
        if out.path.parent.is_dir():
            raise
        # Another run that made OUT's parent folders removed them as it ended (they were empty then): made again,
        # and counted as this run's to remove as it ends.
        again = _make_parents(out.path.parent)
        if made is not None:
            made[:] = sorted({*made, *again}, key=lambda d: len(d.parts))
        return None
    fd = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any folder we create
        fd = _lock(tmp)
        (tmp / STATE_DIR).mkdir()
        Partial(tmp, fd, {}).hold()
        if rename_noreplace(tmp, out.partial):
            return Partial(out.partial, fd, {})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        Partial(tmp, fd, {}).release()
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    Partial(tmp, fd, {}).release()
    return None


def _claim(
    out: OutputPath, overwrite: bool, resume: bool, protect: list[Path], made: list[Path] | None = None
) -> Partial:
    """Lock OUT's work folder for this run: a new one, or (``resume``) an unfinished run's, checked later.
    ``made``: the parent folders this run created (any it has to make again are added)."""
    _sweep_new(out, protect)
    for _ in range(5):
        existing = out.partial
        if not (existing.exists() or existing.is_symlink()):
            if not overwrite and (out.path.exists() or out.path.is_symlink()):  # the run whose folder it was is done
                raise SparsifyError(f"{out.shown} exists; pass --overwrite to replace it")
            created = _create(out, made)
            if created is not None:
                return created
            continue  # another run claimed it first: look at theirs
        # Another run may rename the folder into place or remove it at any moment until it is locked here: a folder
        # that went is looked at again, and one locked by its holder is that run's, whatever it holds right now
        # (it may be removing it, or have just swapped the old output in to remove it).
        if not existing.is_dir() or existing.is_symlink():
            if not (existing.exists() or existing.is_symlink()):
                continue
            raise SparsifyError(f"{existing} is in the way and is not a sparsify work folder; remove or rename it")
        try:
            fd = _lock_in_place(existing)
        except FileNotFoundError:
            continue
        if fd is None:
            holder = _holder(existing)
            pid = f" (pid {holder})" if holder is not None else ""
            raise SparsifyError(
                f"another sparsify run{pid} is writing {out.shown} (its work is in {existing}); wait for it or"
                " choose another output"
            )
        if not _is_ours(existing):
            Partial(existing, fd, {}).release()
            raise SparsifyError(f"{existing} is in the way and is not a sparsify work folder; remove or rename it")
        partial = Partial(existing, fd, {})
        partial.hold()
        if resume:
            partial.resumed = True  # checked against this run in begin()
            return partial
        if overwrite or partial.progress() == 0:  # replaced on request, or nothing in it worth keeping
            partial.discard()
            continue
        done, complete = partial.progress(), partial.output_complete
        partial.release()
        if complete:
            raise SparsifyError(
                f"a run into {out.shown} was killed after its output was complete, before the rename: {existing}"
                " holds it; pass --resume to put it in place or --overwrite to discard it"
            )
        what = f"{done} layer{'s' if done != 1 else ''} done"
        raise SparsifyError(
            f"an unfinished run into {out.shown} left {existing} ({what}); pass --resume to continue it or"
            " --overwrite to discard it"
        )
    raise SparsifyError(f"could not claim {out.partial}: other runs keep creating it")


@contextlib.contextmanager
def partial_output(
    out: OutputPath,
    *,
    overwrite: bool = False,
    resume: bool = False,
    protect: list[Path] | None = None,
    keep_interrupted: bool = True,
) -> Iterator[Partial]:
    """Build the output in a locked work folder; rename it to OUT when the block completes.

    The folder is locked first, so a second run into OUT is refused from the start; the block calls
    ``work.begin(run_info)`` once it knows what the run is (a resumed run is checked against it there).
    On any exception the work folder and the parent folders created for OUT are removed, except that
    an interruption by signal (or an exception marked ``keep_partial``) after a layer was finished keeps the
    finished layers for the next ``--resume``, whether or not this run was given ``resume`` (unless
    ``keep_interrupted`` is off and ``resume`` not given: a caller whose runs cannot be resumed), and an unfinished run's folder that this run did not take over is
    left as it was. An :class:`~sparsify.interrupts.Interrupted` is told where its work was kept and how many
    layers (``kept``, ``kept_layers``), or that the output was already in place (``finished``).
    """
    created = _make_parents(out.path.parent)
    partial: Partial | None = None
    try:
        partial = _claim(out, overwrite, resume, protect or [], created)
        yield partial
        interrupts.check()
        partial.finish(out, overwrite)
    except BaseException as e:
        if partial is not None and partial.resumed and not partial.begun:  # someone else's work: untouched
            if isinstance(e, interrupts.Interrupted) and (done := partial.progress()) > 0:
                e.kept, e.kept_layers = str(partial.dir), None if partial.output_complete else done
            partial.release()
            raise
        with interrupts.deferred():
            finished = partial is not None and partial.finished
            stopped = isinstance(e, interrupts.Interrupted) or getattr(e, "keep_partial", False)
            wanted = stopped and (resume or keep_interrupted) and not finished
            done = partial.progress() if wanted and partial is not None else 0
            keep = done > 0  # a run stopped before it finished a layer has nothing worth keeping
            if isinstance(e, interrupts.Interrupted):
                e.finished = out.shown if finished else None
                if keep and partial is not None:
                    e.kept = str(partial.dir)
                    e.kept_layers = None if partial.output_complete else done
            elif keep and partial is not None:  # a refusal that keeps the work (another torchrun rank ended)
                e.kept = str(partial.dir)  # type: ignore[attr-defined]
            if partial is not None and not finished and not keep:
                partial.discard()
            if not finished and not keep:
                _remove_parents(created)
        raise
    finally:
        if partial is not None:
            partial.release()


def tensor_digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
