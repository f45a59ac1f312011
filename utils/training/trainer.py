"""The training loop, written once for every model family.

The contract with a family (see README, "Adding a model family"):
- model:  `forward(batch: dict, carry=None) -> dict` with the outputs the loss and evaluators read.
  A model with state carried across batches (ACT) returns it under "carry" (a dict of tensors); the
  loop feeds it back on the next training batch and stores it in checkpoints. A model that learns
  with local rules updates itself inside forward and has no trainable parameters (`optim=none`).
  A model may also return `"metrics"`: a dict of scalar tensors logged as train/<name> (and val/<name>,
  averaged over the validation batches), e.g. ACT's mean number of reasoning steps.
- loss:   `loss(outputs, batch) -> {"loss": total, term: value, ...}`; a total without grad means
  there is nothing to back-propagate (local learning) and only the metrics are logged. A loss with
  `weight_schedules` and `update_weights(step)` (losses.composite.CompositeLoss) has its weights set
  from the step before every training step.
- evaluators: accumulate over the validation set (`reset/update/sync/compute`).
- data:   a data module with `prepare_data/setup/train_dataset/val_dataset/collate_fn/model_kwargs`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from utils.storage.checkpoint import CheckpointError, CheckpointManager, assert_finite_state
from utils.config.errors import ConfigError
from utils.training.data_loading import ResumableDistributedSampler, ShardSampler, make_loader
from utils.distributed import DistInfo, all_reduce_mean, any_rank, barrier
from utils.optim.ema import ModelEMA
from utils.optim.grad_filters import NoFilter
from utils.monitoring.grad_monitor import GradientMonitor
from utils.optim.builder import build_optimizers
from utils.monitoring.plots import FigureMaker
from utils.monitoring.progress import PROGRESS_LINE, Progress, peak_memory_mib, token_count
from utils.rng import capture_rng_state, restore_rng_state, seed_everything
from utils.monitoring.run_logging import MetricsWriter, truncate_metrics
from utils.optim.schedules import steps_per_call
from utils.signals import GracefulShutdown
from utils.monitoring.trackers import scrub_secrets

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """Stopped by a signal after saving a checkpoint; running again resumes."""


@dataclass
class TrainState:
    """Everything about progress that is not a module's state_dict."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    consecutive_nonfinite: int = 0
    total_nonfinite: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one record per evaluation
    stop_reason: str | None = None


@dataclass
class FitResult:
    metric: float | None  # the monitored metric at the best evaluation (what sweeps optimise)
    last_metrics: dict[str, float]
    state: TrainState
    run_dir: Path


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _detach(carry: Any) -> Any:
    if isinstance(carry, torch.Tensor):
        return carry.detach()
    if isinstance(carry, dict):
        return {k: _detach(v) for k, v in carry.items()}
    return carry


def _instantiate_with_facts(node: DictConfig, facts: dict[str, Any]) -> Any:
    """Instantiate `node`, passing the data module's facts the target accepts and the config leaves unset."""
    params = inspect.signature(get_method(node._target_)).parameters
    extra = {k: v for k, v in facts.items() if k in params and k not in node}
    return instantiate(node, **extra)


