"""Grokfast gradient filters (Lee et al. 2024, "Grokfast: Accelerated Grokking by Amplifying Slow Gradients").

Called after `backward()` and before gradient clipping: every filtered gradient becomes
`g + lamb * slow(g)`, where `slow` is a low-pass filter of the gradient history of that parameter.

* GrokfastEMA: slow = exponential moving average, `ema = alpha * ema + (1 - alpha) * g`, started at
  the first gradient seen. One extra tensor per parameter; two fused foreach ops per step.
* GrokfastMA: slow = mean of the last `window_size` gradients (ring buffer per parameter, so
  `window_size` extra copies of the parameters). With `warmup=True` (the paper's default) nothing is
  added until the window is full.

`components` maps a submodule name prefix to overrides of the constructor options, or to None to
leave that submodule's gradients alone, e.g. `{"memory": {"alpha": 0.95}, "q_head": None}`. A
parameter belongs to the longest prefix that equals its name or is followed by "."; others use the
defaults. `configure(...)` changes these options between curriculum stages (the history is kept).
State is keyed by parameter name (DDP / torch.compile wrappers are stripped first), so
checkpoints load into a bare or wrapped model alike. Filter state is kept in the gradient's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from utils.modules import matches_prefix, unwrap_model


def _plain(value: Any) -> Any:
    """OmegaConf containers (Hydra passes them) as plain dicts."""
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _to_device(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # State loaded from a checkpoint may sit on the CPU; move it once, on first use.
    if t.device != like.device or t.dtype != like.dtype:
        return t.to(device=like.device, dtype=like.dtype)
    return t


class GradFilter:
    """Base class: a filter that leaves gradients unchanged and has no state."""

    def apply(self, model: torch.nn.Module) -> None:
        """Filter `p.grad` in place for every parameter of `model` that has a gradient."""

    def configure(self, **overrides: Any) -> None:
        """Options for the steps from now on (a curriculum stage's), merged onto the constructor's; none: those."""
        if overrides:
            raise ValueError(f"{type(self).__name__} has no options, got {sorted(overrides)}")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class NoFilter(GradFilter):
    """Explicit "no gradient filtering" choice for configs."""


class _PerParamFilter(GradFilter):
    """Shared plumbing: per-component options, name resolution and the lamb scale."""

    _options: tuple[str, ...] = ()  # constructor options a component may override, in settings order

    def __init__(self, defaults: dict[str, Any], components: Mapping[str, Any] | None) -> None:
        self._constructed = (dict(defaults), _plain(components))
        self._set_options(*self._constructed)

    def _set_options(self, defaults: dict[str, Any], components: Mapping[str, Any] | None) -> None:
        self._defaults = defaults
        self._components: dict[str, dict[str, Any] | None] = {}
        for prefix, overrides in (components or {}).items():
            if overrides is not None:
                unknown = set(overrides) - set(self._options)
                if unknown:
                    raise ValueError(
                        f"{type(self).__name__} component {prefix!r}: unknown option(s) {sorted(unknown)}; "
                        f"allowed: {list(self._options)}"
                    )
                overrides = dict(overrides)
                self._validate({**defaults, **overrides}, f"component {prefix!r}")
            self._components[prefix] = overrides
        self._validate(defaults, "defaults")
        self._settings: dict[str, tuple | None] = {}  # parameter name -> resolved settings (None: skip)
        self._checked = False

    def configure(self, **overrides: Any) -> None:
        """E.g. a stage's `{lamb: 1.2, components: {memory: {lamb: 0.9}}}`; the filter's history is kept."""
        defaults, components = self._constructed
        overrides = dict(_plain(overrides) or {})
        components = overrides.pop("components", components)
        unknown = set(overrides) - set(self._options)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown option(s) {sorted(unknown)}; allowed: {list(self._options)}")
        self._set_options({**defaults, **overrides}, components)

    def _validate(self, options: dict[str, Any], where: str) -> None:
        raise NotImplementedError

    def _settings_for(self, name: str) -> tuple | None:
        if name not in self._settings:
            best = max((p for p in self._components if matches_prefix(name, p)), key=len, default=None)
            if best is None:
                options = self._defaults
            elif self._components[best] is None:
                options = None
            else:
                options = {**self._defaults, **self._components[best]}
            self._settings[name] = None if options is None else tuple(options[k] for k in self._options)
        return self._settings[name]

    def _filtered_grads(self, model: torch.nn.Module) -> list[tuple[str, torch.Tensor, tuple]]:
        """(name, grad, settings) for every parameter with a gradient that this filter touches."""
        model = unwrap_model(model)
        named = list(model.named_parameters())
        if not self._checked:
            names = [n for n, _ in named]
            missing = [p for p in self._components if not any(matches_prefix(n, p) for n in names)]
            if missing:
                raise ValueError(
                    f"{type(self).__name__}: component prefix(es) {missing} match no parameter; "
                    f"top-level submodules are {[n for n, _ in model.named_children()]}"
                )
            self._checked = True
        out = []
        for name, p in named:
            if p.grad is None:
                continue
            settings = self._settings_for(name)
            if settings is not None:
                out.append((name, p.grad, settings))
        return out


class GrokfastEMA(_PerParamFilter):
    """g <- g + lamb * ema(g), ema = alpha * ema + (1 - alpha) * g (first value: the first gradient)."""

    _options = ("alpha", "lamb")

    def __init__(self, alpha: float = 0.98, lamb: float = 2.0, components: Mapping[str, Any] | None = None) -> None:
        self._ema: dict[str, torch.Tensor] = {}
        super().__init__({"alpha": alpha, "lamb": lamb}, components)

    def _validate(self, options: dict[str, Any], where: str) -> None:
        if not 0.0 <= float(options["alpha"]) < 1.0:
            raise ValueError(f"GrokfastEMA {where}: alpha must be in [0, 1), got {options['alpha']}")

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        # Bucket by settings so each bucket is two fused foreach kernels (cost ~ one optimizer step).
        buckets: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for name, grad, settings in self._filtered_grads(model):
            ema = self._ema.get(name)
            if ema is None:
                # Starting at the gradient makes the first lerp a no-op, i.e. ema_1 = g_1.
                ema = grad.detach().clone()
            else:
                ema = _to_device(ema, grad)
            self._ema[name] = ema
            emas, grads = buckets.setdefault(settings, ([], []))
            emas.append(ema)
            grads.append(grad)
        for (alpha, lamb), (emas, grads) in buckets.items():
            torch._foreach_lerp_(emas, grads, 1.0 - float(alpha))  # ema + (1-alpha)(g - ema)
            torch._foreach_add_(grads, emas, alpha=float(lamb))

    def state_dict(self) -> dict[str, Any]:
        # Live references (like nn.Module.state_dict): save them before the next apply.
        return {"ema": dict(self._ema)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ema = {k: v.detach().clone() for k, v in state["ema"].items()}


class GrokfastMA(_PerParamFilter):
    """g <- g + lamb * mean(last window_size gradients, including this one)."""

    _options = ("window_size", "lamb", "warmup")

    def __init__(
        self,
        window_size: int = 100,
        lamb: float = 5.0,
        warmup: bool = True,
        components: Mapping[str, Any] | None = None,
    ) -> None:
        self._buffers: dict[str, torch.Tensor] = {}  # (window, *shape) ring of past gradients
        self._sums: dict[str, torch.Tensor] = {}  # running sum of the ring's contents
        self._counts: dict[str, int] = {}  # gradients seen so far (ring slot = count % window)
        super().__init__({"window_size": window_size, "lamb": lamb, "warmup": warmup}, components)

    def _validate(self, options: dict[str, Any], where: str) -> None:
        window = options["window_size"]
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"GrokfastMA {where}: window_size must be an int >= 1, got {window!r}")

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        for name, grad, (window, lamb, warmup) in self._filtered_grads(model):
            buf = self._buffers.get(name)
            if buf is None:
                buf = grad.new_zeros((window, *grad.shape))
                total = torch.zeros_like(grad)
                count = 0
            else:
                if buf.shape[0] != window:
                    raise ValueError(
                        f"GrokfastMA: loaded window for {name!r} has {buf.shape[0]} slots, configured {window}"
                    )
                buf, total, count = _to_device(buf, grad), _to_device(self._sums[name], grad), self._counts[name]
            slot = count % window
            if count >= window:
                total.sub_(buf[slot])  # the oldest gradient leaves the window
            total.add_(grad)
            buf[slot].copy_(grad)
            count += 1
            if count % window == 0:
                # Re-sum exactly once per lap so the running sum's rounding error cannot build up.
                torch.sum(buf, dim=0, out=total)
            self._buffers[name], self._sums[name], self._counts[name] = buf, total, count
            if count >= window or not warmup:
                grad.add_(total, alpha=float(lamb) / min(count, window))

    def state_dict(self) -> dict[str, Any]:
        # Live references (like nn.Module.state_dict): save them before the next apply.
        return {
            "buffers": dict(self._buffers),
            "sums": dict(self._sums),
            "counts": dict(self._counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._buffers = {k: v.detach().clone() for k, v in state["buffers"].items()}
        self._sums = {k: v.detach().clone() for k, v in state["sums"].items()}
        self._counts = {k: int(v) for k, v in state["counts"].items()}
