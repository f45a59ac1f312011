"""Checkpoint stall: how long a save holds up the training loop, synchronous against asynchronous.

    python -m bench.checkpoint_stall [--sizes 25M,163M] [--rounds 5] [--dir DIR] [--out results.json]
    python -m bench.checkpoint_stall --loop [--sizes 163M] [--saves 5] [--every 3] [--batch 16]

For each size, a stack of nn.Linear layers with that many parameters and Adam's state (exp_avg and
exp_avg_sq, after one step), saved through CheckpointManager the way the trainer saves it
({"model", "optimizers", "train_state"}), fsync'ed, keep_last=2, into DIR (default: a temporary directory
under the system's temp dir; put it on the disk your runs use). Each round saves once with
`async_save=False` and once with `async_save=True`, in alternating order (sync first in even rounds),
with a small in-place change of every weight before each save (as a training step would make).

Reported per size and mode, medians over the rounds after the first (the first async save allocates its
host buffers; it is reported on its own):

  stall      the time `save()` blocks the caller: the whole write for sync; for async the host copy of
             every tensor plus handing it to the writer thread (the previous write was finished first)
  write      the writer's time: torch.save + fsync + digest + rename + latest.pt + pruning (for sync it is
             the stall itself)
  finite     `assert_finite_state` on the weights: in the loop for sync, in the writer for async
  back-to-back  a second async save right after one (saves due faster than the disk writes): it waits
             for the previous write (wait), then copies
  fork()     not a mode of the launcher: how long os.fork() of this process takes, the stall a copy-on-write
             snapshot (a forked child writes) would start with

With --loop, the stall a save adds to a training loop, which is what a run feels: the same model trains
(forward, backward, Adam step on a batch of --batch rows) and saves every --every steps, in four modes
that take turns save by save:

  sync       the save writes in the loop (async_save=false)
  async      the save copies every tensor to host memory, then returns (overlap_copy=false)
  overlap    the save copies the buffers and returns; the weights and Adam states are copied by a
             background thread while the next step's forward and backward run, and that step waits for
             the copy before its Adam step (async_save and overlap_copy), the writer thread at the
             process's priority (trainer.checkpoint.writer_nice=0)
  overlap_nice  overlap with the writer thread at nice +10 (the trainer's default, writer_nice=10): it
             takes the CPU time the training and copy threads leave idle

  stall      per save: (the save call) + (the step after it) - (the median step that follows no save)

One intra-op thread (OMP_NUM_THREADS=1 is set here unless given), as the CPU presets run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402 - after OMP_NUM_THREADS

from utils.config.schema import CheckpointConf  # noqa: E402
from utils.storage.checkpoint import CheckpointManager, assert_finite_state  # noqa: E402

SIZES = {"25M": (1024, 24), "163M": (2048, 39)}  # (width, layers): 25.2M and 163.7M parameters


def build(width: int, layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    model = shapes.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()  # allocates exp_avg / exp_avg_sq, as after the first training step
    return model, opt


def state_of(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizers": {"main": opt.state_dict()},
        "train_state": {"step": step, "history": [{"step": step, "val/loss": 0.5}]},
    }


def measure(size: str, rounds: int, root: Path) -> dict[str, Any]:
    width, layers = SIZES[size]
    model, opt = build(width, layers)
    n_params = sum(p.numel() for p in model.parameters())
    managers = {
        "sync": CheckpointManager(root / size / "sync", keep_last=2, async_save=False),
        "async": CheckpointManager(root / size / "async", keep_last=2, async_save=True),
    }
    rows: dict[str, list[dict[str, float]]] = {"sync": [], "async": []}
    step = 0
    for r in range(rounds):
        for mode in ("sync", "async") if r % 2 == 0 else ("async", "sync"):
            step += 1
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-6)  # a new state each save, like a training step
            manager = managers[mode]
            state = state_of(model, opt, step)
            start = time.perf_counter()
            if mode == "sync":
                assert_finite_state(state["model"], "model weights")  # where the trainer runs it for sync saves
                manager.save(state, step)
            else:
                manager.save(state, step, finite={"model": "model weights"})
            stall = time.perf_counter() - start
            manager.wait()  # the next save comes later than the write takes (its wait is reported below)
            start = time.perf_counter()
            assert_finite_state(state["model"], "model weights")
            finite = time.perf_counter() - start
            rows[mode].append({"stall_s": stall, "write_s": manager.last_write_s["step"],
                               "wait_s": manager.last_wait_s, "finite_s": finite})
            print(f"{size} round {r} {mode:5s} stall {stall * 1e3:8.1f} ms  write {manager.last_write_s['step']:.3f} s",
                  flush=True)
    checkpoint_bytes = managers["sync"].checkpoints()[-1].stat().st_size
    # Saves due faster than the disk writes: the second of two back-to-back async saves waits for the first.
    managers["async"].save(state_of(model, opt, step + 1), step + 1)
    start = time.perf_counter()
    managers["async"].save(state_of(model, opt, step + 2), step + 2)
    back_to_back = time.perf_counter() - start
    back_to_back_wait = managers["async"].last_wait_s
    managers["async"].close()
    fork_s = fork_times(3) if hasattr(os, "fork") else []

    def med(mode: str, key: str) -> float:
        values = [row[key] for row in rows[mode][1:]] or [rows[mode][0][key]]
        return statistics.median(values)

    summary = {
        "parameters": n_params,
        "checkpoint_mib": checkpoint_bytes / 2**20,
        "rounds": rounds,
        "rows": rows,
        **{f"{mode}_{key}": med(mode, key) for mode in rows for key in ("stall_s", "write_s", "finite_s")},
        "async_first_stall_s": rows["async"][0]["stall_s"],
        # Not what the launcher does: what a copy-on-write snapshot (fork, the child writes) would stall for.
        "fork_s": statistics.median(fork_s) if fork_s else None,
        "async_back_to_back_stall_s": back_to_back,
        "async_back_to_back_wait_s": back_to_back_wait,
    }
    summary["stall_ratio_async_over_sync"] = summary["async_stall_s"] / summary["sync_stall_s"]
    del model, opt, managers
    return summary


LOOP_MODES = ("sync", "async", "overlap", "overlap_nice")
WRITER_NICE = CheckpointConf.writer_nice  # the trainer's default


def loop_stall(size: str, saves: int, every: int, batch: int, root: Path) -> dict[str, Any]:
    """Per mode, the stall each save adds to a training loop (see the module docstring)."""
    width, layers = SIZES[size]
    model, opt = build(width, layers)
    x = torch.randn(batch, width)
    weights_and_moments = {t.untyped_storage().data_ptr() for t in model.parameters()}
    weights_and_moments |= {t.untyped_storage().data_ptr() for st in opt.state.values() for t in st.values()
                            if isinstance(t, torch.Tensor)}

    def defer(t: torch.Tensor) -> bool:  # what the trainer defers: weights and optimizer states
        return t.untyped_storage().data_ptr() in weights_and_moments

    managers = {mode: CheckpointManager(root / size / f"loop_{mode}", keep_last=2, async_save=mode != "sync",
                                        writer_nice=WRITER_NICE if mode == "overlap_nice" else 0)
                for mode in LOOP_MODES}
    step_s: dict[str, list[float]] = {m: [] for m in LOOP_MODES}  # steps that follow no save
    stall_s: dict[str, list[float]] = {m: [] for m in LOOP_MODES}
    wait_s: dict[str, list[float]] = {m: [] for m in LOOP_MODES}  # the after-save step's wait for the copy
    call_s: dict[str, list[float]] = {m: [] for m in LOOP_MODES}  # the save call alone
    step = 0

    def train_step(manager: CheckpointManager) -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        manager.wait_for_snapshots()  # the trainer's _before_updating
        opt.step()
        return time.perf_counter() - start

    for save_index in range(saves + 1):  # the first cycle of each mode warms up (allocates host buffers)
        for mode in LOOP_MODES if save_index % 2 == 0 else LOOP_MODES[::-1]:
            manager = managers[mode]
            for _ in range(every - 1):
                t = train_step(manager)
                if save_index > 0:
                    step_s[mode].append(t)
            step += 1
            state = state_of(model, opt, step)
            start = time.perf_counter()
            if mode == "sync":
                assert_finite_state(state["model"], "model weights")
                manager.save(state, step)
            else:
                manager.save(state, step, finite={"model": "model weights"}, defer=defer if mode.startswith("overlap") else None)
            call = time.perf_counter() - start
            manager.last_snapshot_wait_s = 0.0
            after = train_step(manager)
            if save_index > 0:
                stall_s[mode].append(call + after)
                wait_s[mode].append(manager.last_snapshot_wait_s)
                call_s[mode].append(call)
            manager.wait()  # saves come further apart than the write takes (bench.checkpoint_stall's main mode)
    for manager in managers.values():
        manager.close()
    summary: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()), "batch": batch,
                               "every": every, "saves": saves}
    for mode in LOOP_MODES:
        base = statistics.median(step_s[mode])
        summary[mode] = {"step_s": base, "stalls_s": [v - base for v in stall_s[mode]],
                         "stall_s": statistics.median(stall_s[mode]) - base,
                         "copy_wait_s": statistics.median(wait_s[mode]), "call_s": statistics.median(call_s[mode]),
                         "after_step_excess_s": statistics.median(stall_s[mode]) - base - statistics.median(call_s[mode])}
    del model, opt, managers
    return summary


def fork_times(n: int) -> list[float]:
    """Seconds `os.fork()` takes in this process (the child exits at once): the stall of a copy-on-write
    snapshot, before the page faults the parent pays when it next writes the copied pages."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        times.append(time.perf_counter() - start)
        os.waitpid(pid, 0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="25M,163M", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--loop", action="store_true", help="the stall in a training loop, sync / async / overlap")
    parser.add_argument("--saves", type=int, default=5, help="--loop: timed saves per mode")
    parser.add_argument("--every", type=int, default=3, help="--loop: steps per save")
    parser.add_argument("--batch", type=int, default=16, help="--loop: rows per step")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; choose from {', '.join(SIZES)}")
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="ckpt_stall_", dir=args.dir))
    report: dict[str, Any] = {"load_average_at_start": os.getloadavg(), "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "dir": str(root)}
    try:
        for size in sizes:
            report[size] = (loop_stall(size, args.saves, args.every, args.batch, root) if args.loop
                            else measure(size, args.rounds, root))
            shutil.rmtree(root / size)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["load_average_at_end"] = os.getloadavg()
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
    if args.loop:
        print(f"\nload average {report['load_average_at_start'][0]:.2f} at start, "
              f"{report['load_average_at_end'][0]:.2f} at end; {report['threads']} torch thread(s); "
              f"medians of {args.saves} saves per mode")
        print("stall = the save call + what the next step takes over a step after no save (medians)")
        print("| size | batch | step | sync stall | async stall (call) | overlap stall (call; the next step's wait "
              f"for the copy) | overlap, writer at nice +{WRITER_NICE} (call; wait) | overlap / async | nice / overlap |")
        print("|---|---|---|---|---|---|---|---|---|")
        for size in sizes:
            s = report[size]
            ms = {m: {k: v * 1e3 for k, v in s[m].items() if k.endswith("_s") and not isinstance(v, list)} for m in LOOP_MODES}
            print(f"| {size} | {s['batch']} | {ms['sync']['step_s']:.0f} ms | {ms['sync']['stall_s']:.0f} ms "
                  f"| {ms['async']['stall_s']:.0f} ms ({ms['async']['call_s']:.0f} ms) "
                  f"| {ms['overlap']['stall_s']:.0f} ms ({ms['overlap']['call_s']:.0f} ms; "
                  f"{ms['overlap']['copy_wait_s']:.0f} ms) "
                  f"| {ms['overlap_nice']['stall_s']:.0f} ms ({ms['overlap_nice']['call_s']:.0f} ms; "
                  f"{ms['overlap_nice']['copy_wait_s']:.0f} ms) | {s['overlap']['stall_s'] / s['async']['stall_s']:.2f} "
                  f"| {s['overlap_nice']['stall_s'] / s['overlap']['stall_s']:.2f} |")
            for mode in LOOP_MODES:
                print(f"  {size} {mode}: stall per save " + ", ".join(f"{v * 1e3:.0f}" for v in s[mode]["stalls_s"])
                      + " ms")
        return 0

    print(f"\nload average {report['load_average_at_start'][0]:.2f} at start, {report['load_average_at_end'][0]:.2f} "
          f"at end; {report['threads']} torch thread(s); medians of rounds 2..{args.rounds}")
    print("| size | checkpoint | sync stall | async stall (first) | async / sync | write in background | "
          "finite check | back-to-back async stall (wait) | fork() |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        s = report[size]
        fork = f"{s['fork_s'] * 1e3:.1f} ms" if s["fork_s"] is not None else "n/a"
        print(f"| {size} ({s['parameters'] / 1e6:.1f}M params + Adam) | {s['checkpoint_mib']:.0f} MiB "
              f"| {s['sync_stall_s'] * 1e3:.0f} ms | {s['async_stall_s'] * 1e3:.0f} ms "
              f"({s['async_first_stall_s'] * 1e3:.0f} ms) | {s['stall_ratio_async_over_sync']:.3f} "
              f"| {s['async_write_s'] * 1e3:.0f} ms | {s['sync_finite_s'] * 1e3:.0f} ms "
              f"| {s['async_back_to_back_stall_s'] * 1e3:.0f} ms ({s['async_back_to_back_wait_s'] * 1e3:.0f} ms) | {fork} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