class Trainer:
    def __init__(self, cfg: DictConfig, dist_info: DistInfo, run_dir: Path) -> None:
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.dist = dist_info
        self.device = dist_info.device
        self.run_dir = run_dir
        self.state = TrainState()
        self.carry: Any = None

        seed_everything(cfg.seed)
        self._build_data()
        self._build_model()
        self._build_optimization()
        seed_everything(cfg.seed + self.dist.rank)  # per-rank randomness (dropout) after identical init

        self.ckpt = CheckpointManager(run_dir, keep_last=self.tcfg.checkpoint.keep_last)
        self.resumed_run_ids: dict[str, str | None] = {}
        self.writer = MetricsWriter(None, enabled=False)  # opened in fit(), once a resumed run id is known
        self.figures: FigureMaker | None = None  # plots/ at evaluations and at the end (fit())
        self.progress = Progress(0, enabled=False)  # the console bar (fit(), rank 0, a terminal only)
        self._log_step = False  # set by fit() on logging steps: train_step then measures per-component norms
        self._step_tokens = 0

    # ------------------------------------------------------------------ building
    def _build_data(self) -> None:
        cfg, world = self.cfg, self.dist.world_size
        self.data = instantiate(cfg.data)
        if self.dist.is_main:
            self.data.prepare_data()
        barrier()
        self.data.prepare_data()  # other ranks: the dataset is complete now, this only checks
        self.data.setup()
        if self.tcfg.global_batch_size % world:
            raise ConfigError(
                f"trainer.global_batch_size={self.tcfg.global_batch_size} is not divisible by the "
                f"{world} processes; pick a multiple of {world}."
            )
        self.batch_size = self.tcfg.global_batch_size // world
        if len(self.data.train_dataset) < self.tcfg.global_batch_size:
            raise ConfigError(
                f"The training set has {len(self.data.train_dataset)} examples, fewer than "
                f"trainer.global_batch_size={self.tcfg.global_batch_size}; lower the batch size."
            )
        self._make_train_loader()
        pin = self.device.type == "cuda"
        collate = getattr(self.data, "collate_fn", None)
        val_sampler = ShardSampler(self.data.val_dataset, world, self.dist.rank)
        self.val_loader = make_loader(
            self.data.val_dataset,
            val_sampler,
            self.tcfg.eval_batch_size or self.batch_size,
            collate,
            self.tcfg.num_workers,
            False,
            pin,
        )

    def _make_train_loader(self) -> None:
        self.train_sampler = ResumableDistributedSampler(
            self.data.train_dataset, self.dist.world_size, self.dist.rank, self.cfg.seed
        )
        self.train_loader = make_loader(
            self.data.train_dataset,
            self.train_sampler,
            self.batch_size,
            getattr(self.data, "collate_fn", None),
            self.tcfg.num_workers,
            True,
            self.device.type == "cuda",
        )

    def _refresh_data(self, epoch: int) -> None:
        """Let a growing dataset (a streaming builder still writing shards) take in new data at an epoch start.

        The data module's `refresh(epoch, sync)` decides, deterministically from its own checkpointed state,
        what the epoch trains on, and returns True when its train set changed; `sync` makes every rank use
        rank 0's view of how much data is available.
        """
        refresh = getattr(self.data, "refresh", None)
        if refresh is not None and refresh(epoch, sync=self._rank0_value):
            self._make_train_loader()

    def _rank0_value(self, value: int) -> int:
        if not dist.is_initialized():
            return value
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        packed = torch.tensor([value], dtype=torch.long, device=device)
        dist.broadcast(packed, src=0)
        return int(packed.item())

    def _build_model(self) -> None:
        facts = self.data.model_kwargs() if hasattr(self.data, "model_kwargs") else {}
        self.model: torch.nn.Module = _instantiate_with_facts(self.cfg.model, facts).to(self.device)
        self.loss_fn = instantiate(self.cfg.loss)
        if isinstance(self.loss_fn, torch.nn.Module):
            self.loss_fn.to(self.device)
        # Loss terms whose weight follows a schedule of the step (e.g. a ponder cost ramped in).
        self._scheduled_loss_weights = bool(getattr(self.loss_fn, "weight_schedules", None))
        # Evaluators get the same data facts as the model, plus where to write files (ARC's submission.json).
        eval_facts = {**facts, "run_dir": str(self.run_dir)}
        self.evaluators = {
            name: _instantiate_with_facts(node, eval_facts) for name, node in (self.cfg.evaluators or {}).items()
        }
        self.ema = ModelEMA(self.model, decay=self.tcfg.ema.decay) if self.tcfg.ema.enabled else None

        forward_model: torch.nn.Module = self.model
        if self.dist.distributed and any(p.requires_grad for p in self.model.parameters()):
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            forward_model = DistributedDataParallel(self.model, device_ids=device_ids)
        if self.tcfg.compile:
            forward_model = torch.compile(forward_model)  # type: ignore[assignment]
        self.forward_model = forward_model
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("Model %s: %s parameters", type(self.model).__name__, f"{n_params:,}")

    def _build_optimization(self) -> None:
        self.optimizers = build_optimizers(self.model, self.cfg.optim)
        self.schedulers = {}
        for named in self.optimizers:
            schedule_cfg = named.schedule_cfg if named.schedule_cfg is not None else self.cfg.schedule
            if schedule_cfg is None:
                continue
            factory = instantiate(schedule_cfg)
            self.schedulers[named.name] = factory(named.optimizer, total_steps=self.tcfg.max_steps)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.grad_filter = instantiate(self.cfg.grad_filter) if self.cfg.grad_filter is not None else NoFilter()
        gm = self.tcfg.grad_monitor
        self.grad_monitor = (
            GradientMonitor(gm.vanishing_threshold, gm.exploding_threshold, gm.history_size, gm.cleanup_interval,
                            warn_interval=gm.warn_interval)
            if gm.enabled else None
        )

        precision = self.tcfg.precision
        if precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("trainer.precision=fp16 needs a GPU (GradScaler); use bf16 or fp32 on CPU.")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.grad_clip = self.tcfg.grad_clip if self.tcfg.grad_clip is not None else math.inf

    def _build_trackers(self) -> dict[str, Any]:
        """Experiment trackers (rank 0 only); a resumed run passes its tracker's run id back in."""
        if not self.dist.is_main:
            return {}
        trackers = {}
        for name, node in (self.cfg.logger or {}).items():
            params = inspect.signature(get_method(node._target_)).parameters
            facts = {"run_dir": str(self.run_dir), "resume_id": self.resumed_run_ids.get(name), "start_step": self.state.step}
            facts["config"] = scrub_secrets(OmegaConf.to_container(self.cfg, resolve=True))
            # Facts are passed to the partial, not through instantiate: its first parameter is named `config`,
            # and it would recursively instantiate the `_target_` nodes inside the config dict.
            trackers[name] = instantiate(node, _partial_=True)(**{k: v for k, v in facts.items() if k in params})
        return trackers

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        model_state = self.model.state_dict()
        assert_finite_state(model_state, "model weights")
        # Every rank's RNG stream and carried state (each rank carries its own rows), so each resumes its own.
        local = {"rng": capture_rng_state(), "carry": _to_device(self.carry, torch.device("cpu"))}
        if dist.is_initialized():
            gathered: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        rng_per_rank = [g["rng"] for g in gathered]
        carry_per_rank = [g["carry"] for g in gathered]
        s = self.state
        return {
            "format": CHECKPOINT_FORMAT,
            "model_class": f"{type(self.model).__module__}.{type(self.model).__name__}",
            "model": model_state,
            "optimizers": {n.name: n.optimizer.state_dict() for n in self.optimizers},
            "schedulers": {name: sch.state_dict() for name, sch in self.schedulers.items()},
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "grad_filter": self.grad_filter.state_dict(),
            "grad_monitor": self.grad_monitor.state_dict() if self.grad_monitor is not None else None,
            "loss": self.loss_fn.state_dict() if isinstance(self.loss_fn, torch.nn.Module) else {},
            "carry_per_rank": carry_per_rank,
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
            "rng_per_rank": rng_per_rank,
            "world_size": self.dist.world_size,
            "trainer": {
                "step": s.step,
                "epoch": s.epoch,
                "batches_in_epoch": s.batches_in_epoch,
                "best_metric": s.best_metric,
                "best_step": s.best_step,
                "evals_without_improvement": s.evals_without_improvement,
                "consecutive_nonfinite": s.consecutive_nonfinite,
                "total_nonfinite": s.total_nonfinite,
                "history": s.history,
            },
            "config": scrub_secrets(OmegaConf.to_container(self.cfg, resolve=True)),
            "logger_run_ids": self.writer.run_ids() if self.dist.is_main else {},
        }

    def save_checkpoint(self) -> None:
        """Collective (RNG gather); only rank 0 writes."""
        state = self.checkpoint_state()
        if self.dist.is_main:
            path = self.ckpt.save(state, self.state.step)
            if self.ema is not None:
                self.ckpt.save_named("ema_model.pt", {"model": self.ema.module.state_dict(), "step": self.state.step})
            log.info("Saved checkpoint %s", path)
        barrier()

    def resume(self) -> bool:
        if not self.tcfg.checkpoint.resume:
            return False
        try:
            loaded = self.ckpt.load_latest(map_location=self.device)
        except CheckpointError:
            raise
        if loaded is None:
            return False
        ckpt, path = loaded
        self._check_compatible(ckpt, path)
        self.model.load_state_dict(ckpt["model"])
        for named in self.optimizers:
            named.optimizer.load_state_dict(ckpt["optimizers"][named.name])
        for name, sch in self.schedulers.items():
            sch.load_state_dict(ckpt["schedulers"][name])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.grad_filter.load_state_dict(ckpt["grad_filter"])
        if self.grad_monitor is not None and ckpt.get("grad_monitor") is not None:
            self.grad_monitor.load_state_dict(ckpt["grad_monitor"])
        if isinstance(self.loss_fn, torch.nn.Module) and ckpt.get("loss"):
            self.loss_fn.load_state_dict(ckpt["loss"])
        if hasattr(self.data, "load_state_dict") and ckpt.get("data") is not None:
            self.data.load_state_dict(ckpt["data"])  # e.g. how many streamed shards the current epoch uses
        carries = ckpt.get("carry_per_rank") or []
        if len(carries) == self.dist.world_size:
            self.carry = _to_device(carries[self.dist.rank], self.device)
        else:
            self.carry = None
            if any(c is not None for c in carries):
                log.warning("The checkpoint's carried state is for %d processes, this run has %d: starting from a fresh carry.",
                            len(carries), self.dist.world_size)
        t = ckpt["trainer"]
        self.state = TrainState(
            step=t["step"],
            epoch=t["epoch"],
            batches_in_epoch=t["batches_in_epoch"],
            best_metric=t["best_metric"],
            best_step=t["best_step"],
            evals_without_improvement=t["evals_without_improvement"],
            consecutive_nonfinite=t["consecutive_nonfinite"],
            total_nonfinite=t["total_nonfinite"],
            history=list(t["history"]),
        )
        rngs = ckpt["rng_per_rank"]
        if ckpt.get("world_size") == self.dist.world_size:
            restore_rng_state(rngs[self.dist.rank])
        else:
            log.warning(
                "Checkpoint written by %s processes, resuming with %s: RNG streams restart from rank 0's; "
                "the global batches stay the same, but per-rank randomness (dropout) and the order of "
                "floating-point reductions change, so the continuation is not bitwise identical.",
                ckpt.get("world_size"),
                self.dist.world_size,
            )
            restore_rng_state(rngs[0])
        self.resumed_run_ids = ckpt.get("logger_run_ids", {})
        if self.dist.is_main:
            truncate_metrics(self.run_dir, self.state.step)
        log.info("Resumed from %s at step %d (epoch %d)", path, self.state.step, self.state.epoch)
        return True

    def _check_compatible(self, ckpt: dict, path: Path) -> None:
        fix = "Use --fresh to start over (old files are kept aside) or pick another run_name=..."
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} has checkpoint format {ckpt.get('format')!r}, expected {CHECKPOINT_FORMAT}. {fix}")
        mine = f"{type(self.model).__module__}.{type(self.model).__name__}"
        if ckpt.get("model_class") != mine:
            raise CheckpointError(f"{path} holds a {ckpt.get('model_class')} model, this run builds {mine}. {fix}")
        expected = self.model.state_dict()
        theirs = ckpt["model"]
        missing = sorted(set(expected) - set(theirs))
        unexpected = sorted(set(theirs) - set(expected))
        mismatched = sorted(k for k in set(expected) & set(theirs) if expected[k].shape != theirs[k].shape)
        if missing or unexpected or mismatched:
            detail = "; ".join(
                f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", mismatched))
                if keys
            )
            raise CheckpointError(f"{path} was written by a different model configuration ({detail}). {fix}")
        names = sorted(n.name for n in self.optimizers)
        if sorted(ckpt["optimizers"]) != names:
            raise CheckpointError(f"{path} has optimizers {sorted(ckpt['optimizers'])}, this run has {names}. {fix}")

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: dict[str, Any]) -> dict[str, float] | None:
        """Forward, backward, filter, clip, step. Returns metrics, or None when the step was skipped."""
        component_norms: dict[str, torch.Tensor] = {}
        monitor_metrics: dict[str, float] = {}
        if self._log_step:
            self._step_tokens = token_count(batch)
        if self._scheduled_loss_weights:
            self.loss_fn.update_weights(self.state.step)  # a pure function of the step: resume stays exact
        with self._autocast():
            outputs = self.forward_model(batch, carry=self.carry)
            new_carry = outputs.pop("carry", None)
            model_metrics = outputs.pop("metrics", None) or {}
            losses = self.loss_fn(outputs, batch)
        total = losses["loss"]
        learns_by_backprop = total.requires_grad
        grad_norm = torch.zeros((), device=self.device)
        if learns_by_backprop:
            self.scaler.scale(total).backward()
            for named in self.optimizers:
                self.scaler.unscale_(named.optimizer)
            grad_norm = _total_norm(self.params)
            if self._log_step:  # logging steps only: per top-level submodule, measured like the total
                component_norms = _component_grad_norms(self.model)
                if self.grad_monitor is not None:  # per layer, before clipping: what backward produced
                    monitor_metrics = self.grad_monitor.observe(self.model, self.state.step + 1)
        # One host sync per step: the non-finite guard must decide before any state changes.
        finite = bool(torch.isfinite(total.detach()) & torch.isfinite(grad_norm))
        if not finite:
            self._zero_grad()
            self.carry = None  # a carry built from non-finite activations would poison the next steps
            self.state.consecutive_nonfinite += 1
            self.state.total_nonfinite += 1
            if self.scaler.is_enabled():
                self.scaler.update()  # lets fp16 lower its scale instead of skipping forever
            log.warning(
                "Non-finite %s at step %d: step skipped (%d in a row, %d in total).",
                "loss" if not torch.isfinite(total.detach()) else "gradient",
                self.state.step + 1,
                self.state.consecutive_nonfinite,
                self.state.total_nonfinite,
            )
            if self.state.consecutive_nonfinite >= self.tcfg.max_consecutive_nonfinite:
                raise NonFiniteError(
                    f"{self.state.consecutive_nonfinite} consecutive non-finite steps (trainer.max_consecutive_nonfinite="
                    f"{self.tcfg.max_consecutive_nonfinite}); stopping. The last good checkpoint in {self.run_dir} is kept. "
                    "Lower the learning rate, enable grad clipping, or run with debug=anomaly to find the operation."
                )
            return None
        self.state.consecutive_nonfinite = 0
        self.carry = _detach(new_carry)
        if learns_by_backprop:
            if not isinstance(self.grad_filter, NoFilter):
                self.grad_filter.apply(self.model)
                grad_norm = _total_norm(self.params) if math.isfinite(self.grad_clip) else grad_norm
                if self._log_step and math.isfinite(self.grad_clip):  # the same gradients as the total's
                    component_norms = _component_grad_norms(self.model)
            if math.isfinite(self.grad_clip):
                _clip_with_norm(self.params, self.grad_clip, grad_norm)
            for named in self.optimizers:
                self.scaler.step(named.optimizer)
            self.scaler.update()
            self._zero_grad()
            for sch in self.schedulers.values():
                if steps_per_call(sch) == "step":
                    sch.step()
            if self.ema is not None:
                self.ema.update(self.model)
        # Detached: a logged loss must not keep the autograd graph alive until the next step.
        logged = {"grad_norm": grad_norm, **component_norms, **{k: v.detach() for k, v in losses.items()}}
        logged.update({k: torch.tensor(v) for k, v in monitor_metrics.items()})
        logged.update({k: torch.as_tensor(v).detach() for k, v in model_metrics.items()})
        if self._scheduled_loss_weights and self._log_step:
            logged.update({f"loss_weight/{k}": torch.tensor(v) for k, v in self.loss_fn.weights.items()})
        return logged

    def _zero_grad(self) -> None:
        for named in self.optimizers:
            named.optimizer.zero_grad(set_to_none=True)
        if not self.optimizers:
            self.model.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model = self.ema.module if (self.ema is not None and self.tcfg.ema.use_for_eval) else self.model
        was_training = model.training
        model.eval()
        for ev in self.evaluators.values():
            ev.reset()
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(self.val_loader):
            if self.tcfg.eval_max_batches is not None and i >= self.tcfg.eval_max_batches:
                break
            batch = _to_device(batch, self.device)
            with self._autocast():
                outputs = model(batch, carry=None)
                outputs.pop("carry", None)
                model_metrics = outputs.pop("metrics", None) or {}
                losses = self.loss_fn(outputs, batch)
            n = _batch_len(batch)
            for key, value in {**losses, **model_metrics}.items():
                value = torch.as_tensor(value, device=self.device)
                sums[key] = sums.get(key, 0) + value.detach().double() * n
            count += n
            for ev in self.evaluators.values():
                ev.update(outputs, batch)
        model.train(was_training)
        if dist.is_initialized():
            keys = sorted(sums)
            packed = torch.stack([sums[k] for k in keys] + [count])
            dist.all_reduce(packed)
            sums, count = dict(zip(keys, packed[:-1])), packed[-1]
        metrics = {f"val/{k}": (v / count).item() for k, v in sums.items()} if count > 0 else {}
        for ev in self.evaluators.values():
            ev.sync()
            metrics.update({f"val/{k}": float(v) for k, v in ev.compute().items()})
        return metrics

    def _after_eval(self, metrics: dict[str, float]) -> None:
        """Plateau schedules, best checkpoint, early stopping."""
        monitor = self.tcfg.monitor
        if monitor not in metrics:
            raise ConfigError(
                f"trainer.monitor={monitor!r} is not among the evaluation metrics: {', '.join(sorted(metrics))}."
            )
        value = metrics[monitor]
        s = self.state
        s.history.append({"step": s.step, **metrics})
        for sch in self.schedulers.values():
            if steps_per_call(sch) == "eval":
                sch.step(value)
        es = self.tcfg.early_stopping
        maximize = self.tcfg.monitor_mode == "max"
        improved = s.best_metric is None or (
            value > s.best_metric + es.min_delta if maximize else value < s.best_metric - es.min_delta
        )
        if improved and math.isfinite(value):
            s.best_metric, s.best_step, s.evals_without_improvement = value, s.step, 0
            if self.tcfg.checkpoint.save_best and self.dist.is_main:
                best = {"model": self.model.state_dict(), "step": s.step, "metric": value, "monitor": monitor}
                if self.ema is not None:
                    best["ema"] = self.ema.module.state_dict()
                self.ckpt.save_named("best.pt", best)
        else:
            s.evals_without_improvement += 1
        s.stop_reason = s.stop_reason or self._early_stop_reason(value)

    def _early_stop_reason(self, value: float) -> str | None:
        """Why to stop after an evaluation whose monitored metric is `value` (None: go on)."""
        s, es, monitor = self.state, self.tcfg.early_stopping, self.tcfg.monitor
        if not es.enabled:
            return None
        if es.stop_at is not None and (value >= es.stop_at if self.tcfg.monitor_mode == "max" else value <= es.stop_at):
            return f"{monitor} reached {value:.4f} (target {es.stop_at}) at step {s.step}"
        if s.evals_without_improvement >= es.patience:
            return (
                f"early stopping: {monitor} did not improve by {es.min_delta} for {es.patience} evaluations "
                f"(best {s.best_metric:.4f} at step {s.best_step})"
            )
        return None

    def _already_stopped_early(self) -> str | None:
        """After resume: why the checkpointed run had stopped early, if it had (same rules as _after_eval)."""
        s, monitor = self.state, self.tcfg.monitor
        if not s.history or s.history[-1]["step"] != s.step or monitor not in s.history[-1]:
            return None
        reason = self._early_stop_reason(s.history[-1][monitor])
        return f"already finished: {reason}" if reason else None

    # ------------------------------------------------------------------ the loop
    def fit(self) -> FitResult:
        self.resume()
        self.writer = MetricsWriter(self.run_dir, self._build_trackers(), enabled=self.dist.is_main)
        sources = [self.model, *self.evaluators.values()]  # may define make_figures(run_dir, step)
        self.figures = FigureMaker(self.run_dir, sources, enabled=self.dist.is_main, log_images=self.writer.log_images)
        t = self.tcfg
        s = self.state
        last_metrics: dict[str, float] = {}
        log.info(
            "Training %s on %s x%d: steps %d -> %d, batch %d per rank",
            self.cfg.run_name, self.device, self.dist.world_size, s.step, t.max_steps, self.batch_size,
        )
        self.writer.log({"event": "start", "resumed_from_step": s.step, "time": time.time()}, s.step, kind="event")
        if s.step >= t.max_steps:
            s.stop_reason = f"already at max_steps={t.max_steps}"
        elif t.max_epochs is not None and s.epoch >= t.max_epochs:
            s.stop_reason = f"already at max_epochs={t.max_epochs}"
        else:  # a finished job run again (e.g. requeued by SLURM after its last step) just returns its metric
            s.stop_reason = self._already_stopped_early()
        self.model.train()
        window_start, window_steps = time.perf_counter(), 0
        interrupted = False
        anomaly = torch.autograd.detect_anomaly() if t.detect_anomaly else contextlib.nullcontext()
        self.progress = Progress(t.max_steps, s.step, enabled=self.dist.is_main, desc=self.cfg.run_name)
        # Plain ints: OmegaConf attribute reads cost ~0.3 ms per step in this loop (bench/overhead.py).
        log_interval, eval_interval = int(t.log_interval), int(t.eval_interval)
        max_steps, ckpt_interval = int(t.max_steps), int(t.checkpoint.interval)
        with GracefulShutdown() as shutdown, anomaly, self.progress:
            while s.stop_reason is None:
                self._refresh_data(s.epoch)
                self.train_sampler.start_epoch(s.epoch, s.batches_in_epoch * self.batch_size)
                for batch in self.train_loader:
                    batch = _to_device(batch, self.device)
                    self._log_step = (s.step + 1) % log_interval == 0
                    metrics = self.train_step(batch)
                    s.step += 1
                    s.batches_in_epoch += 1
                    window_steps += 1
                    self.progress.update()
                    if metrics is not None and s.step % log_interval == 0:
                        elapsed = time.perf_counter() - window_start
                        self._log_train(metrics, elapsed / window_steps)
                        window_start, window_steps = time.perf_counter(), 0
                    evaluated = False
                    if s.step % eval_interval == 0 or s.step >= max_steps:
                        last_metrics = self._run_evaluation()
                        evaluated = True
                    if s.step >= max_steps and s.stop_reason is None:
                        s.stop_reason = f"max_steps={max_steps} reached"
                    stop_now = s.stop_reason is not None
                    if any_rank(shutdown.requested, self.device) and not stop_now:
                        s.stop_reason = f"interrupted by {shutdown.signal_name or 'a signal on another rank'}"
                        interrupted = stop_now = True
                    if evaluated or stop_now or s.step % ckpt_interval == 0:
                        self.save_checkpoint()
                    if stop_now:
                        break
                else:  # epoch finished
                    s.epoch += 1
                    s.batches_in_epoch = 0
                    if t.max_epochs is not None and s.epoch >= t.max_epochs:
                        s.stop_reason = f"max_epochs={t.max_epochs} reached"
                        if not s.history or s.history[-1]["step"] != s.step:
                            last_metrics = self._run_evaluation()
                        self.save_checkpoint()
        log.info("Stopped: %s", s.stop_reason)
        self.writer.log({"event": "stop", "reason": s.stop_reason, "time": time.time()}, s.step, kind="event")
        if not interrupted:  # a pre-empted job exits at once; `python -m utils.monitoring.report` redraws later
            self.figures.now(s.step)
        self.writer.close()
        if interrupted:
            shutdown.chain_previous()  # e.g. submitit's SIGUSR2 handler: requeue the job, then exit
            raise TrainingInterrupted(s.stop_reason)
        if not last_metrics and s.history:
            last_metrics = {k: v for k, v in s.history[-1].items() if k != "step"}
        return FitResult(metric=s.best_metric, last_metrics=last_metrics, state=s, run_dir=self.run_dir)

    def _run_evaluation(self) -> dict[str, float]:
        metrics = self.evaluate()
        self._after_eval(metrics)
        self.writer.log(metrics, self.state.step, kind="val")
        log.info("step %d  %s", self.state.step, _fmt(metrics))
        if self.figures is not None:
            self.figures.maybe(self.state.step)
        return metrics

    def _log_train(self, metrics: dict[str, Any], step_time: float) -> None:
        values = {f"train/{k}": float(v) for k, v in metrics.items()}
        for named in self.optimizers:
            for i, group in enumerate(named.optimizer.param_groups):
                suffix = "" if len(named.optimizer.param_groups) == 1 else f"/group{i}"
                values[f"lr/{named.name}{suffix}"] = group["lr"]
        values = all_reduce_mean(values, self.device)
        values["time/step_s"] = step_time
        values["time/samples_per_s"] = self.tcfg.global_batch_size / step_time if step_time > 0 else 0.0
        if self._step_tokens:  # integer `inputs`: tokens per step over all ranks
            values["time/tokens_per_s"] = self._step_tokens * self.dist.world_size / step_time if step_time > 0 else 0.0
        values.update(peak_memory_mib(self.device))  # rank 0's peak RSS (and CUDA allocation)
        values["train/nonfinite_total"] = self.state.total_nonfinite
        values["epoch"] = self.state.epoch
        self.writer.log(values, self.state.step, kind="train")
        if self.dist.is_main:
            self.progress.set_metrics(values)
            log.info("step %d  %s", self.state.step, _fmt(values), extra={PROGRESS_LINE: True})


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _batch_len(batch[0])
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


def _total_norm(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]), 2.0)


def _component_grad_norms(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`grad_norm/<child>` per top-level submodule (and per parameter held directly by the model)."""
    groups: dict[str, list[torch.Tensor]] = {
        name: [p for p in child.parameters() if p.grad is not None] for name, child in model.named_children()
    }
    groups.update({name: [p] for name, p in model.named_parameters(recurse=False) if p.grad is not None})
    return {f"grad_norm/{name}": _total_norm(params) for name, params in groups.items() if params}


def _clip_with_norm(params: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale gradients down to max_norm, reusing a norm already computed (no second pass)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].device))


def _fmt(values: dict[str, Any]) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(values.items()))
