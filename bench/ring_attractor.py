"""Ring attractor (seed 001): what the trained network does, and how fast the batched simulation runs.

    python -m bench.ring_attractor --run-dir checkpoints/ring_attractor   # a run of experiment=ring_attractor
    python -m bench.ring_attractor --train                                # train it first (minutes to an hour)
    python -m bench.ring_attractor                                        # the untrained network and the speed only

Measured on fresh trials (models/ring_attractor/analysis.py), for the untrained network of the run's
config and for the run's best-validation weights (best.pt) side by side:

- cue tracking: mean decoding error (deg) while a cue follows a random 1 s trajectory (angular velocity
  an OU process, 1.5 rad/s standard deviation), with the network's trained noise; the bump's shape
  (peak over mean E rate);
- bump stability: a cue for 0.2 s, then 1 s of nothing: drift without noise (deg/s) and the diffusion
  the trained noise adds (deg^2/s), plus the fraction of bumps still there;
- integration: a cue for 0.1 s, then 2 s of angular velocity only: decoding error at the end against
  holding the initial heading on the same trials;
- a figure, <run dir>/plots/bench_activity.png: the trained network's E rates over time in a
  cue-tracking and an integration trial, with the true heading;
- speed: simulated time steps per second of one batch of 32 trials against a plain per-sample loop of
  the same equations (`RingAttractorNetwork.simulate` on one trial at a time), alternating rounds in
  one process; the ratio is the median over rounds.

Goals (the issue's, for the 800/200 network on CPU): tracking error < 5 deg, drift < 5 deg/s,
integration error well under the hold-the-initial-heading error. The report says MET / NOT MET; the
exit status is 0 whenever the measurement ran.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dataset.ring_attractor.tasks import cue_tracking_trials, velocity_integration_trials  # noqa: E402
from models.ring_attractor.analysis import (  # noqa: E402
    DEGREES,
    measure_bump_stability,
    measure_cue_tracking,
    measure_integration,
)
from models.ring_attractor.network import RingAttractorNetwork  # noqa: E402
from utils.storage.checkpoint import load_checkpoint  # noqa: E402
from utils.training.api import compose, train  # noqa: E402

TRACKING_GOAL_DEG, DRIFT_GOAL_DEG_PER_S = 5.0, 5.0


def networks_of_run(run_dir: Path) -> tuple[RingAttractorNetwork, RingAttractorNetwork, dict[str, Any]]:
    """(untrained network of the run's config, the same with best.pt's weights, the run's config)."""
    config = load_checkpoint(run_dir / "latest.pt")["config"]
    torch.manual_seed(config["seed"])
    untrained = instantiate(config["model"])
    trained = instantiate(config["model"])
    trained.load_state_dict(load_checkpoint(run_dir / "best.pt")["model"])
    return untrained, trained, config


def measure_all(model: RingAttractorNetwork, trials: int) -> dict[str, float]:
    tracking = measure_cue_tracking(model, num_trials=trials)
    stability = measure_bump_stability(model, num_trials=trials)
    integration = measure_integration(model, num_trials=trials)
    return {
        "tracking error (deg)": tracking.error_deg,
        "bump peak / mean rate": tracking.peak_over_mean,
        "bump resultant length": tracking.concentration,
        "drift, no noise (deg/s)": stability.drift_deg_per_s,
        "diffusion, trained noise (deg^2/s)": stability.diffusion_deg2_per_s,
        "rms displacement after 1 s (deg)": stability.rms_displacement_deg,
        "bumps kept after 1 s": stability.bump_kept,
        "integration error at 2 s (deg)": integration.final_error_deg,
        "hold initial heading at 2 s (deg)": integration.hold_error_deg,
        "integration error, mean over 2 s (deg)": integration.mean_error_deg,
    }


def speed(model: RingAttractorNetwork, steps: int, rounds: int, batch: int = 32, dt: float = 0.002) -> dict[str, Any]:
    """Batched `simulate` of `batch` trials vs one trial at a time, alternating; noise on (the same work)."""
    trials = cue_tracking_trials(batch, steps * dt, dt, torch.Generator().manual_seed(0))
    args = [trials[k] for k in ("cue_heading", "cue_strength", "velocity_input")]

    def batched() -> float:
        start = time.perf_counter()
        model.simulate(*args, dt, noise=True)
        return time.perf_counter() - start

    def per_sample() -> float:
        start = time.perf_counter()
        for i in range(batch):
            model.simulate(*(a[i:i + 1] for a in args), dt, noise=True)
        return time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        batched(), per_sample()  # warm-up
        times = [(batched(), per_sample()) for _ in range(rounds)]
    ratios = [loop / vec for vec, loop in times]
    vec, loop = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
    return {"steps": steps, "batch": batch, "rounds": rounds, "ratio": statistics.median(ratios), "ratios": ratios,
            "batched_steps_per_s": steps / vec, "batched_trial_steps_per_s": steps * batch / vec,
            "loop_trial_steps_per_s": steps * batch / loop}


def draw_activity(model: RingAttractorNetwork, path: Path, dt: float = 0.002) -> Path:
    """E rates over time (a heat map, the true heading drawn on top) of one cue-tracking trial and one
    integration trial, with the network's noise."""
    from matplotlib.figure import Figure

    generator = torch.Generator().manual_seed(7)
    trials = {"cue tracking (cue on throughout)": cue_tracking_trials(1, 1.0, dt, generator),
              "integration (cue for 0.1 s, then angular velocity only)":
                  velocity_integration_trials(1, 2.1, dt, generator, cue_duration=0.1)}
    fig = Figure(figsize=(10, 6.5))
    fig.subplots_adjust(left=0.08, right=0.9, bottom=0.08, top=0.89, hspace=0.35)
    model.eval()
    for row, (title, trial) in enumerate(trials.items()):
        with torch.no_grad():
            sim = model.simulate(trial["cue_heading"], trial["cue_strength"], trial["velocity_input"], dt, noise=True,
                                 generator=torch.Generator().manual_seed(row), record_rates=True)
        # [n_exc, T], rolled by half a ring so that row 0 is the neuron preferring -180 deg (neuron i prefers 360 i / n)
        rates = torch.roll(sim.rates_e[0].T, shifts=model.n_exc // 2, dims=0)
        ax = fig.add_subplot(2, 1, row + 1)
        duration = rates.shape[1] * dt
        image = ax.imshow(rates, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=1.0,
                          extent=(0.0, duration, -180.0, 180.0))
        heading = torch.remainder(trial["heading"][0] * DEGREES + 180.0, 360.0) - 180.0
        time = torch.arange(1, len(heading) + 1) * dt
        ax.scatter(time[::5], heading[::5], s=2, color="white")  # dots: no line across the wrap at +-180
        ax.set_title(f"{title}; white dots: the true heading", fontsize=10)
        ax.set_ylabel("preferred direction (deg)")
        ax.set_yticks([-180, -90, 0, 90, 180])
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="E rate")
    ax.set_xlabel("time (s)")
    fig.suptitle("excitatory activity of the trained ring", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=90)
    return path


def train_run(out: Path, extra: list[str]) -> Path:
    result = train(compose(["experiment=ring_attractor", f"paths.root={out}", *extra]))
    return result.run_dir


def report(columns: dict[str, dict[str, float]], speed_result: dict[str, Any], config: dict[str, Any] | None,
           wall_s: float) -> None:
    print("\n== Ring attractor (bench/ring_attractor.py) ==")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if config is not None:
        m = config["model"]
        print(f"network: {m['n_exc']} E / {m['n_inh']} I, sigma_ee {m['sigma_ee']}; run {config['paths']['run_dir']}")
    names = list(next(iter(columns.values())))
    print(f"\n{'measure':42s}" + "".join(f"{label:>14s}" for label in columns))
    for name in names:
        print(f"{name:42s}" + "".join(f"{values[name]:14.3f}" for values in columns.values()))
    final = columns[list(columns)[-1]]
    goals = [
        ("tracking error < 5 deg", final["tracking error (deg)"] < TRACKING_GOAL_DEG),
        ("drift < 5 deg/s", final["drift, no noise (deg/s)"] < DRIFT_GOAL_DEG_PER_S),
        ("integration error well under holding (< 1/4 of it)",
         final["integration error at 2 s (deg)"] < 0.25 * final["hold initial heading at 2 s (deg)"]),
    ]
    print(f"\ngoals ({list(columns)[-1]} network):")
    for text, met in goals:
        print(f"  {text:52s} {'MET' if met else 'NOT MET'}")
    s = speed_result
    print(f"\nspeed, {s['steps']} steps of {s['batch']} trials, {s['rounds']} alternating rounds:")
    print(f"  batched:    {s['batched_steps_per_s']:10.1f} time steps/s ({s['batched_trial_steps_per_s']:.0f} trial-steps/s)")
    print(f"  per sample: {s['loop_trial_steps_per_s']:10.1f} trial-steps/s")
    print(f"  RATIO batched / per-sample: {s['ratio']:.1f}x (rounds: {', '.join(f'{r:.1f}' for r in s['ratios'])})")
    print(f"\nwall time {wall_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, help="a finished run of experiment=ring_attractor (latest.pt, best.pt)")
    parser.add_argument("--train", action="store_true", help="train experiment=ring_attractor first (under --out)")
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints", help="paths.root for --train")
    parser.add_argument("--trials", type=int, default=64, help="fresh trials per measurement")
    parser.add_argument("--speed-steps", type=int, default=200)
    parser.add_argument("--speed-rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steady on a shared machine)")
    parser.add_argument("overrides", nargs="*", help="hydra overrides for --train (e.g. ring=aggressive)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    run_dir = train_run(args.out, args.overrides) if args.train else args.run_dir
    if run_dir is not None:
        untrained, trained, config = networks_of_run(Path(run_dir))
        columns = {"untrained": measure_all(untrained, args.trials), "trained": measure_all(trained, args.trials)}
        print("trained ring parameters:", {k: round(v, 4) for k, v in trained.ring_parameters().items()})
        print("activity figure:", draw_activity(trained, Path(run_dir) / "plots" / "bench_activity.png"))
    else:
        torch.manual_seed(0)
        untrained, config = RingAttractorNetwork(), None
        columns = {"untrained": measure_all(untrained, args.trials)}
    speed_result = speed(untrained, args.speed_steps, args.speed_rounds)
    report(columns, speed_result, config, time.perf_counter() - started)


if __name__ == "__main__":
    main()
