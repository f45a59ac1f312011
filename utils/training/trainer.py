"""The training loop, written once for every model family (the contract: utils/contract.py).

One step: callbacks' `on_train_batch_start` -> forward -> loss -> backward (or the model's local update)
-> non-finite guard -> grad filter -> clipping -> optimizer step -> schedules -> callbacks'
`on_after_optimizer_step` -> EMA. Around the steps: evaluations, checkpoints and plots at their
intervals (steps or epochs), curriculum stages, early stopping, graceful shutdown on signals.

Resume is exact: a checkpoint holds every module's and optimizer's state, the train state (step, epoch,
position in the epoch, stage), every rank's RNG state and carried state, and the callbacks' state. An
async save's copy of the weights and optimizer states overlaps the next step's forward and backward; the
step waits for it before its first change (`_before_updating`, docs/checkpoints.md).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from utils.config.errors import ConfigError, nearest_keys
from utils.contract import LocalLearner
from utils.distributed import DistInfo, all_reduce_mean, any_rank, barrier
from utils.monitoring.grad_monitor import GradientMonitor
from utils.monitoring.plots import FigureMaker
from utils.monitoring.progress import PROGRESS_LINE, Progress, peak_memory_mib, token_count
from utils.monitoring.run_logging import MetricsWriter, truncate_metrics
from utils.monitoring.trackers import scrub_secrets
from utils.modules import matches_prefix
from utils.optim.builder import NamedOptimizer, build_optimizers
from utils.optim.ema import ModelEMA
from utils.optim.grad_filters import GradFilter, NoFilter
from utils.optim.schedules import scale_learning_rate, steps_per_call
from utils.rng import capture_rng_state, restore_rng_state, seed_everything
from utils.signals import GracefulShutdown
from utils.storage.checkpoint import CheckpointError, CheckpointManager, assert_finite_state, tensors_in
from utils.training import config_changes, fsdp
from utils.training.callbacks import Callback, CallbackList
from utils.training.curriculum import Curriculum, Stage, stage_data_config
from utils.training.data_loading import ResumableDistributedSampler, ShardSampler, make_loader
from utils.training.intervals import Interval, parse_interval
from utils.training.state import FitResult, TrainState, is_improvement

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: train state as one dict, callbacks' state, curriculum stage


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """Stopped by a signal after saving a checkpoint; running again resumes."""


class Trainer:
    """Builds everything a config names and trains it.

    What callbacks (and the Python API's users) may read or call:
      model           the bare nn.Module (no DDP / compile wrapper; under trainer.strategy=fsdp its parameters
                      are shards, and model_state() gives the full weights)
      state           TrainState: step, epoch, stage, best metric, evaluation history
      stage           the current curriculum Stage
      data            the current data module
      optimizers      list of NamedOptimizer (.name, .optimizer); schedulers: {name: scheduler}
      run_dir, dist (rank, world_size, is_main), device, cfg
      log_metrics(values)   write extra metrics at the current step (rank 0), e.g. a callback's own
      reload_train_data()   rebuild the training loader after the data module's train set changed
    """

    def __init__(self, cfg: DictConfig, dist_info: DistInfo, run_dir: Path, model: torch.nn.Module | None = None) -> None:
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.dist = dist_info
        self.device = dist_info.device
        self.run_dir = run_dir
        self.state = TrainState()
        self.carry: Any = None
        t = self.tcfg
        self.eval_interval = parse_interval(t.eval_interval, "trainer.eval_interval")
        self.checkpoint_interval = parse_interval(t.checkpoint.interval, "trainer.checkpoint.interval")
        self.plot_interval: Interval | None = (
            parse_interval(t.plot_interval, "trainer.plot_interval") if t.plot_interval is not None else None
        )
        self.curriculum = Curriculum.from_config(cfg.get("curriculum"), t.monitor, t.monitor_mode)
        self.stage: Stage = self.curriculum[0]

        seed_everything(cfg.seed)
        self.data_cfg: DictConfig | None = None
        self.data: Any = None
        self.global_batch_size = 0
        self._use_data(stage_data_config(cfg.data, self.stage))
        self._use_batch_size(self.stage.batch_size or t.global_batch_size)
        self._build_model(model)
        self._build_optimization()
        self.callbacks = self._build_callbacks()
        self._base_loss_weights = self._loss_weights_for_stages()
        self._base_knobs = self._knobs_for_stages()
        self.frozen: list[torch.nn.Parameter] = []
        self.grad_filter_active = True
        seed_everything(cfg.seed + self.dist.rank)  # per-rank randomness (dropout) after identical init

        self.ckpt = CheckpointManager(run_dir, keep_last=t.checkpoint.keep_last, async_save=t.checkpoint.async_save,
                                      writer_nice=t.checkpoint.writer_nice)
        self.last_good_checkpoint: tuple[Path, int] | None = None  # written (or resumed from) by this run
        self._saved_steps: set[int] = set()  # checkpoints this run wrote itself
        self.resumed_run_ids: dict[str, str | None] = {}
        self.writer = MetricsWriter(None, enabled=False)  # opened in fit(), once a resumed run id is known
        self.figures: FigureMaker | None = None
        self.progress = Progress(0, enabled=False)
        self._log_step = False  # set by fit() on logging steps: train_step then measures per-component norms
        self._step_tokens = 0

    # ------------------------------------------------------------------ building
    def _use_data(self, data_cfg: DictConfig) -> bool:
        """Build the data module `data_cfg` describes (unless it is the one in use); True if it changed."""
        if self.data_cfg is not None and OmegaConf.to_container(data_cfg) == OmegaConf.to_container(self.data_cfg):
            return False
        with _rng_preserved():  # building data must not shift the training RNG streams (exact resume)
            data = instantiate(data_cfg)
            if self.dist.is_main:
                data.prepare_data()
            barrier()
            data.prepare_data()  # other ranks: the dataset is complete now, this only checks
            data.setup()
        self.data, self.data_cfg = data, data_cfg
        self.global_batch_size = 0  # loaders are rebuilt by _use_batch_size
        return True

    def _use_batch_size(self, global_batch_size: int) -> None:
        world = self.dist.world_size
        if global_batch_size % world:
            raise ConfigError(
                f"The global batch size {global_batch_size} is not divisible by the {world} processes; "
                f"pick a multiple of {world}."
            )
        if len(self.data.train_dataset) < global_batch_size:
            raise ConfigError(
                f"The training set has {len(self.data.train_dataset)} examples, fewer than the global batch size "
                f"{global_batch_size}; lower trainer.global_batch_size (or the stage's batch_size)."
            )
        if global_batch_size == self.global_batch_size:
            return
        self.global_batch_size = global_batch_size
        self.batch_size = global_batch_size // world
        self.reload_train_data()
        val_sampler = ShardSampler(self.data.val_dataset, world, self.dist.rank)
        self.val_loader = make_loader(
            self.data.val_dataset, val_sampler, self.tcfg.eval_batch_size or self.batch_size, self.data.collate_fn,
            self.tcfg.num_workers, False, self.device.type == "cuda",
        )

    def reload_train_data(self) -> None:
        """A new training loader over `data.train_dataset` (e.g. after a streaming data module took in shards)."""
        drop_last = self.tcfg.drop_last
        self.train_sampler = ResumableDistributedSampler(
            self.data.train_dataset, self.dist.world_size, self.dist.rank, self.cfg.seed, drop_last
        )
        self.train_loader = make_loader(
            self.data.train_dataset, self.train_sampler, self.batch_size, self.data.collate_fn,
            self.tcfg.num_workers, drop_last, self.device.type == "cuda",
        )

    def _build_model(self, model: torch.nn.Module | None) -> None:
        facts = self.data.model_kwargs()
        if model is None:
            model = _instantiate_with_facts(self.cfg.model, facts)
        self.model: torch.nn.Module = model.to(self.device)
        self.learns_locally = isinstance(self.model, LocalLearner)
        self.loss_fn = instantiate(self.cfg.loss)
        if isinstance(self.loss_fn, torch.nn.Module):
            self.loss_fn.to(self.device)
        self._scheduled_loss_weights = bool(getattr(self.loss_fn, "weight_schedules", None))
        self.evaluators = {name: _instantiate_with_facts(node, facts) for name, node in (self.cfg.evaluators or {}).items()}
        self.ema = ModelEMA(self.model, decay=self.tcfg.ema.decay) if self.tcfg.ema.enabled else None
        forward_model: torch.nn.Module = self.model
        # A local learner is not wrapped: DDP's hooks fire in backward, which it has none of; its updates are
        # averaged across ranks by _average_local_updates instead.
        # With trainer.strategy=fsdp the model itself becomes the sharded one (fully_shard works in place).
        self.sharded = False
        if self.dist.distributed and not self.learns_locally and any(p.requires_grad for p in self.model.parameters()):
            if self.tcfg.strategy == "fsdp":
                fsdp.shard_model(self.model, self.device)
                self.sharded = True
            else:
                device_ids = [self.device.index] if self.device.type == "cuda" else None
                forward_model = DistributedDataParallel(self.model, device_ids=device_ids)
        if self.tcfg.compile:
            forward_model = torch.compile(forward_model)  # type: ignore[assignment]
        self.forward_model = forward_model
        n_params = sum(p.numel() for p in self.model.parameters())
        mode = "learns with a local rule" if self.learns_locally else "learns by backprop"
        log.info("Model %s: %s parameters (%s)", type(self.model).__name__, f"{n_params:,}", mode)

    def _build_optimization(self) -> None:
        self.optimizers: list[NamedOptimizer] = build_optimizers(self.model, self.cfg.optim)
        self.schedulers: dict[str, Any] = {}
        horizon = self._schedule_horizon()
        for named in self.optimizers:
            schedule_cfg = named.schedule_cfg if named.schedule_cfg is not None else self.cfg.schedule
            if schedule_cfg is None:
                continue
            factory = instantiate(schedule_cfg)
            self.schedulers[named.name] = factory(named.optimizer, total_steps=horizon)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.grad_filter: GradFilter = instantiate(self.cfg.grad_filter) if self.cfg.grad_filter is not None else NoFilter()
        gm = self.tcfg.grad_monitor
        self.grad_monitor = (
            GradientMonitor(gm.vanishing_threshold, gm.exploding_threshold, warn_interval=gm.warn_interval)
            if gm.enabled else None
        )
        precision = self.tcfg.precision
        if precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("trainer.precision=fp16 needs a GPU (GradScaler); use bf16 or fp32 on CPU.")
        if precision == "fp16" and self.learns_locally:
            raise ConfigError("trainer.precision=fp16 scales gradients, which a local learner does not have; use bf16 or fp32.")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.grad_clip = self.tcfg.grad_clip if self.tcfg.grad_clip is not None else math.inf
        self.max_loss, self.max_grad_norm = self.tcfg.divergence.max_loss, self.tcfg.divergence.max_grad_norm

    def _schedule_horizon(self) -> int:
        """The steps a schedule spans: the whole run, which trainer.max_epochs may end before trainer.max_steps
        (a cosine then reaches its minimum at the last epoch). Counted with the first stage's batch size."""
        steps = int(self.tcfg.max_steps)
        if self.tcfg.max_epochs is not None:
            steps = min(steps, int(self.tcfg.max_epochs) * len(self.train_loader))
        return max(1, steps)

    def _build_callbacks(self) -> CallbackList:
        """The components that are Callbacks (model, loss, data, evaluators), then the `callbacks` group."""
        named: list[tuple[str, Any]] = [("model", self.model), ("loss", self.loss_fn), ("data", self.data)]
        named += [(f"evaluators/{name}", ev) for name, ev in self.evaluators.items()]
        found = [(name, obj) for name, obj in named if isinstance(obj, Callback)]
        for name, node in (self.cfg.callbacks or {}).items():
            callback = instantiate(node)
            if not isinstance(callback, Callback):
                raise ConfigError(
                    f"callbacks.{name} ({node._target_}) is not a Callback; subclass utils.training.callbacks.Callback."
                )
            found.append((f"callbacks/{name}", callback))
        return CallbackList(found)

    def _build_trackers(self) -> dict[str, Any]:
        """Experiment trackers (rank 0 only); a resumed run passes its tracker's run id back in."""
        if not self.dist.is_main:
            return {}
        trackers = {}
        for name, node in (self.cfg.logger or {}).items():
            params = inspect.signature(get_method(node._target_)).parameters
            facts = {"run_dir": str(self.run_dir), "resume_id": self.resumed_run_ids.get(name), "start_step": self.state.step}
            facts["config"] = scrub_secrets(OmegaConf.to_container(self.cfg, resolve=True))
            # Facts go to the partial, not through instantiate: its first parameter is named `config`, and
            # instantiate would recursively build the `_target_` nodes inside the config dict.
            trackers[name] = instantiate(node, _partial_=True)(**{k: v for k, v in facts.items() if k in params})
        return trackers

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ curriculum stages
    def _loss_weights_for_stages(self) -> dict[str, float]:
        names = self.curriculum.loss_weight_names()
        if not names:
            return {}
        weights = getattr(self.loss_fn, "weights", None)
        if not isinstance(weights, dict) or not callable(getattr(self.loss_fn, "set_weight", None)):
            raise ConfigError(
                f"curriculum stages set loss_weights {sorted(names)}, but the loss ({type(self.loss_fn).__name__}) has "
                "no named weights; use losses.composite.CompositeLoss."
            )
        unknown = sorted(names - set(weights))
        if unknown:
            raise ConfigError(f"curriculum loss_weights name unknown loss terms {unknown}; the terms are {sorted(weights)}.")
        scheduled = sorted(names & set(getattr(self.loss_fn, "weight_schedules", {}) or {}))
        if scheduled:
            raise ConfigError(
                f"loss terms {scheduled} have a weight_schedule and curriculum loss_weights; use one or the other."
            )
        return dict(weights)

    def _knobs_for_stages(self) -> dict[str, Any]:
        """The model's own value of every runtime knob a stage sets (restored in stages that do not set it)."""
        base = {}
        for name in sorted(self.curriculum.knob_names()):
            value = getattr(self.model, name, None)
            if not hasattr(self.model, name) or isinstance(value, (torch.nn.Module, torch.Tensor)) or callable(value):
                raise ConfigError(
                    f"curriculum stages set model.{name}, but {type(self.model).__name__} has no plain attribute "
                    f"{name!r} (runtime knobs are attributes of the model, e.g. the number of refinement steps)."
                )
            base[name] = value
        return base

    def _enter_stage(self, index: int, live: bool) -> None:
        """Apply stage `index`. `live`: entered now (not re-entered on resume), so learning rates are rescaled;
        on resume they come from the optimizers' checkpointed state."""
        previous, stage = self.stage, self.curriculum[index]
        self.stage = stage
        if self._use_data(stage_data_config(self.cfg.data, stage)):
            self.callbacks = self._build_callbacks()  # the data module may be a callback
        self._use_batch_size(stage.batch_size or self.tcfg.global_batch_size)
        for name, value in {**self._base_loss_weights, **stage.loss_weights}.items():
            self.loss_fn.set_weight(name, value)
        for name, value in {**self._base_knobs, **stage.model}.items():
            setattr(self.model, name, value)
        self._configure_grad_filter(stage)
        self.frozen = self._frozen_parameters(stage)
        if live:
            names = {n.name for n in self.optimizers}
            unknown = sorted(set(stage.lr_scale) - names)
            if unknown:
                raise ConfigError(f"{stage.label}: lr_scale names unknown optimizers {unknown}; they are {sorted(names)}.")
            first = previous is stage
            for named in self.optimizers:
                ratio = stage.lr_scale.get(named.name, 1.0) / (1.0 if first else previous.lr_scale.get(named.name, 1.0))
                if ratio != 1.0:
                    scale_learning_rate(named.optimizer, self.schedulers.get(named.name), ratio)
        if not self.curriculum.single:
            log.info("Entering %s at step %d", stage.label, self.state.step)
        self.callbacks.call("on_stage_start", self, stage)

    def _configure_grad_filter(self, stage: Stage) -> None:
        self.grad_filter_active = stage.grad_filter != "none"
        if isinstance(stage.grad_filter, dict):
            if isinstance(self.grad_filter, NoFilter):
                raise ConfigError(f"{stage.label} sets grad_filter options, but grad_filter=none; pick e.g. grad_filter=grokfast_ema.")
            self.grad_filter.configure(**stage.grad_filter)
        elif stage.grad_filter == "inherit":
            self.grad_filter.configure()

    def _frozen_parameters(self, stage: Stage) -> list[torch.nn.Parameter]:
        frozen = []
        for prefix in stage.freeze:
            matched = [p for n, p in self.model.named_parameters() if p.requires_grad and matches_prefix(n, prefix)]
            if not matched:
                raise ConfigError(
                    f"{stage.label}: freeze names {prefix!r}, which matches no trainable parameter; the model's "
                    f"submodules are {[n for n, _ in self.model.named_children()]}."
                )
            frozen += matched
        return frozen

    def _stage_end_reason(self, evaluated_metrics: dict[str, float] | None) -> str | None:
        """Why the current stage ends after this step (its budget, or its advance criterion), if it does."""
        s, stage = self.state, self.stage
        if evaluated_metrics is not None and stage.advance is not None:
            crit = stage.advance
            if crit.monitor not in evaluated_metrics:
                raise ConfigError(
                    f"{stage.label}: advance.monitor={crit.monitor!r} is not among the evaluation metrics: "
                    f"{', '.join(sorted(evaluated_metrics))}."
                )
            value = evaluated_metrics[crit.monitor]
            if crit.reached(value):
                return f"{crit.describe()} ({crit.monitor}={value:.4g})"
            if crit.improved(value, s.stage_best):
                s.stage_best, s.stage_evals_without_improvement = value, 0
            else:
                s.stage_evals_without_improvement += 1
                if crit.patience is not None and s.stage_evals_without_improvement >= crit.patience:
                    return crit.describe()
        if stage.max_steps is not None and s.step - s.stage_start_step >= stage.max_steps:
            return f"its budget of {stage.max_steps} steps"
        return None

    def _advance_stage(self, reason: str) -> None:
        s = self.state
        log.info("%s ended at step %d: %s", self.stage.label, s.step, reason)
        self.writer.log({"event": "stage_end", "stage": self.stage.index, "name": self.stage.name, "reason": reason},
                        s.step, kind="event")
        if self.stage.index + 1 >= len(self.curriculum):
            s.stop_reason = s.stop_reason or f"curriculum finished ({self.stage.label} ended: {reason})"
            return
        s.stage += 1
        s.stage_start_step = s.step
        s.stage_best, s.stage_evals_without_improvement = None, 0
        if s.batches_in_epoch:  # a stage starts on a fresh epoch
            s.epoch, s.batches_in_epoch = s.epoch + 1, 0
        self._enter_stage(s.stage, live=True)
        self.writer.log({"event": "stage", "stage": self.stage.index, "name": self.stage.name}, s.step, kind="event")

    # ------------------------------------------------------------------ checkpoints
    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's full weights: under FSDP a collective that gathers them to rank 0 (others get {})."""
        return fsdp.full_model_state(self.model) if self.sharded else self.model.state_dict()

    def _optimizer_states(self) -> dict[str, Any]:
        if self.sharded:  # collective; the same layout as a DDP run's (rank 0; {} elsewhere)
            return {n.name: fsdp.full_optimizer_state(self.model, n.optimizer) for n in self.optimizers}
        return {n.name: n.optimizer.state_dict() for n in self.optimizers}

    def checkpoint_state(self, check_finite: bool = True) -> dict[str, Any]:
        """Collective (RNG gather; under FSDP the weights and optimizer states too); complete on rank 0.

        References to the live tensors, not copies. `check_finite=False` leaves the NaN/Inf check of the
        weights to the checkpoint writer (async saves check their copy)."""
        model_state = self.model_state()
        if check_finite:
            assert_finite_state(model_state, "model weights")
        # Every rank's RNG stream and carried state (each rank carries its own rows), so each resumes its own.
        local = {"rng": capture_rng_state(), "carry": _to_device(self.carry, torch.device("cpu"))}
        if dist.is_initialized():
            gathered: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        return {
            "format": CHECKPOINT_FORMAT,
            "model_class": f"{type(self.model).__module__}.{type(self.model).__name__}",
            "model": model_state,
            "optimizers": self._optimizer_states(),
            "schedulers": {name: sch.state_dict() for name, sch in self.schedulers.items()},
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "grad_filter": self.grad_filter.state_dict(),
            "grad_monitor": self.grad_monitor.state_dict() if self.grad_monitor is not None else None,
            "loss": self.loss_fn.state_dict() if isinstance(self.loss_fn, torch.nn.Module) else {},
            "callbacks": self.callbacks.state_dict(),
            "carry_per_rank": [g["carry"] for g in gathered],
            "rng_per_rank": [g["rng"] for g in gathered],
            "world_size": self.dist.world_size,
            "train_state": self.state.to_dict(),
            "config": scrub_secrets(OmegaConf.to_container(self.cfg, resolve=True)),
            "logger_run_ids": self.writer.run_ids() if self.dist.is_main else {},
        }

    def save_checkpoint(self) -> None:
        """Collective (RNG gather); only rank 0 writes. Never during a non-finite streak: the weights of such
        a run may be finite but exploded, and the checkpoint before the streak is the one to resume from."""
        if self.state.consecutive_nonfinite:
            log.warning("Step %d is in a streak of %d non-finite steps: no checkpoint saved (the last good one is kept).",
                        self.state.step, self.state.consecutive_nonfinite)
            return
        # Async: the finite check runs on the copy in the writer (0.13 s at 25M, 0.76 s at 163M parameters in
        # bench/checkpoint_stall.py); its error, like any write error, is raised by the next save or at the end
        # of fit, with the same message.
        in_writer = self.ckpt.async_save
        state = self.checkpoint_state(check_finite=not in_writer)
        if self.dist.is_main:
            defer = self._changed_only_by_updates(state) if in_writer and self.tcfg.checkpoint.overlap_copy else None
            self.ckpt.save(state, self.state.step, finite={"model": "model weights"} if in_writer else None, defer=defer)
            if self.ema is not None:
                self.ckpt.save_named("ema_model.pt", {"model": self.ema.module.state_dict(), "step": self.state.step},
                                     defer=defer)
        self.last_good_checkpoint = (self.ckpt.step_path(self.state.step), self.state.step)
        self._saved_steps.add(self.state.step)
        barrier()

    def _changed_only_by_updates(self, state: dict[str, Any]) -> Callable[[torch.Tensor], bool]:
        """Which tensors of a checkpoint state change only in the update part of a step (after
        `_before_updating`): the weights and the optimizer, EMA and grad-filter states. An async save copies
        them while the next step's forward and backward run. Buffers, which a forward pass may change
        (BatchNorm statistics, memories), and everything else are copied before the save returns."""
        tensors = [*self.model.parameters(), *tensors_in(state["optimizers"]), *tensors_in(state["ema"]),
                   *tensors_in(state["grad_filter"])]
        storages = {(t.device, t.untyped_storage().data_ptr()) for t in tensors}
        return lambda t: (t.device, t.untyped_storage().data_ptr()) in storages

    def _before_updating(self) -> None:
        """The weights and optimizer states may change from here on: wait for the background copy of the last
        checkpoint (async saves with overlap_copy) to have read them."""
        self.ckpt.wait_for_snapshots()

    def resume(self) -> bool:
        """Load the newest valid checkpoint of the run directory, if any; re-enters its curriculum stage."""
        if not self.tcfg.checkpoint.resume:
            return False
        loaded = self.ckpt.load_latest(map_location=self.device)
        if loaded is None:
            return False
        ckpt, path = loaded
        current = scrub_secrets(OmegaConf.to_container(self.cfg, resolve=True))
        if ckpt.get("format") == CHECKPOINT_FORMAT:  # (another format is refused by _check_compatible)
            config_changes.refuse_what_cannot_continue(ckpt["config"], current, str(path))
        self._check_compatible(ckpt, path)
        step = int(ckpt["train_state"]["step"])
        self.last_good_checkpoint = (self.ckpt.step_path(step) if self.ckpt.step_path(step).exists() else path, step)
        if self.sharded:  # every rank read the whole file: each keeps its own shard
            fsdp.load_model_state(self.model, ckpt["model"])
            for named in self.optimizers:
                fsdp.load_optimizer_state(self.model, named.optimizer, ckpt["optimizers"][named.name])
        else:
            self.model.load_state_dict(ckpt["model"])
            for named in self.optimizers:
                named.optimizer.load_state_dict(ckpt["optimizers"][named.name])
        for name, sch in self.schedulers.items():
            sch.load_state_dict(ckpt["schedulers"][name])
        config_changes.apply(ckpt["config"], current, self.optimizers, self.schedulers)
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.grad_filter.load_state_dict(ckpt["grad_filter"])
        if self.grad_monitor is not None and ckpt.get("grad_monitor") is not None:
            self.grad_monitor.load_state_dict(ckpt["grad_monitor"])
        if isinstance(self.loss_fn, torch.nn.Module) and ckpt.get("loss"):
            self.loss_fn.load_state_dict(ckpt["loss"])
        carries = ckpt.get("carry_per_rank") or []
        if len(carries) == self.dist.world_size:
            self.carry = _to_device(carries[self.dist.rank], self.device)
        else:
            self.carry = None
            if any(c is not None for c in carries):
                log.warning("The checkpoint's carried state is for %d processes, this run has %d: starting from a fresh carry.",
                            len(carries), self.dist.world_size)
        self.state = TrainState.from_dict(ckpt["train_state"])
        if self.state.stage >= len(self.curriculum):
            raise CheckpointError(
                f"{path} is in curriculum stage {self.state.stage}, but this run's curriculum has {len(self.curriculum)} "
                "stages. Use --fresh to start over (old files are kept aside) or pick another run_name=..."
            )
        rngs = ckpt["rng_per_rank"]
        if ckpt.get("world_size") == self.dist.world_size:
            restore_rng_state(rngs[self.dist.rank])
        else:
            log.warning(
                "Checkpoint written by %s processes, resuming with %s: RNG streams restart from rank 0's; "
                "the global batches stay the same, but per-rank randomness (dropout) and the order of "
                "floating-point reductions change, so the continuation is not bitwise identical.",
                ckpt.get("world_size"), self.dist.world_size,
            )
            restore_rng_state(rngs[0])
        self._enter_stage(self.state.stage, live=False)
        self.callbacks.load_state_dict(ckpt.get("callbacks") or {})
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
    def train_step(self, batch: Any) -> dict[str, torch.Tensor] | None:
        """Forward, backward (or local update), filter, clip, step; counts the step (`state.step`) whether it
        was taken or skipped as non-finite. Returns metrics, or None when skipped."""
        if self.callbacks.implements("on_train_batch_start"):  # a callback may change weights there
            self._before_updating()
            self.callbacks.call("on_train_batch_start", self, batch)
        component_norms: dict[str, torch.Tensor] = {}
        monitor_metrics: dict[str, float] = {}
        if self._log_step:
            self._step_tokens = token_count(batch)
        if self._scheduled_loss_weights:
            self.loss_fn.update_weights(self.state.step)  # a pure function of the step: resume stays exact
        grad_context = torch.no_grad() if self.learns_locally else contextlib.nullcontext()
        with self._autocast(), grad_context:
            outputs = self.forward_model(batch, carry=self.carry)
            new_carry = outputs.pop("carry", None)
            model_metrics = outputs.pop("metrics", None) or {}
            losses = self.loss_fn(outputs, batch)
        total = losses["loss"]
        if self.learns_locally:
            self._before_updating()
            with torch.no_grad():  # a rule that needs autograd for a layer-local objective enables it itself
                self.model.local_update(batch, outputs)  # type: ignore[attr-defined]
            self._average_local_updates()
        else:
            if not total.requires_grad:
                raise ConfigError(
                    f"The loss of {type(self.model).__name__} has no gradient, so nothing would learn (a detached loss "
                    "or a model without trainable parameters). A model that learns with a local rule implements "
                    "local_update (utils.contract.LocalLearner)."
                )
            self.scaler.scale(total).backward()
            for named in self.optimizers:
                self.scaler.unscale_(named.optimizer)
        for p in self.frozen:  # frozen in this stage: the optimizer skips parameters without a gradient
            p.grad = None
        grad_norm = _total_norm(self.params)
        if self._log_step:  # logging steps only: per top-level submodule, measured like the total
            component_norms = _component_grad_norms(self.model)
            if self.grad_monitor is not None:  # per layer, before clipping: what backward produced
                monitor_metrics = self.grad_monitor.observe(self.model, self.state.step + 1)
        # One host sync per step: the non-finite guard must decide before any state changes. Both values come
        # over in one transfer and are checked in Python: on a small model the four tensor ops this replaces
        # (isfinite, isfinite, &, bool) cost ~0.1 ms of a ~0.6 ms step (bench/peers.py).
        loss_value, norm_value = torch.stack(
            [total.detach().float(), grad_norm.to(total.device, torch.float32)]
        ).tolist()
        ok = math.isfinite(loss_value) and math.isfinite(norm_value)
        if self.max_loss is not None:
            ok = ok and loss_value <= self.max_loss
        if self.max_grad_norm is not None:
            ok = ok and norm_value <= self.max_grad_norm
        if not ok:
            self._skip_nonfinite_step(total, grad_norm)
            self.state.step += 1  # a skipped step still consumed its batch: the data order stays the same
            return None
        self.state.consecutive_nonfinite = 0
        self.carry = _detach(new_carry)
        self._before_updating()
        if self.grad_filter_active and not isinstance(self.grad_filter, NoFilter):
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
        self.state.step += 1  # callbacks after the step see it counted (as Lightning's global_step)
        self.callbacks.call("on_after_optimizer_step", self, batch, outputs)
        if self.ema is not None:
            self.ema.update(self.model)
        # Detached: a logged loss must not keep the autograd graph alive until the next step.
        logged = {"grad_norm": grad_norm, **component_norms, **{k: v.detach() for k, v in losses.items()}}
        logged.update({k: torch.tensor(v) for k, v in monitor_metrics.items()})
        logged.update({k: torch.as_tensor(v).detach() for k, v in model_metrics.items()})
        if self._scheduled_loss_weights and self._log_step:
            logged.update({f"loss_weight/{k}": torch.tensor(v) for k, v in self.loss_fn.weights.items()})
        return logged

    def _average_local_updates(self) -> None:
        """Average a local learner's updates (in p.grad) across ranks, as DDP averages gradients.

        Every rank starts from the same weights and applies the same averaged update, so the ranks stay
        identical; all-reducing the weights instead would cost as much and let optimizer states drift.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.dist.world_size
        chunks = torch.split(flat, [g.numel() for g in grads])
        # view_as: a flat chunk only broadcasts onto a gradient with one non-trivial dimension (Oja's (1, D))
        torch._foreach_copy_(grads, [chunk.view_as(g) for chunk, g in zip(chunks, grads)])

    def _skip_nonfinite_step(self, total: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self._zero_grad()
        self.carry = None  # a carry built from non-finite activations would poison the next steps
        self.state.consecutive_nonfinite += 1
        self.state.total_nonfinite += 1
        if self.scaler.is_enabled():
            self.scaler.update()  # lets fp16 lower its scale instead of skipping forever
        if self.state.consecutive_nonfinite == 1:
            self._discard_checkpoint_before_the_streak()
        what = "update norm" if self.learns_locally else "gradient norm"
        loss, norm = float(total.detach()), float(grad_norm)
        if not math.isfinite(loss):
            problem = f"non-finite loss ({loss})"
        elif not math.isfinite(norm):
            problem = f"non-finite {what} ({norm})"
        elif self.max_loss is not None and loss > self.max_loss:
            problem = f"diverging loss {loss:.4g} > trainer.divergence.max_loss={self.max_loss}"
        else:
            problem = f"diverging {what} {norm:.4g} > trainer.divergence.max_grad_norm={self.max_grad_norm}"
        log.warning("Step %d: %s; step skipped (%d in a row, %d in total).", self.state.step + 1, problem,
                    self.state.consecutive_nonfinite, self.state.total_nonfinite)
        if self.state.consecutive_nonfinite >= self.tcfg.max_consecutive_nonfinite:
            if self.last_good_checkpoint is not None:
                path, step = self.last_good_checkpoint
                where = (f"The last good checkpoint is {path} (step {step}); the same command with other settings "
                         "resumes from it (a changed optim.lr is applied on resume)")
            else:
                where = "No checkpoint was written before the streak; the same command with other settings starts over"
            raise NonFiniteError(
                f"{self.state.consecutive_nonfinite} consecutive non-finite or diverging steps (last: {problem}; "
                f"trainer.max_consecutive_nonfinite={self.tcfg.max_consecutive_nonfinite}); stopped, no checkpoint "
                f"written during the streak. {where}: e.g. a lower optim.lr, trainer.grad_clip=1.0, or debug=anomaly "
                "to find the operation."
            )

    def _discard_checkpoint_before_the_streak(self) -> None:
        """A streak starting right after a checkpoint this run wrote: that checkpoint holds the weights that
        produced the first non-finite step (a finite loss can still leave exploded weights behind), so it is not a
        good one. The checkpoint a run resumed from is kept: the run before had continued from it."""
        if self.last_good_checkpoint is None or self.last_good_checkpoint[1] != self.state.step:
            return
        if self.state.step not in self._saved_steps:
            return
        path, step = self.last_good_checkpoint
        if self.dist.is_main:
            self.ckpt.discard(step)
        barrier()
        remaining = self.ckpt.checkpoints()
        newest = remaining[-1] if remaining else None
        self.last_good_checkpoint = (newest, int(newest.stem.split("_")[1])) if newest is not None else None
        log.warning("Step %d is non-finite right after the checkpoint of step %d, whose weights produced it: %s "
                    "discarded (the last good checkpoint is now %s).", step + 1, step, path.name,
                    newest.name if newest is not None else "none")

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
        last_batch = None
        extra_forwards = self._missing_eval_forwards() if self.sharded else 0  # before any forward: collective
        for i, batch in enumerate(self.val_loader):
            if self.tcfg.eval_max_batches is not None and i >= self.tcfg.eval_max_batches:
                break
            batch = last_batch = _to_device(batch, self.device)
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
        for _ in range(extra_forwards):  # unscored: only so that every rank's all-gathers are matched
            with self._autocast():
                model(last_batch, carry=None)
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

    def _eval_batches(self) -> int:
        limit = self.tcfg.eval_max_batches
        return len(self.val_loader) if limit is None else min(len(self.val_loader), int(limit))

    def _missing_eval_forwards(self) -> int:
        """FSDP: every forward gathers weights from all ranks, so a rank whose validation shard has fewer batches
        (shards differ by up to one example) runs its last batch again, unscored, until all have run as many.
        Collective: called by every rank before its first forward."""
        mine = self._eval_batches()
        packed = torch.tensor([mine], dtype=torch.long, device=self.device)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        if mine == 0:
            raise ConfigError(f"The validation set is smaller than the {self.dist.world_size} processes, so a rank "
                              "has nothing to evaluate; use fewer processes or trainer.strategy=ddp.")
        return int(packed.item()) - mine

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
        improved = is_improvement(value, s.best_metric, self.tcfg.monitor_mode, es.min_delta)
        if improved and not s.consecutive_nonfinite:
            s.best_metric, s.best_step, s.evals_without_improvement = value, s.step, 0
            weights = self.model_state() if self.tcfg.checkpoint.save_best else {}  # every rank (FSDP gathers)
            if self.tcfg.checkpoint.save_best and self.dist.is_main:
                best = {"model": weights, "step": s.step, "metric": value, "monitor": monitor}
                if self.ema is not None:
                    best["ema"] = self.ema.module.state_dict()
                self.ckpt.save_named("best.pt", best)
        else:
            s.evals_without_improvement += 1
        s.stop_reason = s.stop_reason or self._early_stop_reason(value)

    def _early_stop_reason(self, value: float) -> str | None:
        return early_stop_reason(self.state, self.tcfg, value)

    def _already_finished(self) -> str | None:
        return finished_reason(self.state, self.tcfg, self.curriculum)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> FitResult:
        if not self.resume():
            if self.dist.is_main:
                truncate_metrics(self.run_dir, -1)  # a run that starts over starts a fresh metrics.jsonl
            self._enter_stage(0, live=True)
        self._check_monitored_metrics()
        self.writer = MetricsWriter(self.run_dir, self._build_trackers(), enabled=self.dist.is_main)
        self.figures = FigureMaker(self.run_dir, list(self.callbacks), enabled=self.dist.is_main,
                                   log_images=self.writer.log_images)
        t, s = self.tcfg, self.state
        last_metrics: dict[str, float] = {}
        s.stop_reason = self._already_finished()  # a finished job run again (a SLURM requeue) only reports
        if s.stop_reason is None:
            log.info(
                "Training %s on %s x%d: steps %d -> %d, batch %d per rank%s",
                self.cfg.run_name, self.device, self.dist.world_size, s.step, t.max_steps, self.batch_size,
                "" if self.curriculum.single else f", {self.stage.label} of {len(self.curriculum)}",
            )
        self.writer.log({"event": "start", "resumed_from_step": s.step, "time": time.time()}, s.step, kind="event")
        if s.step == 0 and not self.curriculum.single:
            self.writer.log({"event": "stage", "stage": 0, "name": self.stage.name}, 0, kind="event")
        self.model.train()
        self.callbacks.call("on_fit_start", self)
        window_start, window_steps = time.perf_counter(), 0
        interrupted = False
        anomaly = torch.autograd.detect_anomaly() if t.detect_anomaly else contextlib.nullcontext()
        self.progress = Progress(t.max_steps, s.step, enabled=self.dist.is_main, desc=self.cfg.run_name)
        # Plain ints: OmegaConf attribute reads cost ~0.3 ms per step in this loop (bench/overhead.py).
        log_interval, max_steps = int(t.log_interval), int(t.max_steps)
        with GracefulShutdown() as shutdown, anomaly, self.progress, self._checkpoint_writes_joined():
            while s.stop_reason is None:
                if self.callbacks.implements("on_train_epoch_start"):
                    self._before_updating()  # a callback may change weights there (between a save and its copy)
                self.callbacks.call("on_train_epoch_start", self)
                self.train_sampler.start_epoch(s.epoch, s.batches_in_epoch * self.batch_size)
                stage_before = s.stage
                for batch in self.train_loader:
                    batch = _to_device(batch, self.device)
                    self._log_step = (s.step + 1) % log_interval == 0
                    metrics = self.train_step(batch)  # counts the step (s.step += 1)
                    s.batches_in_epoch += 1
                    window_steps += 1
                    self.progress.update()
                    if metrics is not None and s.step % log_interval == 0:
                        self._log_train(metrics, (time.perf_counter() - window_start) / window_steps)
                        window_start, window_steps = time.perf_counter(), 0
                    evaluated = None
                    if self.eval_interval.due_after_step(s.step) or s.step >= max_steps:
                        evaluated = last_metrics = self._run_evaluation()
                    stage_end = self._stage_end_reason(evaluated)
                    if stage_end is not None and evaluated is None:  # every stage ends with an evaluation
                        evaluated = last_metrics = self._run_evaluation()
                    if s.step >= max_steps and s.stop_reason is None:
                        s.stop_reason = f"max_steps={max_steps} reached"
                    if any_rank(shutdown.requested, self.device) and s.stop_reason is None:
                        s.stop_reason = f"interrupted by {shutdown.signal_name or 'a signal on another rank'}"
                        interrupted = True
                    if stage_end is not None and s.stop_reason is None:
                        self._advance_stage(stage_end)
                    if self.plot_interval is not None and self.plot_interval.due_after_step(s.step):
                        self.figures.now(s.step)
                    if (evaluated is not None or s.stop_reason is not None or s.stage != stage_before
                            or self.checkpoint_interval.due_after_step(s.step)):
                        self.save_checkpoint()
                    if s.stop_reason is not None or s.stage != stage_before:
                        break
                else:  # the epoch is done
                    s.epoch += 1
                    s.batches_in_epoch = 0
                    last_metrics = self._end_of_epoch(last_metrics)
        log.info("Stopped: %s", s.stop_reason)
        self.writer.log({"event": "stop", "reason": s.stop_reason, "time": time.time()}, s.step, kind="event")
        if not interrupted:  # a pre-empted job exits at once; `python -m utils.monitoring.report` redraws later
            self.callbacks.call("on_fit_end", self)
            self.figures.now(s.step)
        self.writer.close()
        if interrupted:
            shutdown.chain_previous()  # e.g. submitit's SIGUSR2 handler: requeue the job, then exit
            raise TrainingInterrupted(s.stop_reason)
        if not last_metrics and s.history:
            last_metrics = {k: v for k, v in s.history[-1].items() if k != "step"}
        return FitResult(metric=s.best_metric, last_metrics=last_metrics, state=s, run_dir=self.run_dir, trainer=self)

    @contextlib.contextmanager
    def _checkpoint_writes_joined(self) -> Iterator[None]:
        """Leave the loop only once every checkpoint write is on disk (async saves): the run never reports a
        checkpoint, exits or hands a signal on while its last save is still being written. Inside the signal
        handler's scope, so a signal during this wait is handled like one during a step."""
        try:
            yield
        except BaseException:
            self.ckpt.close(raise_errors=False)  # the loop's own error is the one reported
            raise
        self.ckpt.close()  # a failed write raises its error here

    def _end_of_epoch(self, last_metrics: dict[str, float]) -> dict[str, float]:
        """Epoch-counted evaluation, plots and checkpoints; max_epochs; a stage may end here too."""
        s, t = self.state, self.tcfg
        evaluated = None
        at_max_epochs = t.max_epochs is not None and s.epoch >= t.max_epochs
        already = bool(s.history) and s.history[-1]["step"] == s.step
        if (self.eval_interval.due_after_epoch(s.epoch) or at_max_epochs) and not already:
            evaluated = last_metrics = self._run_evaluation()
        if at_max_epochs and s.stop_reason is None:
            s.stop_reason = f"max_epochs={t.max_epochs} reached"
        stage_before = s.stage
        if evaluated is not None and s.stop_reason is None:
            stage_end = self._stage_end_reason(evaluated)
            if stage_end is not None:
                self._advance_stage(stage_end)
        if self.plot_interval is not None and self.plot_interval.due_after_epoch(s.epoch):
            self.figures.now(s.step)  # type: ignore[union-attr]
        if (evaluated is not None or s.stop_reason is not None or s.stage != stage_before
                or self.checkpoint_interval.due_after_epoch(s.epoch)):
            self.save_checkpoint()
        return last_metrics

    def _check_monitored_metrics(self) -> None:
        """Fail before training, not at the first evaluation, when a monitored metric is not produced.

        The names come from one validation batch (no gradients, RNG and evaluator state left as they were).
        """
        wanted = {"trainer.monitor": self.tcfg.monitor}
        wanted.update({f"curriculum.stages[{s.index}].advance.monitor": s.advance.monitor
                       for s in self.curriculum.stages if s.advance is not None})
        known = {k for record in self.state.history for k in record}
        if set(wanted.values()) <= known:
            return
        with _rng_preserved():
            limit, self.tcfg.eval_max_batches = self.tcfg.eval_max_batches, 1
            try:
                names = set(self.evaluate())
            finally:
                self.tcfg.eval_max_batches = limit
        for key, metric in wanted.items():
            if metric not in names:
                raise ConfigError(
                    f"{key}={metric!r} is not a metric this run produces{nearest_keys(metric, sorted(names))}; "
                    f"the evaluation metrics are: {', '.join(sorted(names))}."
                )

    def _run_evaluation(self) -> dict[str, float]:
        metrics = self.evaluate()
        self._after_eval(metrics)
        self.writer.log(metrics, self.state.step, kind="val")
        log.info("step %d  %s", self.state.step, self._eval_line(metrics))
        self.callbacks.call("on_validation_end", self, metrics)
        if self.figures is not None and self.plot_interval is None:
            self.figures.maybe(self.state.step)
        return metrics

    def log_metrics(self, values: dict[str, float]) -> None:
        """Extra metrics at the current step (rank 0 writes; e.g. a callback's own measurements)."""
        self.writer.log(values, self.state.step, kind="train")

    def _log_train(self, metrics: dict[str, Any], step_time: float) -> None:
        values = {f"train/{k}": float(v) for k, v in metrics.items()}
        for named in self.optimizers:
            for i, group in enumerate(named.optimizer.param_groups):
                suffix = "" if len(named.optimizer.param_groups) == 1 else f"/group{i}"
                values[f"lr/{named.name}{suffix}"] = group["lr"]
        values = all_reduce_mean(values, self.device)
        values["time/step_s"] = step_time
        values["time/samples_per_s"] = self.global_batch_size / step_time if step_time > 0 else 0.0
        if self._step_tokens:  # integer `inputs`: tokens per step over all ranks
            values["time/tokens_per_s"] = self._step_tokens * self.dist.world_size / step_time if step_time > 0 else 0.0
        values.update(peak_memory_mib(self.device))  # rank 0's peak RSS (and CUDA allocation)
        values["train/nonfinite_total"] = self.state.total_nonfinite
        values["epoch"] = self.state.epoch
        if not self.curriculum.single:
            values["stage"] = self.state.stage
        self.writer.log(values, self.state.step, kind="train")
        if self.dist.is_main:
            self.progress.set_metrics(values)
            log.info("step %d  %s", self.state.step, _fmt(values) if self.tcfg.log_verbose else self._train_line(values),
                     extra={PROGRESS_LINE: True})

    def _train_line(self, values: dict[str, float]) -> str:
        """step, loss, the monitored metric (last evaluation), learning rate(s), step time; the rest is in metrics.jsonl."""
        parts = [f"loss={values.get('train/loss', math.nan):.4g}"]
        monitor = self.tcfg.monitor
        if self.state.history and monitor in self.state.history[-1]:
            parts.append(f"{monitor}={self.state.history[-1][monitor]:.4g}")
        lrs = {k: v for k, v in values.items() if k.startswith("lr/")}
        if len(lrs) == 1:
            parts.append(f"lr={next(iter(lrs.values())):.3g}")
        else:
            parts += [f"{k}={v:.3g}" for k, v in lrs.items()]
        parts.append(f"{values['time/step_s'] * 1000:.1f} ms/step")
        if not self.curriculum.single:
            parts.append(f"stage={self.stage.name}")
        return "  ".join(parts)

    def _eval_line(self, metrics: dict[str, float]) -> str:
        """The monitored metric first (with the best so far), then the other validation metrics."""
        monitor, s = self.tcfg.monitor, self.state
        first = []
        if monitor in metrics:
            best = f" (best {s.best_metric:.4g} at step {s.best_step})" if s.best_metric is not None else ""
            first.append(f"{monitor}={metrics[monitor]:.4g}{best}")
        others = {k: v for k, v in metrics.items() if k != monitor}
        return "  ".join(first + [_fmt(others)] if others else first)


def early_stop_reason(s: TrainState, t: DictConfig, value: float) -> str | None:
    """Why to stop after an evaluation whose monitored metric is `value` (None: go on)."""
    es, monitor = t.early_stopping, t.monitor
    if not es.enabled:
        return None
    if es.stop_at is not None and (value >= es.stop_at if t.monitor_mode == "max" else value <= es.stop_at):
        return f"{monitor} reached {value:.4f} (target {es.stop_at}) at step {s.step}"
    if s.evals_without_improvement >= es.patience:
        return (
            f"early stopping: {monitor} did not improve by {es.min_delta} for {es.patience} evaluations "
            f"(best {s.best_metric:.4f} at step {s.best_step})"
        )
    return None


def finished_reason(s: TrainState, t: DictConfig, curriculum: Curriculum) -> str | None:
    """Why a checkpointed run has nothing left to do under config `t`, if it has not (same rules as the loop)."""
    if s.step >= t.max_steps:
        return f"already at max_steps={t.max_steps}"
    if t.max_epochs is not None and s.epoch >= t.max_epochs:
        return f"already at max_epochs={t.max_epochs}"
    last = curriculum[min(s.stage, len(curriculum) - 1)]
    if s.stage == len(curriculum) - 1 and last.max_steps is not None and s.step - s.stage_start_step >= last.max_steps:
        return f"curriculum already finished ({last.label} used its {last.max_steps} steps)"
    if not s.history or s.history[-1]["step"] != s.step or t.monitor not in s.history[-1]:
        return None
    reason = early_stop_reason(s, t, s.history[-1][t.monitor])
    return f"already finished: {reason}" if reason else None


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


def _instantiate_with_facts(node: DictConfig, facts: dict[str, Any]) -> Any:
    """Instantiate `node`, passing the data module's facts the target accepts and the config leaves unset."""
    params = inspect.signature(get_method(node._target_)).parameters
    extra = {k: v for k, v in facts.items() if k in params and k not in node}
    return instantiate(node, **extra)


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
    # FSDP: the norms of sharded gradients are DTensors; full_value reduces them over the shards (collective)
    return fsdp.full_value(torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]), 2.0))


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
