"""The byte-token targets of the vision-unified data, and what a row's ``source`` id means.

A target is the bytes that follow the rendered context: byte b is token b + 2, then EOS when the
content ends within ``target_len`` tokens; rows are padded with IGNORE_INDEX (-100) after that.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Token ids of the targets: PAD and EOS first, then the 256 byte values (byte b -> b + 2).
PAD_TOKEN = 0
EOS_TOKEN = 1
BYTE_OFFSET = 2
VOCAB_SIZE = BYTE_OFFSET + 256
IGNORE_INDEX = -100
SOURCE_IDS: dict[str, int] = {"arc": 0, "text": 1, "code": 2}


def target_tokens(content: bytes, ended: bool, target_len: int) -> tuple[int, ...]:
    """The first ``target_len`` tokens of ``content`` bytes (+ EOS when the content ends there)."""
    tokens = [b + BYTE_OFFSET for b in content[:target_len]]
    if ended and len(tokens) < target_len:
        tokens.append(EOS_TOKEN)
    return tuple(tokens)


def decode_target(row: Sequence[int] | torch.Tensor) -> tuple[bytes, bool]:
    """(bytes, ended) from a target row: the inverse of ``target_tokens`` + padding."""
    out = bytearray()
    for t in (row.tolist() if isinstance(row, torch.Tensor) else row):
        if t == EOS_TOKEN:
            return bytes(out), True
        if t == IGNORE_INDEX or t == PAD_TOKEN:
            break
        out.append(int(t) - BYTE_OFFSET)
    return bytes(out), False


def serialize_grid(grid: np.ndarray) -> str:
    """An ARC grid as digit rows separated by newlines (``"012\\n340"``)."""
    return "\n".join("".join(str(int(c)) for c in row) for row in np.asarray(grid))
