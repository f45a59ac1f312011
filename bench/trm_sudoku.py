"""TRM on Sudoku: training throughput (against a hand-written loop) and the exact accuracy reached.

    python -m bench.trm_sudoku [--steps N] [--rounds R] [--train] [--device cpu|cuda] [hydra overrides ...]

Throughput. The same model (built from `experiment=trm_sudoku` plus the overrides, same initial
weights) is trained for N steps by the launcher (`pretrain.fit`, evaluation and checkpoints pushed
past the timed steps) and by a hand-written loop (the carry fed back by hand, the same loss terms,
AdamAtan2, warm-up/cosine by `LambdaLR`, clipping), R rounds alternating the two. Per-step time is
the median of the steady-state steps (the launcher's `time/step_s` from metrics.jsonl; the hand loop
timed the same way). Reported: rows per second (one ACT step of one puzzle), puzzles per second
(puzzles that finished their ACT steps = rows/s divided by the mean number of steps, measured on the
launcher side), and the launcher/hand step-time ratio per round and its median.

Accuracy (`--train`): the full experiment as configured (`python train.py experiment=trm_sudoku`
would do the same), reporting the best val/exact_acc, the step it was reached, the wall time and the
final token accuracy / valid-grid fraction.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import pretrain  # noqa: E402
from utils.config.validation import validate_config  # noqa: E402
from utils.monitoring.run_logging import read_metrics  # noqa: E402


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def launcher_step_times(tmp: Path, overrides: list[str], steps: int, tag: str) -> tuple[list[float], float]:
    """Step times (s) of a real fit() and the mean ACT steps per finished puzzle."""
    cfg = compose_cfg([
        "experiment=trm_sudoku", f"run_name=bench_{tag}", f"paths.root={tmp / 'runs'}", f"paths.data_root={tmp / 'data'}",
        f"trainer.max_steps={steps}", "trainer.log_interval=1", f"trainer.eval_interval={10**9}",
        f"trainer.checkpoint.interval={10**9}", "trainer.checkpoint.resume=false", "trainer.eval_max_batches=1",
        "trainer.early_stopping.enabled=false", *overrides,
    ])
    result = pretrain.fit(validate_config(cfg))
    train = [m for m in read_metrics(result.run_dir) if "time/step_s" in m]
    times = [m["time/step_s"] for m in train[2:]]  # the first steps include start-up work
    halted = [(m["train/act/halted_frac"], m["train/act/steps"]) for m in train if m["train/act/halted_frac"] > 0]
    finished = sum(f for f, _ in halted)
    mean_steps = sum(f * s for f, s in halted) / finished if finished else math.nan
    return times, mean_steps


def hand_step_times(tmp: Path, overrides: list[str], steps: int) -> list[float]:
    """The same training written by hand: what a user without the launcher would write."""
    from adam_atan2_pytorch import AdamAtan2

    from losses.reasoning import QHaltTerm, TokenCrossEntropyTerm

    cfg = compose_cfg(["experiment=trm_sudoku", f"paths.data_root={tmp / 'data'}", *overrides])
    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup()
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.trainer.device if cfg.trainer.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = instantiate(cfg.model, **data.model_kwargs()).to(device)
    opt = AdamAtan2(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas))
    warmup, total = cfg.schedule.warmup_steps, cfg.trainer.max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warmup if s < warmup else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup))))
    )
    lm, q_halt = TokenCrossEntropyTerm(kind="stablemax"), QHaltTerm()
    loader = torch.utils.data.DataLoader(data.train_dataset, batch_size=cfg.trainer.global_batch_size, shuffle=True,
                                         drop_last=True, collate_fn=data.collate_fn)
    carry, times, done = None, [], 0
    model.train()
    while done < steps:
        for batch in loader:
            start = time.perf_counter()
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(batch, carry=carry)
            carry = {k: v.detach() for k, v in out.pop("carry").items()}
            loss = lm(out, batch) + 0.5 * q_halt(out, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            done += 1
            if done >= steps:
                break
    return times[2:]


def measure_throughput(args: argparse.Namespace, overrides: list[str], tmp: Path) -> dict:
    rounds = []
    batch = compose_cfg(["experiment=trm_sudoku", *overrides]).trainer.global_batch_size
    mean_steps = math.nan
    for r in range(args.rounds):
        launcher, mean_steps = launcher_step_times(tmp, overrides, args.steps, f"r{r}")
        hand = hand_step_times(tmp, overrides, args.steps)
        ratio = statistics.median(launcher) / statistics.median(hand)
        rounds.append({"launcher_step_s": statistics.median(launcher), "hand_step_s": statistics.median(hand), "ratio": ratio})
        print(f"round {r}: launcher {rounds[-1]['launcher_step_s'] * 1e3:.1f} ms/step, hand {rounds[-1]['hand_step_s'] * 1e3:.1f} ms/step, ratio {ratio:.3f}", flush=True)
    step_s = statistics.median(r["launcher_step_s"] for r in rounds)
    rows_per_s = batch / step_s
    return {
        "batch": batch,
        "launcher_step_s": step_s,
        "rows_per_s": rows_per_s,
        "mean_act_steps_per_puzzle": mean_steps,
        "puzzles_per_s": rows_per_s / mean_steps if mean_steps == mean_steps else None,
        "ratio_median": statistics.median(r["ratio"] for r in rounds),
        "rounds": rounds,
    }


def measure_accuracy(overrides: list[str], tmp: Path) -> dict:
    cfg = compose_cfg(["experiment=trm_sudoku", "run_name=bench_train", f"paths.root={tmp / 'runs'}",
                       f"paths.data_root={tmp / 'data'}", "trainer.checkpoint.resume=false", *overrides])
    start = time.perf_counter()
    result = pretrain.fit(validate_config(cfg))
    wall = time.perf_counter() - start
    history = result.state.history
    best = max(history, key=lambda h: h.get("val/exact_acc", -1.0))
    return {
        "best_val_exact_acc": best.get("val/exact_acc"),
        "best_step": best["step"],
        "final": {k: history[-1].get(k) for k in ("step", "val/exact_acc", "val/token_acc", "val/valid_grid")},
        "wall_s": wall,
        "stop_reason": result.state.stop_reason,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train", action="store_true", help="also train to the configured end and report accuracy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args, overrides = parser.parse_known_args()
    overrides = [f"trainer.device={args.device}", *overrides]
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench_trm_sudoku_"))
    report = {"machine": platform.node(), "threads": torch.get_num_threads(), "device": args.device, "overrides": overrides}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)
    try:
        report["throughput"] = measure_throughput(args, overrides, tmp)
        if args.train:
            report["accuracy"] = measure_accuracy(overrides, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
