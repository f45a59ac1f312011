"""A CPU copy of a state (nested dicts/lists of tensors) that a background writer can save while training goes on.

The copy keeps the state's structure exactly: containers are rebuilt with their own types, every tensor storage
is copied once (tensors that share a storage, such as tied weights, still share it) and each tensor keeps its
dtype, offset, shape and stride. So `torch.save` of the copy writes the same bytes as `torch.save` of the live
state at the moment of the copy (tests/test_checkpoint.py checks the digests).

Hand-written because torch offers no public "copy this state dict off the live tensors into reusable host
buffers" (torch.distributed.checkpoint's async save needs a process group and writes a directory of shards, not
the single file with a digest that resume and the tools here read).
"""

from __future__ import annotations

import collections
import copy
from typing import Any

import torch

_PathKey = tuple[Any, ...]


class Snapshotter:
    """Copies states into host buffers that are kept and reused by the next copy (no allocation, no page faults).

    The buffers of one `copy` must not be overwritten while that copy is still being written: the caller
    (CheckpointManager) only calls `copy` again once the previous write of the same file has finished.
    """

    def __init__(self) -> None:
        self._buffers: dict[_PathKey, torch.UntypedStorage] = {}

    def copy(self, state: Any) -> Any:
        """A copy of `state` whose tensors live in this snapshotter's host buffers."""
        used: dict[_PathKey, torch.UntypedStorage] = {}
        copied: dict[tuple[str, int], torch.UntypedStorage] = {}  # (device, data_ptr) -> buffer, within this copy

        def storage_copy(t: torch.Tensor, key: _PathKey) -> torch.UntypedStorage:
            src = t.untyped_storage()
            ident = (str(src.device), src.data_ptr())
            if ident in copied and src.nbytes() > 0:
                return copied[ident]
            buf = self._buffers.get(key)
            if buf is None or buf.nbytes() != src.nbytes():
                buf = torch.UntypedStorage(src.nbytes(), device="cpu")
                if src.device.type == "cuda":
                    buf = buf.pin_memory()  # page-locked: the device-to-host copy runs at full DMA speed
            buf.copy_(src)
            used[key] = buf
            copied[ident] = buf
            return buf

        memo: dict[int, Any] = {}  # id -> copy: an object met twice is copied once (pickle writes it once too)

        def visit(x: Any, key: _PathKey) -> Any:
            if id(x) in memo:
                return memo[id(x)]
            out = copy_of(x, key)
            memo[id(x)] = out
            return out

        def copy_of(x: Any, key: _PathKey) -> Any:
            if isinstance(x, torch.Tensor):
                if x.layout != torch.strided or x.is_quantized:  # rare in a training state: a plain copy
                    return x.detach().to("cpu", copy=True)
                buf = storage_copy(x, key)
                out = torch.empty((0,), dtype=x.dtype).set_(buf, x.storage_offset(), x.size(), x.stride())
                if isinstance(x, torch.nn.Parameter):
                    return torch.nn.Parameter(out, requires_grad=x.requires_grad)
                return out.requires_grad_(x.requires_grad)
            if type(x) is collections.OrderedDict:
                out_dict = collections.OrderedDict((k, visit(v, (*key, k))) for k, v in x.items())
                # Module.state_dict() hangs its `_metadata` (per-module versions, read by load_state_dict) on the
                # OrderedDict as an attribute; torch.save pickles it, so the copy keeps it.
                out_dict.__dict__.update(copy.deepcopy(vars(x)))
                return out_dict
            if type(x) is dict:
                return {k: visit(v, (*key, k)) for k, v in x.items()}
            if type(x) is list:
                return [visit(v, (*key, i)) for i, v in enumerate(x)]
            if type(x) is tuple:
                return tuple(visit(v, (*key, i)) for i, v in enumerate(x))
            if type(x) is set:
                return set(x)  # sets hold hashable (immutable) leaves
            # Immutable leaves (numbers, strings, dtypes, ...) are shared; anything else is refused when the
            # writer checks the state (checkpoint._check_loadable), with the same message as a direct save.
            return x

        out = visit(state, ())
        self._buffers = used  # buffers of keys that are gone are freed
        return out

    @property
    def nbytes(self) -> int:
        """Host memory held by the buffers."""
        return sum(b.nbytes() for b in self._buffers.values())
