"""Crash-safe checkpoint files.

A run directory holds, besides logs and metrics, these files (all written by this module)::

    <run_dir>/
      step_00001000.pt            periodic snapshot at optimizer step 1000; only the newest `keep_last` are kept
      step_00001000.pt.sha256     sha256 of the file beside it, in `sha256sum` format
      latest.pt                   hard link to (or, where links are unsupported, a copy of) the newest step file;
      latest.pt.sha256            resume reads it first
      best.pt (+ .sha256)         best model by the monitored metric (CheckpointManager.save_named)
      ema_model.pt (+ .sha256)    EMA weights (CheckpointManager.save_named)
      .step_00002000.pt.tmp.<pid>.<hex>   a save in progress (or killed mid-way); hidden, never read,
                                  removed by the next save once its process is gone

Guarantees:

* Every write goes to a hidden temp file in the same directory, is fsync'ed, then `os.replace`d onto the real
  name and the directory is fsync'ed: a kill or power loss at any instant leaves the old file or the new one
  under the real name, never a partial one.
* The sha256 sidecar is written (atomically) *after* its checkpoint. torch's zip reader does not check the CRCs
  it stores (checked with torch 2.15: a bit flip inside tensor data loads silently), so the sidecar is what
  catches silent corruption; truncation is caught by the sidecar and by the zip reader alike. For the manager's
  files a missing sidecar means the save was interrupted before it completed: the file is treated as incomplete.
* Loading uses `torch.load(weights_only=True)`: a checkpoint is data (tensors, dicts, lists, tuples, scalars,
  strings, OrderedDict, sets, torch dtypes/devices), never code. A state holding anything else
  (a numpy scalar, a deque, a custom object) is rejected when *saving*, so a run never writes checkpoints it
  cannot resume from. Anything needing another global is refused as a security risk.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import io
import logging
import os
import pickle
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from utils.storage.atomic import TEMP_NAME_RE, atomic_torch_save, atomic_write_text, fsync_dir, temp_path_for
from utils.storage.snapshot import Snapshotter

log = logging.getLogger(__name__)

LATEST_NAME = "latest.pt"
SIDECAR_SUFFIX = ".sha256"
_STEP_RE = re.compile(r"^step_(\d{8,})\.pt$")
# Messages of torch's weights-only unpickler that mean "this file asks for something not allowed" (as opposed
# to "these bytes are garbage", e.g. "Unsupported operand", which is corruption).
_REFUSAL_RE = re.compile(r"GLOBAL|unrecognized function|Can only |must be imported to load")

# AdamW, LambdaLR, AveragedModel and GradScaler state dicts load under weights_only with torch's default
# allow-list (checked in tests/test_checkpoint.py), so no `torch.serialization.add_safe_globals` is needed.
# collections.deque cannot be allow-listed (its pickle extends a non-list, which the safe loader rejects):
# callers store list(d) instead; `_check_loadable` catches such things when saving, not at resume.


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file, the problem and the fix."""


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _write_sidecar(path: Path, digest: str) -> None:
    atomic_write_text(_sidecar_path(path), f"{digest}  {path.name}\n")  # `sha256sum -c` format


_CONTAINERS = (dict, collections.OrderedDict, list, tuple, set)
_SAFE_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)


def _check_loadable(obj: Any, path: Path) -> None:
    """Raise CheckpointError if `obj` holds something `torch.load(weights_only=True)` would refuse.

    Containers and common leaves are checked by type (fast); anything unusual is round-tripped through the safe
    loader in memory, so this agrees with the loader instead of guessing.
    """
    bad: list[str] = []

    def visit(x: Any, where: str) -> None:
        if type(x) in _CONTAINERS:
            items = x.items() if isinstance(x, dict) else enumerate(x)
            for k, v in items:
                if isinstance(x, dict):
                    visit(k, f"{where} key {k!r}")
                visit(v, f"{where}[{k!r}]")
        elif type(x) in _SAFE_LEAVES or type(x) in (torch.Tensor, torch.nn.Parameter):
            return
        else:
            buf = io.BytesIO()
            try:
                torch.save(x, buf)
                buf.seek(0)
                torch.load(buf, weights_only=True)
            except Exception:  # noqa: BLE001 - any failure means "cannot be checkpointed"; reported below
                bad.append(f"{where} ({type(x).__module__}.{type(x).__qualname__})")

    visit(obj, "state")
    if bad:
        shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise CheckpointError(
            f"Cannot save checkpoint {path}: {shown} could not be loaded back safely (weights_only). "
            f"Checkpoints may hold only tensors, dicts, lists, tuples, sets and str/int/float/bool/None. "
            f"Fix: convert these before saving (list(deque), float(np_scalar), tensor or plain python for numpy "
            f"arrays/RNG state, obj.state_dict() for objects)."
        )


