"""The launcher against PyTorch Lightning (and a hand-written loop), side by side: steady-state steps/s.

    python -m bench.peers [--workloads tiny grokking] [--rounds 3] [--tiny-steps 3000] [--grokking-steps 300]
                          [--warmup W] [--checkpoint-every K] [--batch-size B]

Lightning is a benchmark-only dependency: `make bench-peers` (or `pip install -r requirements-bench.txt`).

Contestants, each in a fresh subprocess per round (one torch thread, OMP_NUM_THREADS=1, on CPU):

  hand            the hand-written loop of bench/overhead.py (HandLoop): the reference ceiling
  lightning       a minimal LightningModule (training_step: forward, F.cross_entropy, self.log("train_loss"))
                  with Lightning's Trainer at its defaults: progress bar and default logger (TensorBoard when
                  installed) on, model summary, and a ModelCheckpoint every K steps (the launcher's interval)
  lightning_bare  the same with enable_progress_bar, logger, enable_checkpointing and model summary off
  launcher        utils.training.api.train at its defaults: the progress bar, train.log, metrics.jsonl,
                  a checkpoint every K steps (trainer.checkpoint.interval=K, keep_last 3), and Adam's fused
                  kernel (conf/optim/adam.yaml: fused: true)
  launcher_unfused  the same with optim.fused=false: torch's default Adam implementation, the one the hand
                  loop and Lightning run, so launcher_unfused / lightning compares the loops alone

Every contestant trains the same model class from the same initial weights (torch.manual_seed(seed); the
report prints a checksum of each side's initial weights) on the same data: the launcher's own data module
(experiment=grokking: x * y mod 97) and its training set, read by a torch DataLoader with
shuffle=True over the same dataset object and collate_fn (hand, Lightning) or by the launcher's resumable
sampler; same batch size, same drop_last (trainer.drop_last), torch.optim.Adam with the experiment's lr,
betas, eps and weight decay (the launcher's fused kernel computes the same update to rounding), the same linear warm-up (the launcher's `constant` schedule: a stock LambdaLR,
stepped per optimizer step), no gradient clipping (the experiment's grad_clip is null), no Grokfast filter
(grad_filter=none: Lightning has none). Nothing validates inside the timed steps on any side (Lightning gets
no val_dataloader; the launcher's eval_interval is moved past the run, so it evaluates once at the end, as
its loop always does at max_steps); logging runs at the same cadence (trainer.log_interval = Lightning's
log_every_n_steps, 50).

The children run under a pseudo-terminal (120 columns), so each shows what a user sees in a terminal:
Lightning's bar and the launcher's bar (which shows only on a terminal) are both drawn; the parent reads
and discards the output.

Workloads:
  tiny      TinyMLP below (token embedding 16, one hidden layer of 64, ~12k parameters), batch 64: the
            per-step work is a fraction of a millisecond, so the loop's own overhead shows
  grokking  the grokking experiment's DecoderTransformer (2 layers, width 128), batch 512

How it is timed. Inside each child, a per-step hook stamps the wall clock and process CPU time (StepClock of
bench/overhead.py: only the block's first and last stamps are kept) at the same point of every step after
the warm-up: the hand loop at each step's start, Lightning's `on_train_batch_end`, the launcher's
`on_after_optimizer_step`. Per-step time = (last stamp - first stamp) / (N - 1) over the N steps after W
warm-up steps: full loop iterations (data, forward, backward, optimizer, schedule, logging, progress bar,
checkpoints every K steps), without start-up (imports, building, Lightning's set-up, the launcher's
pre-flight) or the end (final evaluation, checkpoint, figures). steps/s = 1 / per-step time.

Rounds: each round runs the four children one after another (in reversed order on odd rounds); a ratio is
taken per round between the children of that round (they ran minutes apart at most) and the report gives
the median of the per-round ratios, plus each contestant's median steps/s. Exit status 0 whenever the
measurement ran; 2 when Lightning is missing (one line says how to install it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.overhead import HandLoop, StepClock
from bench.overhead import build_model as build_configured
from utils.training.callbacks import Callback

ROOT = Path(__file__).resolve().parent.parent
NEVER = 10**9  # an interval no run reaches
CONTESTANTS = ("hand", "lightning", "lightning_bare", "launcher", "launcher_unfused")
INSTALL_HINT = ("bench.peers: Lightning is not installed (a benchmark-only dependency); install it with "
                "`make bench-peers` or `python -m pip install -r requirements-bench.txt`, then run again.")
# Per workload: the goal for launcher / Lightning-at-defaults, default timed steps, warm-up and checkpoint interval.
WORKLOADS: dict[str, dict[str, Any]] = {
    "tiny": {"goal": 2.0, "steps": 3000, "warmup": 200, "checkpoint_every": 500, "batch_size": 64},
    "grokking": {"goal": 1.0, "steps": 300, "warmup": 20, "checkpoint_every": 100, "batch_size": None},
}


# --------------------------------------------------------------------------------------------- the model
class TinyMLP(nn.Module):
    """Token embedding, flattened, one hidden ReLU layer, a logit per class (the launcher's model contract)."""

    def __init__(self, vocab_size: int, seq_len: int, num_classes: int, embed: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.mlp = nn.Sequential(nn.Linear(seq_len * embed, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, batch: dict[str, torch.Tensor], carry: object = None) -> dict[str, torch.Tensor]:
        return {"logits": self.mlp(self.embed(batch["inputs"]).flatten(1))}


def build_model(workload: str, cfg: Any, data: Any) -> nn.Module:
    """The workload's model with the launcher's initial weights (seeded by cfg.seed)."""
    if workload == "grokking":
        return build_configured(cfg, data)
    facts = data.model_kwargs()
    torch.manual_seed(cfg.seed)
    return TinyMLP(facts["vocab_size"], facts["seq_len"], facts["num_classes"])


def checksum(model: nn.Module) -> float:
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


# --------------------------------------------------------------------------------------------- config
def overrides_for(spec: dict[str, Any]) -> list[str]:
    """The launcher's overrides for a workload: its defaults except what the comparison pins."""
    out = [
        "experiment=grokking",
        "grad_filter=none",  # Lightning has no Grokfast filter: the same work on every side
        "trainer.device=cpu",
        "trainer.cpu_threads=1",
        f"trainer.max_steps={spec['warmup'] + spec['steps']}",
        f"trainer.eval_interval={NEVER}",  # no validation inside the timed steps (Lightning gets no val loader)
        f"trainer.checkpoint.interval={spec['checkpoint_every']}",
        f"paths.data_root={spec['data_root']}",
        f"paths.root={spec['run_dir']}",
        f"paths.run_dir={spec['run_dir']}",
    ]
    if spec["batch_size"] is not None:
        out.append(f"trainer.global_batch_size={spec['batch_size']}")
    if spec["contestant"] == "launcher_unfused":
        out.append("optim.fused=false")
    return out


def compose(spec: dict[str, Any], extra: list[str] = ()) -> Any:
    from utils.training.api import compose as launcher_compose

    return launcher_compose([*overrides_for(spec), *extra])


def data_module(cfg: Any) -> Any:
    from hydra.utils import instantiate

    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup()
    return data


# --------------------------------------------------------------------------------------------- the children
class _Clock:
    """The child's StepClock (bench/overhead.py) and what its hooks need: stamps steps W+1 .. W+N."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup = warmup
        self.clock = StepClock(torch.device("cpu"))
        self.clock.start(steps)
        self.init_checksum: float | None = None

    def after_step(self, steps_done: int) -> None:
        if steps_done > self.warmup and not self.clock.done:
            self.clock.tick()


CLOCK: _Clock | None = None  # the running child's clock (the launcher's callback finds it here)


class LauncherClock(Callback):
    """A launcher callback (the `callbacks` group, by `_target_`) that feeds CLOCK."""

    def on_fit_start(self, trainer: Any) -> None:
        assert CLOCK is not None
        CLOCK.init_checksum = checksum(trainer.model)

    def on_after_optimizer_step(self, trainer: Any, batch: Any, outputs: Any) -> None:
        CLOCK.after_step(trainer.state.step)  # type: ignore[union-attr]


def run_hand(spec: dict[str, Any], cfg: Any, clock: _Clock) -> dict[str, Any]:
    data = data_module(cfg)
    model = build_model(spec["workload"], cfg, data)
    clock.init_checksum = checksum(model)
    with open(Path(spec["run_dir"]) / "hand.log", "w", encoding="utf-8") as sink:
        hand = HandLoop(cfg, data, torch.device("cpu"), clock.clock, sink, "loader", model=model)
        hand.run(spec["warmup"])
        hand.run(spec["steps"])  # HandLoop ticks the clock at every step's start
    return {}


def run_lightning(spec: dict[str, Any], cfg: Any, clock: _Clock, bare: bool) -> dict[str, Any]:
    import lightning as L
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from utils.optim.schedules import constant

    class LitModel(L.LightningModule):
        """The minimal LightningModule a user writes around an existing model."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = F.cross_entropy(self.model(batch)["logits"], batch["target"])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            o = cfg.optim
            optimizer = torch.optim.Adam(self.parameters(), lr=float(o.lr), betas=tuple(o.betas), eps=float(o.eps),
                                         weight_decay=float(o.weight_decay))
            schedule = constant(optimizer, total_steps=int(cfg.trainer.max_steps),
                                warmup_steps=int(cfg.schedule.warmup_steps))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    class Stamps(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            clock.init_checksum = checksum(pl_module.model)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            clock.after_step(trainer.global_step)

    data = data_module(cfg)
    model = LitModel(build_model(spec["workload"], cfg, data))
    t = cfg.trainer
    loader = DataLoader(data.train_dataset, batch_size=int(t.global_batch_size), shuffle=True,
                        drop_last=bool(t.drop_last), collate_fn=data.collate_fn)
    common = {"accelerator": "cpu", "devices": 1, "max_steps": int(t.max_steps), "default_root_dir": spec["run_dir"],
              "log_every_n_steps": int(t.log_interval)}
    if bare:
        trainer = L.Trainer(**common, callbacks=[Stamps()], enable_progress_bar=False, logger=False,
                            enable_checkpointing=False, enable_model_summary=False)
    else:
        every = ModelCheckpoint(dirpath=Path(spec["run_dir"]) / "checkpoints",
                                                    every_n_train_steps=int(t.checkpoint.interval))
        trainer = L.Trainer(**common, callbacks=[Stamps(), every])
    trainer.fit(model, train_dataloaders=loader)
    ckpts = sorted(p.name for p in (Path(spec["run_dir"]) / "checkpoints").glob("*.ckpt")) if not bare else []
    return {"logger": type(trainer.logger).__name__ if trainer.logger is not None else None, "checkpoints": ckpts,
            "lightning": L.__version__}


def run_launcher(spec: dict[str, Any], cfg: Any, clock: _Clock) -> dict[str, Any]:
    from omegaconf import open_dict

    from utils.training.api import train

    with open_dict(cfg):
        cfg.callbacks = {"peers_clock": {"_target_": "bench.peers.LauncherClock"}}
    model = None
    if spec["workload"] == "tiny":
        model = build_model("tiny", cfg, data_module(cfg))  # the launcher builds the grokking model itself
    result = train(cfg, model=model)
    ckpts = sorted(p.name for p in (result.run_dir / "checkpoints").glob("*.pt")) \
        if (result.run_dir / "checkpoints").exists() else sorted(p.name for p in result.run_dir.glob("*.pt"))
    metrics = (result.run_dir / "metrics.jsonl").exists()
    return {"checkpoints": ckpts, "metrics_jsonl": metrics}


def child(spec: dict[str, Any]) -> None:
    """One contestant's run; writes its measurement to spec['result'] as JSON."""
    torch.set_num_threads(1)
    cfg = compose(spec)
    clock = _Clock(spec["warmup"], spec["steps"])
    # The launcher instantiates LauncherClock from the module `bench.peers`, which under `python -m` is not
    # this `__main__` module: set the clock where that class looks.
    importlib.import_module("bench.peers").CLOCK = clock
    Path(spec["run_dir"]).mkdir(parents=True, exist_ok=True)
    who = spec["contestant"]
    if who == "hand":
        extra = run_hand(spec, cfg, clock)
    elif who in ("lightning", "lightning_bare"):
        extra = run_lightning(spec, cfg, clock, bare=who == "lightning_bare")
    else:
        extra = run_launcher(spec, cfg, clock)
    wall, cpu = clock.clock.per_step()
    Path(spec["result"]).write_text(json.dumps({
        "per_step_s": wall, "cpu_per_step_s": cpu, "init_checksum": clock.init_checksum,
        "threads": torch.get_num_threads(), **extra,
    }))


# --------------------------------------------------------------------------------------------- the parent
def run_in_terminal(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `cmd` with stdout and stderr on a fresh pseudo-terminal (120x50); returns (exit code, output tail)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    tail: deque[bytes] = deque(maxlen=64)
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every process holding the terminal has exited
            break
        if not chunk:
            break
        tail.append(chunk)
    os.close(master)
    return proc.wait(), b"".join(tail).decode("utf-8", "replace")[-4000:]


def measure(workload: str, args: argparse.Namespace, work: Path) -> dict[str, list[dict[str, Any]]]:
    w = WORKLOADS[workload]
    base = {
        "workload": workload,
        "steps": getattr(args, f"{workload}_steps"),
        "warmup": args.warmup if args.warmup is not None else w["warmup"],
        "checkpoint_every": args.checkpoint_every if args.checkpoint_every is not None else w["checkpoint_every"],
        "batch_size": (args.batch_size if args.batch_size is not None else w["batch_size"]) if workload == "tiny"
        else w["batch_size"],
        "data_root": str(work / "datasets"),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TQDM_DISABLE", None)
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in args.contestants}
    print(f"\n{workload}: {args.rounds} rounds of {', '.join(args.contestants)} ({base['warmup']} warm-up + "
          f"{base['steps']} timed steps each, checkpoint every {base['checkpoint_every']})", flush=True)
    for r in range(args.rounds):
        order = list(args.contestants) if r % 2 == 0 else list(reversed(args.contestants))
        for who in order:
            run_dir = work / f"{workload}_{who}_r{r}"
            spec = {**base, "contestant": who, "run_dir": str(run_dir), "result": str(work / f"{run_dir.name}.json")}
            code, tail = run_in_terminal([sys.executable, "-m", "bench.peers", "--child", json.dumps(spec)], env)
            if code != 0:
                raise SystemExit(f"bench.peers: the {who} run of {workload} (round {r + 1}) failed with exit code "
                                 f"{code}; its last output:\n{tail}")
            results[who].append(json.loads(Path(spec["result"]).read_text()))
            shutil.rmtree(run_dir, ignore_errors=True)
        print(f"  round {r + 1}: " + "  ".join(f"{c} {1 / results[c][-1]['per_step_s']:7.1f}" for c in args.contestants)
              + " steps/s", flush=True)
    return results


def _paired(results: dict[str, list[dict[str, Any]]], a: str, b: str, key: str = "per_step_s") -> float | None:
    """Median over rounds of (time per step of b) / (time per step of a) in the same round: a's speed-up over b."""
    if a not in results or b not in results:
        return None
    return statistics.median(rb[key] / ra[key] for ra, rb in zip(results[a], results[b]))


def report(workload: str, results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    goal = WORKLOADS[workload]["goal"]
    print(f"\n{workload}: steady-state steps/s (median of {args.rounds} rounds; min-max), process CPU ms/step")
    for c, runs in results.items():
        rates = [1 / x["per_step_s"] for x in runs]
        cpu = statistics.median(x["cpu_per_step_s"] for x in runs) * 1e3
        extra = ""
        if runs[0].get("logger") is not None or c == "lightning":
            extra = f"   logger {runs[0].get('logger')}, {len(runs[0].get('checkpoints', []))} checkpoint file(s) kept"
        elif c.startswith("launcher"):
            extra = f"   metrics.jsonl {'yes' if runs[0]['metrics_jsonl'] else 'NO'}, {len(runs[0]['checkpoints'])} checkpoint file(s) kept"
        print(f"  {c:<17} {statistics.median(rates):8.1f} ({min(rates):.1f}-{max(rates):.1f})   cpu {cpu:6.3f} ms"
              f"   init checksum {runs[0]['init_checksum']:.6g}{extra}")
    sums = {round(x["init_checksum"], 4) for runs in results.values() for x in runs}
    print(f"  same initial weights everywhere: {'yes' if len(sums) == 1 else 'NO'}")
    lines = []
    for a, b in (("launcher", "lightning"), ("launcher", "lightning_bare"), ("launcher_unfused", "lightning"),
                 ("lightning", "hand"), ("lightning_bare", "hand"), ("launcher", "hand"), ("launcher_unfused", "hand"),
                 ("launcher", "launcher_unfused")):
        ratio = _paired(results, a, b)
        if ratio is not None:
            lines.append(f"  {a} / {b}: {ratio:.3f}   (by process CPU time: {_paired(results, a, b, 'cpu_per_step_s'):.3f})")
            if (a, b) == ("launcher", "lightning"):
                lines[-1] += f"   (goal >= {goal}: {'MET' if ratio >= goal else 'NOT MET'})"
    print("  ratios of steps/s (median of the per-round ratios; the CPU-time ratio is less disturbed by other load):")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers",
        description="Steady-state steps/s: the launcher against Lightning's Trainer (at its defaults and bare) "
                    "and a hand-written loop, same model, data, optimizer and batch, alternating in rounds.",
        epilog="Lightning is a benchmark-only dependency: make bench-peers (or pip install -r requirements-bench.txt).",
    )
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--contestants", nargs="+", choices=CONTESTANTS, default=list(CONTESTANTS))
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one run per contestant; default 3")
    parser.add_argument("--tiny-steps", type=int, default=WORKLOADS["tiny"]["steps"], help="timed steps, tiny MLP")
    parser.add_argument("--grokking-steps", type=int, default=WORKLOADS["grokking"]["steps"],
                        help="timed steps, grokking transformer")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: tiny 200, grokking 20)")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="steps between checkpoints, launcher and Lightning alike (default: tiny 500, grokking 100)")
    parser.add_argument("--batch-size", type=int, default=None, help="the tiny workload's batch (default 64)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one contestant's run (a JSON spec)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return 0
    if any(s < 3 for s in (args.tiny_steps, args.grokking_steps)) or args.rounds < 1:
        parser.error("--tiny-steps / --grokking-steps must be >= 3 and --rounds >= 1")
    if any(c.startswith("lightning") for c in args.contestants):
        try:
            import lightning  # noqa: F401
        except ImportError:
            print(INSTALL_HINT, file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="bench_peers_"))
    started, load0 = time.perf_counter(), os.getloadavg()
    try:
        print(f"bench.peers: torch {torch.__version__}, python {platform.python_version()}, cpus {os.cpu_count()}, "
              f"one thread per run; load average {' '.join(f'{x:.2f}' for x in load0)}")
        all_results = {}
        for workload in args.workloads:
            all_results[workload] = measure(workload, args, work)
        for workload, results in all_results.items():
            report(workload, results, args)
        load1 = os.getloadavg()
        print(f"\nwall {time.perf_counter() - started:.0f} s; load average at the end "
              f"{' '.join(f'{x:.2f}' for x in load1)} (1/5/15 min)")
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
