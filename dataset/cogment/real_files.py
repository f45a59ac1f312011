"""Reading the public benchmark files a user points the Cogment data at, with one-line errors.

Every problem (missing file, not UTF-8, bad JSON on some line, a record without a needed field) is a
ConfigError naming the file, the line where there is one, and what to fix, so train.py exits with code
2 and no traceback. Rows are split into train and val deterministically (a seeded permutation), so a
single file (e.g. GSM8K's train.jsonl) serves both splits without overlap.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from dataset.errors import not_utf8_message
from utils.config.errors import ConfigError

Row = TypeVar("Row")


def read_text_lines(path: str | Path, key: str) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such file; point {key} at the downloaded file")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(not_utf8_message(path)) from None


def read_json_records(path: str | Path, key: str) -> list[tuple[int, dict[str, Any]]]:
    """(line, record) of a JSONL file (one object per line) or of a JSON file holding a list of objects
    (HotpotQA is distributed that way); the line of a JSON list's records is that of the file's start."""
    lines = read_text_lines(path, key)
    text = "\n".join(lines).strip()
    if text.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file or download it again") from None
        records = [(1, r) for r in data]
    else:
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{number}: not a JSON object ({e.msg}); {key} must be a JSONL file, "
                                  "one object per line") from None
    for number, record in records:
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{number}: expected a JSON object per record, got {type(record).__name__}")
    if not records:
        raise ConfigError(f"{path}: no records; {key} must point at a non-empty JSONL file")
    return records


def field(record: dict[str, Any], name: str, kind: type, path: str | Path, number: int) -> Any:
    value = record.get(name)
    if not isinstance(value, kind):
        raise ConfigError(f"{path}:{number}: the record has no {kind.__name__} field {name!r} "
                          f"(its fields: {', '.join(sorted(record))})")
    return value


def split_rows(rows: Sequence[Row], val_fraction: float, seed: int, salt: int) -> dict[str, list[Row]]:
    """{"train": ..., "val": ...}: a seeded permutation, the first ``val_fraction`` of it for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng([seed, salt]).permutation(len(rows))
    n_val = max(1, int(round(len(rows) * val_fraction)))
    train = [rows[i] for i in order[n_val:]]
    return {"val": [rows[i] for i in order[:n_val]], "train": train or [rows[i] for i in order[:n_val]]}