class DiskFullError(CheckpointError):
    """Not enough free space for a checkpoint; nothing was written, the previous checkpoint is intact."""


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a state of nested mappings, lists, tuples and sets."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from tensors_in(v)


def _bytes_needed(obj: Any) -> int:
    """About what torch.save of `obj` writes: its tensors' storages (each once) plus a margin for the rest."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors_in(obj)}
    return (1 << 20) + sum(storages.values())


def _disk_full(path: Path, needed: int) -> DiskFullError:
    free = shutil.disk_usage(path.parent).free
    return DiskFullError(
        f"Out of disk space: {path.name} needs about {needed / 2**20:.1f} MiB in {path.parent}, and "
        f"{free / 2**20:.1f} MiB are free. Nothing was written; the previous checkpoint is intact. Fix: free some "
        "space (or move paths.root to a larger disk), then run the same command again to resume."
    )


def _is_out_of_space(err: BaseException, path: Path, needed: int) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch's zip writer reports a failed write as "[enforce fail ...] unexpected pos ..." (the OSError is lost)
    return shutil.disk_usage(path.parent).free < needed


def save_with_sidecar(obj: Any, path: Path, *, before_replace: Callable[[Path], None] | None = None) -> str:
    """torch.save `obj` to `path` atomically, then its `<path>.sha256` sidecar (also atomically); returns the digest.

    Refuses (CheckpointError, before writing anything) a state `torch.load(weights_only=True)` could not read,
    and one that does not fit on the disk (DiskFullError; checked before writing, and again if a write fails).
    `before_replace` (testing only): see `atomic_torch_save`.
    """
    path = Path(path)
    _check_loadable(obj, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    needed = _bytes_needed(obj)
    if shutil.disk_usage(path.parent).free < needed:
        raise _disk_full(path, needed)
    try:
        digest = atomic_torch_save(obj, path, before_replace=before_replace)
        _write_sidecar(path, digest)  # after the checkpoint: a sidecar never vouches for a file not yet in place
    except (OSError, RuntimeError) as err:
        if _is_out_of_space(err, path, needed):
            raise _disk_full(path, needed) from err
        raise
    return digest


# ----------------------------------------------------------------------------------------------------- loading
def _read_sidecar(path: Path) -> str | None:
    sidecar = _sidecar_path(path)
    try:
        text = sidecar.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"Checkpoint {path}: its checksum file {sidecar.name} cannot be read ({e}). "
            f"Fix: delete {path} and {sidecar.name}, or restore both from a backup."
        ) from e
    digest = text.split()[0].lower() if text.split() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise CheckpointError(
            f"Checkpoint {path}: its checksum file {sidecar.name} is corrupt or truncated (no sha256 in it). "
            f"Fix: delete {path} and {sidecar.name}, or restore both from a backup."
        )
    return digest


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", *, require_digest: bool = False
) -> dict:
    """Load a checkpoint written by this module, verifying its sha256 sidecar when there is one.

    `require_digest=True` (what CheckpointManager uses) treats a missing sidecar as an incomplete save.
    Raises CheckpointError for missing, incomplete, corrupt/truncated or refused (unsafe) files.
    """
    path = Path(path)
    fix_corrupt = f"Fix: delete {path} (and {path.name}{SIDECAR_SUFFIX}) and resume from an older checkpoint."
    expected = _read_sidecar(path)
    if expected is None and require_digest and path.exists():
        raise CheckpointError(
            f"Checkpoint {path} is incomplete: its checksum file {path.name}{SIDECAR_SUFFIX} is missing, so the "
            f"save was interrupted (or the file was copied without it). {fix_corrupt}"
        )
    try:
        f = open(path, "rb")
    except FileNotFoundError as e:
        raise CheckpointError(f"Checkpoint {path} does not exist. Fix: check the path / run directory.") from e
    except OSError as e:
        raise CheckpointError(f"Checkpoint {path} cannot be opened ({e}). Fix: check its permissions.") from e
    # One open file for hashing and loading: a concurrent replace cannot slip a different file in between.
    with f:
        if expected is not None:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
            if actual != expected:
                raise CheckpointError(
                    f"Checkpoint {path} is corrupt or truncated: its sha256 {actual[:16]}... does not match "
                    f"{path.name}{SIDECAR_SUFFIX} ({expected[:16]}...). {fix_corrupt}"
                )
            f.seek(0)
        try:
            obj = torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            reason = next((ln.strip() for ln in str(e).splitlines() if _REFUSAL_RE.search(ln)), None)
            if reason is not None:
                raise CheckpointError(
                    f"Checkpoint {path} was refused for security: loading it would require importing or calling "
                    f"code ({reason}). Only checkpoints written by this launcher (tensors, dicts, lists, tuples, "
                    f"numbers, strings) can be loaded. Fix: do not load files from untrusted sources; re-export "
                    f"the weights as a plain state_dict."
                ) from e
            raise CheckpointError(f"Checkpoint {path} is corrupt or truncated ({e}). {fix_corrupt}") from e
        # torch.load on damaged bytes fails in many ways (RuntimeError from the zip reader, EOFError, KeyError,
        # struct.error, ...); all mean the file is unusable. The cause is kept in the message.
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"Checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}). {fix_corrupt}"
            ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"Checkpoint {path} holds a {type(obj).__name__}, not a dict: it was not written by this launcher. "
            f"Fix: point the run at a directory of this launcher's checkpoints."
        )
    return obj


def assert_finite_state(state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointError if a floating/complex tensor holds NaN or Inf: such weights must never be saved."""
    bad = [
        name
        for name, t in state_dict.items()
        if isinstance(t, torch.Tensor)
        and (t.is_floating_point() or t.is_complex())
        and not bool(torch.isfinite(t).all())
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise CheckpointError(
            f"Refusing to save {what}: non-finite values (NaN/Inf) in {shown}. The previous checkpoint is kept. "
            f"Fix: lower the learning rate, enable gradient clipping, or use bf16/fp32 instead of fp16."
        )


# ----------------------------------------------------------------------------------------------------- manager
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass(eq=False)  # compared by identity
class _DeferredCopy:
    """A save whose deferred tensors a background thread is copying; its write waits for `intact`."""

    kind: str
    what: str  # for messages: "step 1200" or the file name
    snapshotter: Snapshotter
    copied: Future
    intact: Future = field(default_factory=Future)  # True: write it; False: a deferred tensor changed meanwhile


MAX_WRITER_NICE = 19  # nice values run to 19; the writer's is added to the process's, so 0..19


def _lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value by ``nice``: on Linux a nice value belongs to a thread (setpriority on
    a thread id), so the writer yields the cores to the training thread and the copy thread, which stay at the
    process's priority. Elsewhere, or where it is refused, the writer keeps the process's priority."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError as err:
        log.debug("checkpoint writer keeps the process's priority: %s", err)


class CheckpointManager:
    """Periodic `step_XXXXXXXX.pt` snapshots + `latest.pt` + named files in one directory (single writer).

    With `async_save=True`, `save` and `save_named` copy the state to host memory (`utils.storage.snapshot`)
    and return; one background thread writes the copies in the order they were made, with every guarantee of
    a direct save (atomic rename, digest, latest.pt, pruning, the finite and loadable checks on the copy). A
    new save of a file first waits for the previous save of that file (its host buffers are reused), so at
    most one copy per file is in flight. A write that failed raises its error, unchanged, from the next call
    of this manager (`save`, `save_named`, `discard`, `load_latest`, `wait`, `close`). `wait()` returns once
    every write is on disk; a process must call it (or `close`) before it reports a checkpoint as saved.
    """

    def __init__(self, directory: Path | str, keep_last: int = 3, *, async_save: bool = False,
                 writer_nice: int = 0) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if not 0 <= writer_nice <= MAX_WRITER_NICE:
            raise ValueError(f"writer_nice must be in 0..{MAX_WRITER_NICE}, got {writer_nice}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.async_save = async_save
        self.writer_nice = writer_nice
        # Testing only: called in the writer with a complete temp file before it is renamed (a test holds it).
        self.before_replace: Callable[[Path], None] | None = None
        self.last_write_s: dict[str, float] = {}  # per file kind ("step" or a name): seconds of the last write
        self.last_wait_s = 0.0  # seconds the last save waited for the previous write of its file
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: dict[str, Future] = {}  # file kind -> its newest write
        self._snapshotters: dict[str, Snapshotter] = {}
        self._copier: ThreadPoolExecutor | None = None  # deferred copies (save's `defer`)
        self._pending: list[_DeferredCopy] = []  # deferred copies not yet checked by wait_for_snapshots
        self.last_snapshot_wait_s = 0.0  # seconds the last wait_for_snapshots() that had a copy to wait for took

    @property
    def latest_path(self) -> Path:
        return self.directory / LATEST_NAME

    def step_path(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}.pt"

    # ------------------------------------------------------------------ writing
    def save(
        self,
        state: dict,
        step: int,
        *,
        finite: Mapping[str, str] | None = None,
        defer: Callable[[torch.Tensor], bool] | None = None,
    ) -> Path:
        """Write `step_{step:08d}.pt`, point `latest.pt` at it, prune old step files. Returns the step file.

        `finite` maps top-level keys of `state` to what they are ("model" -> "model weights"): a NaN/Inf in
        them refuses the save (CheckpointError, see assert_finite_state); with async_save this is checked on
        the copy, in the writer. With async_save the file is on disk once `wait()` returns.

        `defer` (async_save only): tensors it is true for are copied by a background thread after this
        returns, so the copy overlaps whatever the caller does next; the caller must call
        `wait_for_snapshots()` before it changes any of them (the trainer: before its optimizer step).
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self._submit("step", self._write_step, state, step, finite or {}, defer=defer)
        return self.step_path(step)

    def _write_step(self, state: dict, step: int, finite: Mapping[str, str]) -> None:
        for key, what in finite.items():
            assert_finite_state(state[key], what)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp_files()
        path = self.step_path(step)
        digest = save_with_sidecar(state, path, before_replace=self.before_replace)
        self._point_latest_at(path, digest)
        self._prune(protect=path)
        log.info("Saved checkpoint %s", path)

    # ------------------------------------------------------------------ the background writer
    def _submit(
        self, kind: str, write: Callable[..., None], state: Any, *args: Any,
        defer: Callable[[torch.Tensor], bool] | None = None,
    ) -> None:
        """Run `write(state, *args)` now, or (async_save) on a host copy of `state` in the writer thread."""
        self._raise_failed()
        if not self.async_save:
            start = time.perf_counter()
            write(state, *args)
            self.last_write_s[kind] = time.perf_counter() - start
            return
        self.wait_for_snapshots(kind)  # the previous write of this file may wait for that verdict
        previous = self._in_flight.get(kind)
        start = time.perf_counter()
        if previous is not None:
            try:
                previous.result()  # its buffers are about to be reused; its error is raised here, once
            except Exception:
                del self._in_flight[kind]
                raise
        self.last_wait_s = time.perf_counter() - start
        snapshotter = self._snapshotters.setdefault(kind, Snapshotter())
        snapshot = snapshotter.copy(state, defer=defer)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer",
                                                initializer=_lower_thread_priority, initargs=(self.writer_nice,))
        pending: _DeferredCopy | None = None
        if defer is not None:
            # Its own thread: behind the writer's queue (another file still being written) the copy would start
            # late, and the caller's wait_for_snapshots() would wait for that write too.
            if self._copier is None:
                self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-copy")
            what = f"step {args[0]}" if kind == "step" else kind
            pending = _DeferredCopy(kind, what, snapshotter, self._copier.submit(snapshotter.copy_deferred))
            self._pending.append(pending)

        def timed() -> None:
            if pending is not None:
                pending.copied.result()  # a failed copy fails this write, reported like any write error
                if not pending.intact.result():  # set by wait_for_snapshots: something changed a tensor meanwhile
                    return
            t0 = time.perf_counter()
            write(snapshot, *args)
            self.last_write_s[kind] = time.perf_counter() - t0

        self._in_flight[kind] = self._executor.submit(timed)

    def wait_for_snapshots(self, kind: str | None = None) -> None:
        """Block until every deferred copy (`save(..., defer=...)`; of one file kind if given) is taken: after
        this the caller may change the tensors it deferred. A copy whose tensors were changed in place before
        it was taken is not written (a warning names them; they are copied at once from then on). Copy errors
        are raised by the write they belong to, not here."""
        waiting = [p for p in self._pending if kind is None or p.kind == kind]
        if not waiting:
            return
        start = time.perf_counter()
        for pending in waiting:
            if pending.copied.exception() is not None:  # waits
                pending.intact.set_result(True)  # the write raises the copy's error
                continue
            changed = pending.snapshotter.changed_deferred()
            if changed:
                log.warning(
                    "Checkpoint of %s not written: %s changed in place while it was being copied (after the save, "
                    "before the next optimizer step; a forward pass or hook that changes weights in place). "
                    "From now on they are copied before the save returns; trainer.checkpoint.overlap_copy=false "
                    "copies everything that way.", pending.what, ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
            pending.intact.set_result(not changed)
        self._pending = [p for p in self._pending if p not in waiting]
        self.last_snapshot_wait_s = time.perf_counter() - start

    def _raise_failed(self) -> None:
        """Raise the error of a write that has failed (without waiting for those still running)."""
        for kind, future in list(self._in_flight.items()):
            if future.done():
                del self._in_flight[kind]
                future.result()

    def wait(self) -> None:
        """Block until every background write is on disk; raise the first one's error if any failed."""
        self.wait_for_snapshots()
        first: BaseException | None = None
        for future in list(self._in_flight.values()):
            try:
                future.result()
            except Exception as e:  # noqa: BLE001 - a write's own error: kept, raised once all writes are done
                first = first or e
        self._in_flight.clear()
        if first is not None:
            raise first

    def close(self, *, raise_errors: bool = True) -> None:
        """`wait()`, then stop the writer thread (a later save starts a new one). With raise_errors=False (an
        error is already on its way out) a failed write is logged instead of raised."""
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 - logged when another error is already being raised
            if raise_errors:
                raise
            log.error("A background checkpoint write failed too: %s", e)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self._copier is not None:
                self._copier.shutdown(wait=True)
                self._copier = None

    def discard(self, step: int) -> Path | None:
        """Remove step `step`'s file (its weights turned out to diverge) and point `latest.pt` at the newest
        remaining step file; returns that file (None when none is left, and latest.pt is removed too)."""
        self.wait()  # its file may still be being written (async_save)
        path = self.step_path(step)
        path.unlink(missing_ok=True)
        _sidecar_path(path).unlink(missing_ok=True)
        remaining = self.checkpoints()
        if not remaining:
            self.latest_path.unlink(missing_ok=True)
            _sidecar_path(self.latest_path).unlink(missing_ok=True)
            return None
        newest = remaining[-1]
        digest = _read_sidecar(newest)
        if digest is not None:
            self._point_latest_at(newest, digest)
        return newest

    def save_named(self, name: str, state: dict, *, defer: Callable[[torch.Tensor], bool] | None = None) -> Path:
        """Atomically write one named file such as "best.pt" or "ema_model.pt" (with its sidecar); `defer` as
        for `save`."""
        if Path(name).name != name or name.startswith(".") or name == LATEST_NAME or _STEP_RE.match(name):
            raise ValueError(f"save_named: {name!r} must be a plain file name other than latest.pt / step_*.pt")
        path = self.directory / name
        self._submit(name, self._write_named, state, path, defer=defer)
        return path

    def _write_named(self, state: dict, path: Path) -> None:
        save_with_sidecar(state, path, before_replace=self.before_replace)

    def _point_latest_at(self, path: Path, digest: str) -> None:
        latest = self.latest_path
        tmp = temp_path_for(latest)
        try:
            try:
                os.link(path, tmp)  # no second copy of a possibly multi-GB file
            except OSError as e:  # filesystems without hard links (some FUSE/SMB mounts): copy instead
                log.debug("Hard link %s -> %s failed (%s); copying", path, tmp, e)
                shutil.copyfile(path, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, latest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.directory)
        # Killed right here, latest.pt is new and its sidecar old: it fails verification and resume falls back
        # to the newest step file, which is complete.
        _write_sidecar(latest, digest)

    def _prune(self, protect: Path) -> None:
        latest = self.latest_path
        for old in self.checkpoints()[: -self.keep_last]:
            if old == protect or (latest.exists() and os.path.samefile(old, latest)):
                continue
            old.unlink(missing_ok=True)  # checkpoint first: an orphaned sidecar is harmless, the reverse is not
            _sidecar_path(old).unlink(missing_ok=True)
        for sidecar in self.directory.glob(f"step_*.pt{SIDECAR_SUFFIX}"):  # orphans of an interrupted prune
            if not sidecar.with_name(sidecar.name[: -len(SIDECAR_SUFFIX)]).exists():
                sidecar.unlink(missing_ok=True)

    def _remove_stale_temp_files(self) -> None:
        # Temp files of killed saves; those of a live process (another save in flight) are left alone.
        for entry in self.directory.iterdir():
            m = TEMP_NAME_RE.match(entry.name)
            if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                entry.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading
    def checkpoints(self) -> list[Path]:
        """Step files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict, Path] | None:
        """Load the newest readable checkpoint: latest.pt (or a newer step file), then step files newest first.

        Returns (state, path loaded) or None if the directory holds no checkpoint. Raises CheckpointError if
        checkpoints exist but none can be loaded.
        """
        self.wait()
        steps = self.checkpoints()[::-1]
        candidates = steps
        if self.latest_path.exists():
            # latest.pt first, after any step file written later than the one it is a hard link to: a kill
            # between writing a step file and pointing latest.pt at it leaves latest.pt one checkpoint
            # behind. Written later, not numbered higher: a run resumed from an older step is newer. When
            # latest.pt is a copy (no hard links there, or a copied run directory), it simply goes first.
            latest = self.latest_path.stat()
            newer = []
            if any(os.path.samestat(p.stat(), latest) for p in steps):
                newer = [p for p in steps if p.stat().st_mtime_ns > latest.st_mtime_ns]
            candidates = newer + [self.latest_path] + [p for p in steps if p not in newer]
        if not candidates:
            return None
        failures: list[str] = []
        for i, path in enumerate(candidates):
            try:
                return load_checkpoint(path, map_location, require_digest=True), path
            except CheckpointError as e:
                failures.append(f"  - {path.name}: {e}")
                nxt = candidates[i + 1].name if i + 1 < len(candidates) else None
                log.warning(
                    "Cannot load checkpoint %s: %s %s",
                    path,
                    e,
                    f"Falling back to {nxt}." if nxt else "No older checkpoint left to fall back to.",
                )
        raise CheckpointError(
            f"No loadable checkpoint in {self.directory}: all {len(candidates)} failed:\n"
            + "\n".join(failures)
            + "\nFix: restore them from a backup, or move them aside to start the run from scratch."
        )
