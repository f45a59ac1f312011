"""Graceful shutdown on SIGINT / SIGTERM / SIGUSR1 / SIGUSR2.

The first signal only sets a flag: the loop finishes the current step, saves a checkpoint and exits
with EXIT_INTERRUPTED. (Dataset builders use the same handler on SIGTERM / SIGINT only: they finish the
current file, then stop.) A second SIGINT aborts at once (KeyboardInterrupt, exit 130) for a user who
really wants out. SIGUSR1 is what SLURM sends before a time limit (`--signal=USR1@90`); SIGUSR2 is
what submitit (hydra/launcher=slurm) asks SLURM to send before a time limit or on pre-emption.

Under submitit a handler is already installed when the loop starts (SIGUSR2: checkpoint the job's
arguments, `scontrol requeue` it, exit). GracefulShutdown replaces it while the loop runs and, once the
trainer has saved its checkpoint, `chain_previous()` hands the signal on to it, so the job is requeued
and its next run resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType

log = logging.getLogger(__name__)

# Exit codes of pretrain.py / train.py (documented in the README).
EXIT_OK = 0  # finished: max_steps, max_epochs or early stopping
EXIT_FAILED = 1  # an unexpected error (traceback printed)
EXIT_CONFIG = 2  # invalid config or bad input: the message names the problem
EXIT_NONFINITE = 3  # too many consecutive non-finite losses/gradients; last good checkpoint kept
EXIT_INTERRUPTED = 75  # stopped by a signal after saving a checkpoint: run again to resume (EX_TEMPFAIL)
EXIT_ABORTED = 130  # second Ctrl+C: stopped at once, no checkpoint for the current step


def _log_outside_handler(message: str) -> None:
    """Log a warning from a signal handler without writing from inside it.

    The handler runs between two bytecodes of the main thread, possibly in the middle of that thread's own
    write to a log file; writing again there fails with "reentrant call inside BufferedWriter" and logging
    drops the line (seen under load with a log line per step). A thread writes it instead: at once in the
    usual case (the handler waits up to 50 ms for it), or, when the interrupted write holds the log handler's
    lock, as soon as that write is done. It is not a daemon, so the line is written before the process exits.
    """
    writer = threading.Thread(target=log.warning, args=(message,), name="signal-log")
    writer.start()
    writer.join(timeout=0.05)


class GracefulShutdown:
    """Context manager that turns termination signals into a flag the loop polls."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(
        self,
        signals: Sequence[int] = SIGNALS,
        action: str = "finishing the current step, then saving a checkpoint and exiting",
    ) -> None:
        """`signals`: the ones turned into the flag; `action`: what the poller does then (for the log line)."""
        self.signals = tuple(signals)
        self.action = action
        self.requested = False
        self.signal_name: str | None = None
        self.signum: int | None = None  # the first signal received (the one chain_previous passes on)
        self._previous: dict[int, object] = {}
        self._before: dict[int, object] = {}  # handlers installed before __enter__ (kept after __exit__)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            _log_outside_handler("Second SIGINT: aborting now without a final checkpoint.")
            raise KeyboardInterrupt
        first = not self.requested
        # Recorded before logging: the log waits up to 50 ms for its thread, and a second SIGINT in that wait
        # runs this handler again, nested; it must see the first one as received (and abort), not log it again.
        self.requested = True
        self.signal_name = self.signal_name or name
        self.signum = self.signum or signum
        if first:
            _log_outside_handler(f"{name} received: {self.action}.")

    def __enter__(self) -> "GracefulShutdown":
        if threading.current_thread() is threading.main_thread():  # signals can only be set from the main thread
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._before = dict(self._previous)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def chain_previous(self) -> bool:
        """Pass the signal received on to the Python handler installed before `__enter__`; True if one ran.

        Call it after the final checkpoint is saved. Under submitit that handler requeues the job and
        exits (SystemExit), or raises UncompletedJobError when the job may not be requeued; on ranks
        other than 0 it returns. Without such a handler (SIG_DFL / SIG_IGN, Python's default SIGINT
        handler) nothing happens and the caller exits with EXIT_INTERRUPTED.
        """
        handler = self._before.get(self.signum) if self.signum is not None else None
        if not callable(handler) or handler is signal.default_int_handler:
            return False
        log.warning(
            "Checkpoint saved; passing %s on to the handler installed before training (%s).",
            self.signal_name, getattr(handler, "__qualname__", handler),
        )
        # The checkpoint is saved and this process is leaving. A requeue (submitit runs `scontrol requeue`)
        # makes SLURM SIGTERM every process of the job, the requeue command too, which then "fails" and
        # the job reports an error instead of being requeued (seen in tests/test_slurm.py). An ignored
        # signal stays ignored in the children a handler starts, so the command completes.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        handler(self.signum, None)
        return True
