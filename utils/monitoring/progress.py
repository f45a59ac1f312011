"""Console progress for the training loop.

On rank 0 with stderr attached to a terminal: a tqdm bar over steps showing loss, learning rate and
throughput; while it is shown, the periodic per-step log lines (records logged with
`extra={PROGRESS_LINE: True}`) go to train.log only, and every other console log line is printed above
the bar. Without a terminal (SLURM logs, CI, a subprocess with a pipe or file) there is no bar: the
periodic log lines are the progress. Ranks other than 0 show nothing. `TQDM_DISABLE=1` turns the bar off.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from typing import Self

PROGRESS_LINE = "progress_line"  # logging `extra` flag: a periodic step line the bar replaces on the console


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty / closed stream
        return False


class _BarAwareHandler(logging.Handler):
    """Stands in for a console handler while the bar is shown: prints above the bar, drops step lines."""

    def __init__(self, original: logging.StreamHandler, bar: Any) -> None:
        super().__init__(original.level)
        self.original = original
        self.bar = bar
        self.setFormatter(original.formatter)
        for f in original.filters:
            self.addFilter(f)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, PROGRESS_LINE, False):
            return
        try:
            self.bar.write(self.format(record), file=self.original.stream)
        except Exception:  # noqa: BLE001 - logging's own convention: report through handleError
            self.handleError(record)


class Progress:
    """`with Progress(total, initial, enabled=is_main): ... progress.update(); progress.set_metrics({...})`."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, stream: TextIO | None = None,
                 desc: str | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        disabled_by_env = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
        self.active = enabled and _isatty(self.stream) and not disabled_by_env
        self.total, self.initial, self.desc = total, initial, desc
        self.bar: Any = None
        self._swapped: list[tuple[logging.Handler, logging.Handler]] = []

    def __enter__(self) -> Self:
        if not self.active:
            return self
        from tqdm import tqdm

        try:  # a terminal that reports no size (some container ptys) would get an invisible bar
            sized = os.get_terminal_size(self.stream.fileno()).columns > 0
        except (AttributeError, OSError, ValueError):
            sized = False
        self.bar = tqdm(
            total=self.total, initial=self.initial, desc=self.desc, unit="step", file=self.stream,
            dynamic_ncols=sized, ncols=None if sized else 100, smoothing=0.05, leave=True,
        )
        root = logging.getLogger()
        consoles = (sys.stderr, sys.stdout, self.stream)
        for handler in list(root.handlers):
            if (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
                    and handler.stream in consoles):
                replacement = _BarAwareHandler(handler, self.bar)
                replacement._launcher = getattr(handler, "_launcher", False)  # type: ignore[attr-defined]
                root.removeHandler(handler)
                root.addHandler(replacement)
                self._swapped.append((handler, replacement))
        return self

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def set_metrics(self, values: dict[str, Any]) -> None:
        """Show loss, learning rate(s) and throughput from a logged-metrics dict."""
        if self.bar is None:
            return
        shown: dict[str, str] = {}
        if "train/loss" in values:
            shown["loss"] = f"{float(values['train/loss']):.4g}"
        lrs = [k for k in values if k.startswith("lr/")]
        for k in lrs[:2]:
            shown["lr" if len(lrs) == 1 else k] = f"{float(values[k]):.3g}"
        if "time/samples_per_s" in values:
            shown["samples/s"] = f"{float(values['time/samples_per_s']):.4g}"
        if "time/tokens_per_s" in values:
            shown["tok/s"] = f"{float(values['time/tokens_per_s']):.4g}"
        self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        root = logging.getLogger()
        for original, replacement in self._swapped:
            if replacement in root.handlers:  # (unless logging was set up anew meanwhile)
                root.removeHandler(replacement)
                root.addHandler(original)
        self._swapped = []
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __exit__(self, *exc: object) -> None:
        self.close()


def token_count(batch: Any) -> int:
    """Tokens in a batch: numel of `batch["inputs"]` when it is an integer (token id) tensor, else 0."""
    inputs = batch.get("inputs") if isinstance(batch, dict) else None
    if inputs is None or not hasattr(inputs, "dtype") or inputs.dtype.is_floating_point or inputs.dtype.is_complex:
        return 0
    return int(inputs.numel())


def peak_memory_mib(device: Any = None) -> dict[str, float]:
    """This process's peak memory so far: CPU resident set (`memory/peak_rss_mib`) and, on CUDA, the peak
    allocated by torch (`memory/peak_cuda_mib`)."""
    out: dict[str, float] = {}
    try:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        out["memory/peak_rss_mib"] = maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    except (ImportError, OSError):  # no `resource` module (Windows)
        pass
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        out["memory/peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
