"""Launcher overhead: per-step time of the real `Trainer.fit` loop against a hand-written PyTorch loop.

    python -m bench.overhead [--steps N] [--repeats R] [--warmup W] [--threads T] [--device cpu]
                             [--hand-data loader|slice] [--profile] [--keep] [hydra overrides ...]

Both sides train the same model (built from the same composed config, same initial weights) on the same
dataset tensors with the same batch size, AdamW settings, warm-up schedule and gradient clipping, in one
process, with the same torch thread settings.

How it is timed. One real `Trainer.fit()` call runs W + R*N steps. A hook on `Trainer.train_step` (the
instance attribute the loop calls once per step, after fetching and moving the batch) time-stamps the
start of every launcher step, and at block boundaries runs blocks of the hand-written loop, paused
inside the launcher's loop so that their time never falls inside a launcher block. The order is

    W launcher warm-up steps, W hand warm-up steps, then H0 L0 H1 L1 ... H(R-1) L(R-1) HR

(blocks of N steps). A block's per-step time is (start of its step N - start of its step 1) / (N - 1):
N - 1 complete loop iterations (forward, backward, clip, optimizer step, schedule, bookkeeping, logging
every `log_interval` steps, fetching and moving the next batch). Start-up (building, `fit()`'s preamble)
and the end of `fit()` (final evaluation, checkpoint, figures) are outside every block: the number is
the steady-state step. Round r compares launcher block Lr with the mean of the hand blocks Hr and
H(r+1) around it, which cancels a machine that speeds up or slows down steadily; the headline RATIO is
the median of the R round ratios. The report also gives the median per-step time of each side (and
the ratio of those medians, which is the same number on a quiet machine but not robust to load that
changes between rounds) and the process CPU time per step.

Launcher side: the real `utils.training.trainer.Trainer`, built from the config composed from conf/ with Hydra's
compose API and validated as pretrain.py does, with these overrides (everything else default):

    grad_filter=none                          the same work as the hand loop (no Grokfast filter)
    optim=adamw                               pinned (the default group may change; optim=adam also works)
    trainer.device=<--device>                 cpu by default (the target is about CPU)
    trainer.max_steps=W+R*N                   (+N with --profile)
    trainer.eval_interval=10**9               no evaluation inside the timed steps (one at the end)
    trainer.checkpoint.interval=10**9         no periodic checkpoint inside the timed steps (one at the end)
    trainer.checkpoint.resume=false, trainer.early_stopping.enabled=false, trainer.eval_max_batches=1
    paths.* under a temporary directory (dataset, run directory, checkpoints), removed at exit

`log_interval` stays at its default: train.log, metrics.jsonl and the console log handler are written
as in a real run (the console handler is pointed at a file to keep this report readable). TQDM_DISABLE=1
is set, so the launcher runs as it does without a terminal (SLURM, CI): no progress bar.

Hand side: what a user writes in nanoGPT style: the model class and kwargs of the config, built after
`torch.manual_seed(seed)` (the same initial weights as the launcher's, checked and printed);
`torch.optim.AdamW` (or Adam, as configured) with the config's lr / betas / eps / weight_decay; the learning rate set by hand each
step with the same linear warm-up as `schedule=constant`; `F.cross_entropy`; `clip_grad_norm_`;
`zero_grad(set_to_none=True)`; `loss.item()` printed (to a file) every `log_interval` steps. Data with
`--hand-data loader` (default): `torch.utils.data.DataLoader(train_dataset, batch_size, shuffle=True,
drop_last=trainer.drop_last, collate_fn=data.collate_fn)` over the launcher's own dataset object, i.e. the same data
path as the launcher (the dataset's batched `__getitems__`, the same collate, no workers, no pinning on
CPU) with torch's RandomSampler instead of the launcher's resumable DistributedSampler. `--hand-data
slice` instead slices a per-epoch `torch.randperm` of the same tensors (nanoGPT's `get_batch` pattern,
no DataLoader), a cheaper and stricter baseline.

Exit status 0 whenever the measurement ran, whether or not the target (ratio < 1.03) is met.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
TARGET_RATIO = 1.03
NEVER = 10**9  # an interval no benchmark reaches
HAND_OPTIMIZERS = ("torch.optim.AdamW", "torch.optim.Adam")  # what the hand loop can mirror


# --------------------------------------------------------------------------------------------- timing
class StepClock:
    """Stamps step starts of a block of n steps; per-step time is (last - first) / (n - 1).

    On CUDA it synchronizes at the first and last stamp of a block only, so queued kernels are counted
    without adding a sync to every step of either loop.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.n = self.i = 0
        self.first = self.last = self.cpu_first = self.cpu_last = 0.0

    def start(self, n: int) -> None:
        self.n, self.i = n, 0

    def tick(self) -> None:
        i = self.i
        self.i += 1
        if i == 0 or i == self.n - 1:
            if self.cuda:
                torch.cuda.synchronize()
            now, cpu = time.perf_counter(), time.process_time()
            if i == 0:
                self.first, self.cpu_first = now, cpu
            else:
                self.last, self.cpu_last = now, cpu

    @property
    def done(self) -> bool:
        return self.i == self.n

    def per_step(self) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) per step of the block just run."""
        if not self.done:
            raise RuntimeError(f"block ran {self.i} steps, expected {self.n}")
        return (self.last - self.first) / (self.n - 1), (self.cpu_last - self.cpu_first) / (self.n - 1)


# --------------------------------------------------------------------------------------------- config
def compose_config(tmp: Path, device: str, max_steps: int, extra: list[str]) -> DictConfig:
    """The composed config (conf/config.yaml) with the benchmark's overrides, then the user's."""
    overrides = [
        "grad_filter=none",
        "optim=adamw",  # pinned (conf/config.yaml's default may change); the hand loop also mirrors optim=adam
        # `++`: set the key whether or not the YAML files mention it (the schema supplies the rest).
        f"++trainer.device={device}",
        f"++trainer.max_steps={max_steps}",
        f"++trainer.eval_interval={NEVER}",
        f"++trainer.checkpoint.interval={NEVER}",
        "++trainer.checkpoint.resume=false",
        "++trainer.early_stopping.enabled=false",
        "++trainer.eval_max_batches=1",
        f"++paths.root={tmp / 'checkpoints'}",
        f"++paths.data_root={tmp / 'datasets'}",
        f"++paths.run_dir={tmp / 'run'}",
        "++run_name=bench_overhead",
        *extra,
    ]
    from utils.config.store import register_configs

    register_configs()  # the schema and the `paths` group live in Hydra's ConfigStore, not in conf/
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="bench_overhead"):
        return compose(config_name="config", overrides=overrides)


def check_supported(cfg: DictConfig) -> None:
    """The hand loop mirrors the default set-up only; refuse configs it would not match."""
    problems = []
    if cfg.optim._target_ not in HAND_OPTIMIZERS or cfg.optim.get("components") or cfg.optim.get("param_groups"):
        problems.append(f"optim must be one of {HAND_OPTIMIZERS} (no components / param_groups)")
    if cfg.schedule is None or cfg.schedule._target_ != "utils.optim.schedules.constant":
        problems.append("schedule must be `constant` (linear warm-up, then flat)")
    if cfg.grad_filter._target_ != "utils.optim.grad_filters.NoFilter":
        problems.append("grad_filter must be none")
    t = cfg.trainer
    if t.precision != "fp32" or t.compile or t.ema.enabled or t.detect_anomaly or t.num_workers:
        problems.append("trainer.precision=fp32, compile / ema / detect_anomaly off and num_workers=0 are required")
    if t.max_epochs is not None:
        problems.append("trainer.max_epochs must be unset")
    if problems:
        raise SystemExit("bench.overhead: " + "; ".join(problems))


def build_launcher(cfg: DictConfig, sink: io.TextIOBase) -> Any:
    """The real Trainer, set up as pretrain.fit() does (cfg already validated)."""
    from utils.distributed import init_distributed
    from utils.monitoring.run_logging import setup_logging
    from utils.training.trainer import Trainer

    run_dir = Path(cfg.paths.run_dir).resolve()
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    dist_info = init_distributed(cfg.trainer.device, cfg.trainer.dist_backend)
    setup_logging(run_dir, dist_info.rank)
    for handler in logging.getLogger().handlers:  # the console handler: still written, but not to the terminal
        if getattr(handler, "_launcher", False) and type(handler) is logging.StreamHandler:
            handler.setStream(sink)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, dist_info, run_dir)


# --------------------------------------------------------------------------------------------- hand loop
def build_model(cfg: DictConfig, data: Any) -> torch.nn.Module:
    """The config's model class and arguments, the data's facts filling what it leaves out (the trainer's rule),
    after `torch.manual_seed(cfg.seed)`: the launcher's initial weights."""
    model_cls = get_class(cfg.model._target_)
    model_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "_target_"}
    facts = {k: v for k, v in data.model_kwargs().items() if k not in model_kwargs}
    torch.manual_seed(cfg.seed)
    return model_cls(**facts, **model_kwargs)


