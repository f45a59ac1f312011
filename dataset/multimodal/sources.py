"""The example sources of the vision-unified data: ARC tasks, text documents and source code.

Each source yields ``Example`` s (a context to render and a byte-token target) in a deterministic order:
files and tasks in a seeded shuffle of their sorted names, so a restarted build that skips the first
examples continues exactly where the last one stopped.

Validation split (``HeldOutSplit``): a document is held out when ``sha256(f"{seed}:{doc_id}") mod
val_every == 0``; all its examples get ``is_val = True``. Per document, not per window, because windows
of one document overlap. Document ids: ``arc:<subset>:<task id>``, ``text:<dir name>/<file>:<index in
file>``, ``code:<dir name>/<file>`` (directory names, not paths: the split is the same wherever the
sources live).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dataset.errors import not_utf8_message
from dataset.multimodal.story_generator import STORY_SEPARATOR
from dataset.multimodal.tokens import serialize_grid, target_tokens
from dataset.reasoning.arc import ArcTask, file_sha256, load_subset, subset_files
from dataset.streaming.manifest import StreamingDatasetError
from utils.config.errors import ConfigError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Example:
    """One vision_unified example before rendering.

    ``context`` is the text to render, or for ARC a tuple of (input, output-or-None) grids (one row of
    the panel each). ``target`` is the token list before padding (bytes + 2, maybe EOS). ARC only:
    ``task_index`` (into arc_tasks.json) and ``test_index`` (which test input; -1 for a demonstration
    pair); both -1 for the other sources.
    """

    source: str
    doc_id: str
    context: str | tuple[tuple[np.ndarray, np.ndarray | None], ...]
    target: tuple[int, ...]
    is_val: bool
    task_index: int = -1
    test_index: int = -1


# ----------------------------------------------------------------------------------- source files
def resolve_source_path(path: str | Path) -> Path:
    """Relative source paths are relative to the repository root (not the working directory)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def as_list(value: Any, key: str) -> list[Any]:
    """A config value that may be one item or a list of them, as a list (``key`` names it in the error)."""
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise ConfigError(f"{key} must be a list, got {value!r}") from None


def dir_files(root: Path, patterns: Sequence[str], key: str) -> list[Path]:
    """Files under ``root`` (recursively) matching any glob pattern, sorted; hidden dirs skipped."""
    if not root.is_dir():
        raise ConfigError(f"data.{key}: {root} is not a directory; fix the path")
    found: set[Path] = set()
    for pattern in patterns:
        for path in root.rglob(pattern):
            rel = path.relative_to(root)
            if path.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in rel.parts[:-1]):
                found.add(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def named_files(roots: Sequence[tuple[str, Path]], patterns: Sequence[str], key: str) -> list[tuple[str, Path]]:
    """(``<root name>/<relative path>``, path) of the matching files of every (name, directory) root."""
    return [(f"{name}/{p.relative_to(root).as_posix()}", p) for name, root in roots for p in dir_files(root, patterns, key)]


def dir_fingerprint(root: Path, patterns: Sequence[str], key: str) -> tuple[int, str]:
    """(number of files, sha256 over their relative names and contents) of a source directory."""
    digest = hashlib.sha256()
    files = dir_files(root, patterns, key)
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + file_sha256(path).encode())
    return len(files), digest.hexdigest()


def read_documents(path: Path) -> Iterator[tuple[int, str]]:
    """(index, text) of the documents in a .txt file (separated by ``<|endoftext|>`` lines) or a .jsonl one."""
    try:
        yield from _read_documents(path)
    except UnicodeDecodeError as e:
        raise StreamingDatasetError(not_utf8_message(path)) from e


def _read_documents(path: Path) -> Iterator[tuple[int, str]]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            index = 0
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise StreamingDatasetError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or delete the line") from e
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise StreamingDatasetError(
                        f"{path}:{lineno}: expected an object with a string field 'text', like {{\"text\": \"...\"}}"
                    )
                yield index, text
                index += 1
        return
    with open(path, encoding="utf-8", errors="strict") as f:
        lines: list[str] = []
        index = 0
        for line in f:
            if line.strip() == STORY_SEPARATOR:
                if "".join(lines).strip():
                    yield index, "".join(lines).strip()
                    index += 1
                lines = []
            else:
                lines.append(line)
        if "".join(lines).strip():
            yield index, "".join(lines).strip()


# ------------------------------------------------------------------------------------- the split
class HeldOutSplit:
    """Which documents are held out for validation, and the seeded shuffles, shared by every source."""

    def __init__(self, seed: int, val_every: int) -> None:
        self.seed = seed
        self.val_every = val_every

    def is_val(self, doc_id: str) -> bool:
        digest = hashlib.sha256(f"{self.seed}:{doc_id}".encode()).digest()
        return int.from_bytes(digest[:8], "little") % self.val_every == 0

    def shuffled(self, items: list[Any], salt: str) -> list[Any]:
        rng = random.Random(f"{self.seed}:{salt}")  # str seeds are hashed with SHA-512: reproducible everywhere
        items = list(items)
        rng.shuffle(items)
        return items


