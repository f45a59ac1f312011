"""Errors a user causes with a bad data file, and the helpers that turn read failures into them.

Each is a `ConfigError` (utils/config/errors.py): the entry points print its message and exit with
code 2, without a traceback. A message names the file (and the line, row or task where that applies),
the problem and the fix, in one or two lines. The families' own classes (`SudokuFileError`,
`ArcFormatError`, ...) subclass `ConfigError` too.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import torch

from utils.config.errors import ConfigError

REBUILD_HINT = "rebuild it: rerun your train.py command with --rebuild-dataset"


class DatasetFileError(ConfigError):
    """A file of a built dataset is missing, truncated or does not hold what the loader expects."""


def short_reason(err: BaseException, limit: int = 120) -> str:
    """'ErrorType: first line' of an exception, cut to `limit` characters (torch's messages are paragraphs)."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    # torch's zip errors go on with advice that does not apply ("This is an internal miniz error. ...").
    text = text.split(". ", 1)[0].rstrip(".")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def first_non_utf8_byte(path: Path | str) -> tuple[int, int] | None:
    """(line number, byte value) of the first byte of `path` that is not valid UTF-8; None if there is none."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                # e.object is the bytes held back from the last chunk (never newlines) plus this chunk.
                return line + e.object.count(b"\n", 0, e.start), e.object[e.start]
            line += chunk.count(b"\n")
    pending, _ = decoder.getstate()  # a multi-byte sequence cut off by the end of the file
    return (line, pending[0]) if pending else None


def not_utf8_message(path: Path | str, fix: str = "save the file as UTF-8 (plain ASCII is UTF-8)") -> str:
    """'<path>:<line>: not UTF-8 text (byte 0x..); <fix>' for a file that failed to decode."""
    found = first_non_utf8_byte(path)
    where, byte = (f"{path}:{found[0]}", f" (byte 0x{found[1]:02x})") if found else (str(path), "")
    return f"{where}: not UTF-8 text{byte}; {fix}"


def load_tensor_file(path: Path | str, error: type[ConfigError] = DatasetFileError, hint: str = REBUILD_HINT) -> Any:
    """`torch.load` of a file the builder wrote (weights only), raising `error` naming the file when it is
    missing, truncated or damaged."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise error(f"{path} is missing; {hint}") from e
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as e:
        raise error(f"{path} is truncated or damaged ({short_reason(e)}); {hint}") from e