class HandLoop:
    """A plain PyTorch training loop over the same model, data and hyper-parameters."""

    def __init__(self, cfg: DictConfig, data: Any, device: torch.device, clock: StepClock, sink, mode: str,
                 model: torch.nn.Module | None = None) -> None:
        o, t = cfg.optim, cfg.trainer
        self.device, self.clock, self.sink, self.mode = device, clock, sink, mode
        self.model = (model if model is not None else build_model(cfg, data)).to(device)
        self.model.train()
        self.base_lr = float(o.lr)
        self.warmup_steps = int(cfg.schedule.get("warmup_steps", 0) or 0)
        self.optimizer = get_class(o._target_)(  # torch.optim.AdamW (the benchmark's default) or Adam
            self.model.parameters(), lr=self.base_lr, betas=tuple(o.betas), eps=float(o.eps),
            weight_decay=float(o.weight_decay),
        )
        self.grad_clip = t.grad_clip
        self.log_interval = int(t.log_interval)
        self.batch_size = int(t.global_batch_size)
        self.step = 0
        if mode == "loader":
            self.loader = DataLoader(
                data.train_dataset, batch_size=self.batch_size, shuffle=True, drop_last=bool(t.drop_last),
                collate_fn=data.collate_fn,
            )
            self._batches = iter(self.loader)
        else:
            self.inputs = data.train_dataset.tensors["inputs"]
            self.targets = data.train_dataset.tensors["target"]
            self.steps_per_epoch = len(self.targets) // self.batch_size
            self._perm, self._pos = torch.randperm(len(self.targets)), 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "loader":
            try:
                batch = next(self._batches)
            except StopIteration:
                self._batches = iter(self.loader)
                batch = next(self._batches)
            x, y = batch["inputs"], batch["target"]
        else:
            if self._pos == self.steps_per_epoch:
                self._perm, self._pos = torch.randperm(len(self.targets)), 0
            idx = self._perm[self._pos * self.batch_size : (self._pos + 1) * self.batch_size]
            self._pos += 1
            x, y = self.inputs[idx], self.targets[idx]
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def run(self, n: int) -> None:
        model, optimizer, clock = self.model, self.optimizer, self.clock
        clock.start(n)
        t0 = time.perf_counter()
        for _ in range(n):
            x, y = self.next_batch()
            clock.tick()
            lr = self.base_lr * (self.step / self.warmup_steps if self.step < self.warmup_steps else 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model({"inputs": x})["logits"]
            loss = F.cross_entropy(logits, y)
            loss.backward()
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self.step % self.log_interval == 0:
                t1 = time.perf_counter()
                print(f"step {self.step}: loss {loss.item():.4f}, lr {lr:.3g}, {(t1 - t0) * 1e3:.1f}ms",
                      file=self.sink, flush=True)
                t0 = t1


# --------------------------------------------------------------------------------------------- interleaving
class Interleaver:
    """Hooks `trainer.train_step`: stamps launcher steps and runs the hand blocks between launcher blocks.

    Order: launcher warm-up, hand warm-up, then H0 L0 H1 L1 ... H(R-1) L(R-1) HR: every launcher block
    has a hand block right before and right after it, and is compared with their mean, which cancels
    a machine that speeds up or slows down steadily. With `profile`, one more (untimed) round follows.
    """

    def __init__(self, trainer: Any, hand: HandLoop, warmup: int, steps: int, repeats: int, profile: bool) -> None:
        self.trainer, self.hand = trainer, hand
        self.warmup, self.steps, self.repeats = warmup, steps, repeats
        self.clock = StepClock(trainer.device)
        self.results: dict[str, list[tuple[float, float]]] = {"launcher": [], "hand": []}  # (wall, cpu) per block
        self.profile = profile
        self.profiles: dict[str, cProfile.Profile] = {}
        self.calls = 0
        self.started = self.finished = 0.0  # the timed part: first hand block to last launcher block's end
        real_step = trainer.train_step

        def timed_step(batch: Any) -> Any:  # the loop calls self.train_step(batch) once per step
            self._before_launcher_step()
            return real_step(batch)

        trainer.train_step = timed_step

    @property
    def total_launcher_steps(self) -> int:
        return self.warmup + (self.repeats + int(self.profile)) * self.steps

    def _hand_block(self) -> None:
        self.hand.run(self.steps)
        self.results["hand"].append(self.hand.clock.per_step())

    def _before_launcher_step(self) -> None:
        c = self.calls
        self.calls += 1
        if c < self.warmup:
            return
        block, i = divmod(c - self.warmup, self.steps)
        profiled = block == self.repeats
        if i == 0:
            if block == 0:
                self.hand.run(self.warmup)  # the hand loop's warm-up (untimed)
                self.started = time.perf_counter()
            if profiled:
                self.profiles["hand"] = cProfile.Profile()
                self.profiles["hand"].runcall(self.hand.run, self.steps)
                self.profiles["launcher"] = cProfile.Profile()
                self.profiles["launcher"].enable()
            elif block == 0:
                self._hand_block()  # later blocks' "before" hand block is the previous one's "after"
            self.clock.start(self.steps)
        self.clock.tick()
        if i == self.steps - 1:  # the block's last stamp: the launcher block is complete
            if profiled:
                self.profiles["launcher"].disable()
                return
            self.results["launcher"].append(self.clock.per_step())
            self._hand_block()  # before this launcher step runs, so outside every launcher block
            self.finished = time.perf_counter()
            self._progress(block)

    def paired_ratios(self, which: int) -> list[float]:
        """Launcher block r against the mean of hand blocks r and r+1 (which: 0 wall, 1 CPU time)."""
        h, lau = self.results["hand"], self.results["launcher"]
        return [lau[r][which] / ((h[r][which] + h[r + 1][which]) / 2) for r in range(len(lau))]

    def _progress(self, block: int) -> None:
        lw = self.results["launcher"][-1][0]
        hb, ha = self.results["hand"][-2][0], self.results["hand"][-1][0]
        print(f"  round {block + 1:2d}/{self.repeats}: hand {hb * 1e3:8.2f}, launcher {lw * 1e3:8.2f}, hand {ha * 1e3:8.2f}"
              f" ms/step   ratio {self.paired_ratios(0)[-1]:.3f}", flush=True)


# --------------------------------------------------------------------------------------------- report
def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def _print_profile(prof: cProfile.Profile, label: str, top: int) -> None:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    print(f"\n---- cProfile: {label} (sorted by own time) ----")
    print("\n".join(lines[start : start + top + 1]))


def report(args: argparse.Namespace, trainer: Any, hand: HandLoop, inter: Interleaver, same_init: bool,
           wall: float) -> None:
    cfg, t = trainer.cfg, trainer.cfg.trainer
    walls = {k: [w for w, _ in v] for k, v in inter.results.items()}
    cpus = {k: [c for _, c in v] for k, v in inter.results.items()}
    med = {k: statistics.median(v) for k, v in walls.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpus.items()}
    pair, cpu_pair = inter.paired_ratios(0), inter.paired_ratios(1)
    ratio = statistics.median(pair)
    ratio_of_medians = med["launcher"] / med["hand"]
    n_train = len(trainer.data.train_dataset)
    n_params = sum(p.numel() for p in hand.model.parameters())
    load = os.getloadavg() if hasattr(os, "getloadavg") else None

    print()
    print("bench.overhead: launcher Trainer.fit loop vs hand-written PyTorch loop (same model, data, optimizer)")
    print(f"  torch {torch.__version__}, python {platform.python_version()}, device {trainer.device}, "
          f"threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), cpus {os.cpu_count()}"
          + (f", load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min)" if load else ""))
    print(f"  model {cfg.model._target_} ({n_params:,} parameters); data {cfg.data._target_} "
          f"({n_train} train examples, {n_train // t.global_batch_size} steps/epoch)")
    print(f"  batch {t.global_batch_size}; {type(hand.optimizer).__name__} lr {cfg.optim.lr} betas {list(cfg.optim.betas)} "
          f"eps {cfg.optim.eps} weight_decay {cfg.optim.weight_decay}; warm-up {hand.warmup_steps} steps; "
          f"grad_clip {t.grad_clip}; grad_filter none; precision {t.precision}")
    print(f"  launcher: log_interval {t.log_interval} (default; train.log + metrics.jsonl + console handler); "
          f"evaluation and checkpoints only after the last timed step; no progress bar")
    print("  hand loop data: "
          + ("DataLoader(shuffle=True) over the same dataset and collate_fn" if args.hand_data == "loader"
             else "randperm index slicing of the same tensors")
          + f"; same initial weights: {'yes' if same_init else 'NO'}")
    print(f"  {args.repeats} launcher blocks and {args.repeats + 1} hand blocks of {args.steps} steps, alternating, "
          f"after {args.warmup} warm-up steps each; per-step time over {args.steps - 1} step intervals per block; "
          f"timed part {wall:.1f}s")
    print()
    print(f"  {'per step':10s} {'median':>11s} {'min':>11s} {'max':>11s}   (wall clock)")
    for name in ("launcher", "hand"):
        v = walls[name]
        print(f"  {name:10s} {statistics.median(v) * 1e3:8.2f} ms {min(v) * 1e3:8.2f} ms {max(v) * 1e3:8.2f} ms")
    print(f"  ratio of the medians: {ratio_of_medians:.4f} ({(med['launcher'] - med['hand']) * 1e3:+.2f} ms/step)")
    print(f"  per-round ratios (launcher block / mean of the hand blocks around it): "
          f"{' '.join(f'{x:.3f}' for x in pair)}")
    print(f"  process CPU time per step, median: launcher {cpu_med['launcher'] * 1e3:.2f} ms, hand "
          f"{cpu_med['hand'] * 1e3:.2f} ms; per-round ratios {' '.join(f'{x:.3f}' for x in cpu_pair)} "
          f"(median {statistics.median(cpu_pair):.4f})")
    print()
    print(f"  RATIO launcher/hand = {ratio:.4f}   (median of the per-round wall-clock ratios; "
          f"{100 * (ratio - 1):+.1f}% per step)")
    print(f"  target ratio < {TARGET_RATIO}: {'MET' if ratio < TARGET_RATIO else 'NOT MET'}")
    spread = max(pair) - min(pair)
    if spread > max(0.03, 2 * abs(ratio - 1)) or abs(ratio_of_medians - ratio) > 0.02:
        print(f"  note: the per-round ratios spread over {spread:.3f} (ratio of the medians {ratio_of_medians:.3f}): "
              "the machine is noisy (see load avg); rerun on an idle machine or with more --repeats.")
    if inter.profiles:
        _print_profile(inter.profiles["launcher"], f"launcher, {args.steps} steps (an extra round, not timed)", 30)
        _print_profile(inter.profiles["hand"], f"hand loop, {args.steps} steps (an extra round, not timed)", 20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Per-step time of the launcher's Trainer.fit loop vs a hand-written PyTorch loop.",
        epilog="Extra arguments are Hydra overrides applied after the benchmark's own (e.g. trainer.log_interval=1).",
    )
    parser.add_argument("--steps", type=int, default=40, help="steps per timed block (N, >= 3); default 40")
    parser.add_argument("--repeats", type=int, default=9, help="rounds of one block per side (R); default 9")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps on each side first; default 20")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="trainer.device for both sides (default cpu)")
    parser.add_argument("--hand-data", choices=("loader", "slice"), default="loader", help="hand loop's data path")
    parser.add_argument("--profile", action="store_true", help="add one untimed round under cProfile and print it")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.steps < 3 or args.repeats < 1 or args.warmup < 1:
        parser.error("--steps must be >= 3, --repeats >= 1, --warmup >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ["TQDM_DISABLE"] = "1"  # the launcher as without a terminal: no progress bar in the timed loop

    tmp = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    try:
        with open(tmp / "console.log", "w", encoding="utf-8") as sink:
            return _measure(args, overrides, tmp, sink)
    finally:
        if args.keep:
            print(f"  kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _measure(args: argparse.Namespace, overrides: list[str], tmp: Path, sink: io.TextIOBase) -> int:
    from utils.config.validation import validate_config
    from utils.training.trainer import TrainingInterrupted

    root_logger = logging.getLogger()
    try:
        total = args.warmup + (args.repeats + int(args.profile)) * args.steps
        cfg = validate_config(compose_config(tmp, args.device, total, overrides))  # as pretrain.fit() does
        check_supported(cfg)
        trainer = build_launcher(cfg, sink)
        hand = HandLoop(trainer.cfg, trainer.data, trainer.device, StepClock(trainer.device), sink, args.hand_data)
        same_init = _same_weights(trainer.model, hand.model)
        inter = Interleaver(trainer, hand, args.warmup, args.steps, args.repeats, args.profile)
        assert inter.total_launcher_steps == total
        print(f"bench.overhead: {args.warmup} warm-up steps each, then {args.repeats} rounds: hand, launcher, hand "
              f"blocks of {args.steps} steps (consecutive rounds share a hand block) ...", flush=True)
        try:
            trainer.fit()
        except TrainingInterrupted:
            print("bench.overhead: interrupted, no report.")
            return 130
        if len(inter.results["launcher"]) != args.repeats or len(inter.results["hand"]) != args.repeats + 1:
            raise RuntimeError(f"fit() stopped early at step {trainer.state.step}: {trainer.state.stop_reason}")
        report(args, trainer, hand, inter, same_init, inter.finished - inter.started)
        return 0
    finally:  # the launcher's log handlers write to files inside tmp: detach them before it goes
        for handler in [h for h in root_logger.handlers if getattr(h, "_launcher", False)]:
            root_logger.removeHandler(handler)
            handler.close()


if __name__ == "__main__":
    sys.exit(main())