# --------------------------------------------------------------------------------------- sources
class ArcSource:
    """Every pair (demonstration and test) of every task of ``subsets``, task by task in a seeded shuffle.

    Context: the pair's input grid, or with ``demos=k > 0`` up to k other demonstration pairs of the
    task followed by the pair's input with no output. Target: the output grid as digit rows separated
    by newlines, then EOS (cut, without EOS, when longer than ``target_len``).
    """

    def __init__(self, arc_dir: Path, subsets: Sequence[str], max_tasks: int | None, demos: int, target_len: int,
                 split: HeldOutSplit) -> None:
        self.arc_dir = arc_dir
        self.subsets = list(subsets)
        self.max_tasks = max_tasks
        self.demos = demos
        self.target_len = target_len
        self.split = split

    def files(self) -> list[Path]:
        return [p for s in self.subsets for p in subset_files(self.arc_dir, s)]

    def fingerprint(self) -> dict[str, str]:
        return {p.name: file_sha256(p) for p in self.files()}

    def tasks(self) -> tuple[list[ArcTask], dict[tuple[str, str], int]]:
        """(tasks in subset order, then sorted ids; (subset, id) -> task index in (id, subset) order)."""
        tasks = [t for s in self.subsets for t in load_subset(self.arc_dir, s, self.max_tasks)]
        ordered = sorted(tasks, key=lambda t: (t.task_id, t.subset))
        dup = sorted({a.task_id for a, b in itertools.pairwise(ordered) if a.task_id == b.task_id})
        if dup:
            raise StreamingDatasetError(
                f"ARC task ids {dup[:5]} occur in more than one of arc_subsets={self.subsets}; the ARC "
                "scorer and submission.json name tasks by id: list each subset once"
            )
        return tasks, {(t.subset, t.task_id): i for i, t in enumerate(ordered)}

    def examples(self) -> Iterator[Example]:
        tasks, index = self.tasks()
        for task in self.split.shuffled(tasks, "arc"):
            doc_id = f"arc:{task.subset}:{task.task_id}"
            is_val = self.split.is_val(doc_id)
            task_index = index[(task.subset, task.task_id)]
            pairs = list(task.train) + list(zip(task.test_inputs, task.test_outputs))
            for j, (x, y) in enumerate(pairs):
                context: tuple[tuple[np.ndarray, np.ndarray | None], ...]
                if self.demos:
                    demos = [p for i, p in enumerate(task.train) if i != j][: self.demos]
                    context = (*((dx, dy) for dx, dy in demos), (x, None))
                else:
                    context = ((x, None),)
                target = target_tokens(serialize_grid(y).encode("ascii"), True, self.target_len)
                test_index = j - len(task.train) if j >= len(task.train) else -1
                yield Example("arc", doc_id, context, target, is_val, task_index, test_index)


class TextSource:
    """Windows of the documents of the .txt / .jsonl files in ``roots``, every ``stride`` characters.

    ``roots`` are (name used in document ids, directory read). Context: the ``context_chars`` characters
    before the position; target: the bytes from there (EOS if the document ends within the target).
    """

    def __init__(self, roots: Sequence[tuple[str, Path]], globs: Sequence[str], context_chars: int, stride: int,
                 target_len: int, split: HeldOutSplit) -> None:
        self.roots = list(roots)
        self.globs = list(globs)
        self.context_chars = context_chars
        self.stride = stride
        self.target_len = target_len
        self.split = split

    def examples(self) -> Iterator[Example]:
        c, s, t = self.context_chars, self.stride, self.target_len
        files = named_files(self.roots, self.globs, "text_dirs")
        for rel, path in self.split.shuffled(files, "text"):
            for index, doc in read_documents(path):
                if len(doc) < 2:
                    continue
                doc_id = f"text:{rel}:{index}"
                is_val = self.split.is_val(doc_id)
                for p in range(min(c, len(doc) - 1), len(doc), s):
                    chunk = doc[p : p + t]
                    target = target_tokens(chunk.encode("utf-8"), p + t >= len(doc), t)
                    yield Example("text", doc_id, doc[max(0, p - c) : p], target, is_val)


class CodeSource:
    """Line completion in the source files of ``roots``: each non-blank line after the first is a target.

    ``roots`` are (name used in document ids, directory read). Context: up to ``context_lines`` preceding
    lines; target: the line's bytes then EOS (a line longer than ``target_len`` is cut and gets no EOS).
    """

    def __init__(self, roots: Sequence[tuple[str, Path]], globs: Sequence[str], context_lines: int, target_len: int,
                 split: HeldOutSplit) -> None:
        self.roots = list(roots)
        self.globs = list(globs)
        self.context_lines = context_lines
        self.target_len = target_len
        self.split = split

    def examples(self) -> Iterator[Example]:
        files = named_files(self.roots, self.globs, "code_dirs")
        for rel, path in self.split.shuffled(files, "code"):
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                log.warning("Skipping %s: not UTF-8", path)
                continue
            doc_id = f"code:{rel}"
            is_val = self.split.is_val(doc_id)
            for i in range(1, len(lines)):
                if not lines[i].strip():
                    continue
                context = "\n".join(lines[max(0, i - self.context_lines) : i])
                target = target_tokens(lines[i].encode("utf-8"), True, self.target_len)
                yield Example("code", doc_id, context, target, is_val)
