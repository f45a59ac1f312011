"""A CPU copy of a state (nested dicts/lists of tensors) that a background writer can save while training goes on.

The copy keeps the state's structure exactly: containers are rebuilt with their own types, every tensor storage
is copied once (tensors that share a storage, such as tied weights, still share it) and each tensor keeps its
dtype, offset, shape and stride. So `torch.save` of the copy writes the same bytes as `torch.save` of the live
state at the moment of the copy (tests/test_checkpoint.py checks the digests).

Hand-written because torch offers no public "copy this state dict off the live tensors into reusable host
buffers" (torch.distributed.checkpoint's async save needs a process group and writes a directory of shards, not
the single file with a digest that resume and the tools here read).

A copy can leave some tensors for later (`defer`): their buffers are laid out at once, their data are copied
by `copy_deferred`, which a background thread runs while training goes on (the next step's forward and
backward). The caller must not change those tensors before `copy_deferred` has returned; the trainer waits
for it before its first change (CheckpointManager.wait_for_snapshots). `changed_deferred` then tells whether
something changed one of them in place meanwhile (by its version counter, which every in-place op bumps),
in which case the copy may mix two states and must not be written; such tensors are never deferred again.
"""

from __future__ import annotations

import collections
import copy
from typing import Any, Callable

import torch

_PathKey = tuple[Any, ...]


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole of `storage` (so storages of any dtype copy as bytes, in one foreach op)."""
    return torch.empty((0,), dtype=torch.uint8, device=storage.device).set_(storage)


class Snapshotter:
    """Copies states into host buffers that are kept and reused by the next copy (no allocation, no page faults).

    The buffers of one `copy` must not be overwritten while that copy is still being written: the caller
    (CheckpointManager) only calls `copy` again once the previous write of the same file has finished.
    """

    def __init__(self) -> None:
        self._buffers: dict[_PathKey, torch.UntypedStorage] = {}
        # Of the last copy's deferred tensors: (the live tensor, its version counter then, its key path), and
        # byte views (buffers, live storages) of their storages, grouped by the live storage's device
        self._deferred: list[tuple[torch.Tensor, int, _PathKey]] = []
        self._deferred_views: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._never_defer: set[_PathKey] = set()  # changed in place while a deferred copy was pending

    def copy(self, state: Any, *, defer: Callable[[torch.Tensor], bool] | None = None) -> Any:
        """A copy of `state` whose tensors live in this snapshotter's host buffers.

        Tensors for which `defer(tensor)` is true are copied only by `copy_deferred` (until then their
        buffers hold stale data); all others are copied before this returns."""
        used: dict[_PathKey, torch.UntypedStorage] = {}
        self._deferred = []
        self._deferred_views = {}
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
            if defer is not None and key not in self._never_defer and defer(t):
                self._deferred.append((t, t._version, key))
                buffers, sources = self._deferred_views.setdefault(str(src.device), ([], []))
                buffers.append(_bytes_of(buf))
                sources.append(_bytes_of(src))
            else:
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

    def copy_deferred(self) -> None:
        """Copy the data of the tensors the last `copy` deferred (safe to call from another thread).

        One `torch._foreach_copy_` per device: the copy thread releases the GIL once for the whole copy. A
        `copy_` per storage hands the GIL back and forth with the training thread at every tensor, and those
        handoffs, not the memory traffic, were most of the stall (bench/checkpoint_stall.py --loop, 25M
        parameters on an idle CPU: 43-77 ms per save with one copy_ per storage, 1-13 ms with this)."""
        for buffers, sources in self._deferred_views.values():
            torch._foreach_copy_(buffers, sources)

    def changed_deferred(self) -> list[str]:
        """The key paths of deferred tensors changed in place since `copy` (call after `copy_deferred`).

        Forgets the deferred tensors; those that changed are copied at once by later copies."""
        changed = [key for t, version, key in self._deferred if t._version != version]
        self._never_defer.update(changed)
        self._deferred = []
        self._deferred_views = {}
        return [".".join(map(str, key)) for key in changed]

    @property
    def nbytes(self) -> int:
        """Host memory held by the buffers."""
        return sum(b.nbytes() for b in self._buffers.values())
