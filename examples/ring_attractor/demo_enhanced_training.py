"""The comprehensive demo of the seed: train a ring attractor with Adam + cosine annealing and look at it.

    python examples/ring_attractor/demo_enhanced_training.py                    # 800/200 neurons, 100 epochs
    python examples/ring_attractor/demo_enhanced_training.py --epochs 5         # a short look
    python examples/ring_attractor/demo_enhanced_training.py --n-exc 64 --n-inh 16 --epochs 2 --trials 32

It measures the untrained network on fresh trials (cue tracking, bump stability, angular-velocity
integration), trains it with `train_model_enhanced` (biological constraints after every step, early
stopping, the best-validation weights restored, plots shown or written), prints how every ring
parameter evolved, and measures it again. Everything is the launcher's: the run directory, printed at
the end, holds the checkpoints, metrics.jsonl and plots/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, from wherever this runs

from models.ring_attractor import RingAttractorNetwork, train_model_enhanced  # noqa: E402
from models.ring_attractor.analysis import measure_bump_stability, measure_cue_tracking, measure_integration  # noqa: E402


def measure(model: RingAttractorNetwork, trials: int) -> dict[str, float]:
    tracking = measure_cue_tracking(model, num_trials=trials)
    stability = measure_bump_stability(model, num_trials=trials)
    integration = measure_integration(model, num_trials=trials)
    return {"tracking error (deg)": tracking.error_deg, "bump peak / mean": tracking.peak_over_mean,
            "drift without noise (deg/s)": stability.drift_deg_per_s,
            "diffusion with noise (deg^2/s)": stability.diffusion_deg2_per_s,
            "integration error after 2 s (deg)": integration.final_error_deg,
            "holding the initial heading (deg)": integration.hold_error_deg}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-exc", type=int, default=800)
    parser.add_argument("--n-inh", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--trials", type=int, default=256, help="training trials per epoch (data.num_train)")
    parser.add_argument("--duration", type=float, default=0.5, help="seconds per training trial")
    parser.add_argument("--measure-trials", type=int, default=32, help="fresh trials per measurement")
    parser.add_argument("--run-dir", default=None, help="default: a new directory under checkpoints/ring_attractor_api/")
    parser.add_argument("--no-plots", action="store_true", help="do not show or list the training plots")
    args = parser.parse_args()

    model = RingAttractorNetwork(n_exc=args.n_exc, n_inh=args.n_inh, sigma_ee=0.3)
    before = measure(model, args.measure_trials)
    initial = model.ring_parameters()

    trained_model, history, trainer = train_model_enhanced(
        model,
        learning_rate=args.learning_rate,
        max_epochs=args.epochs,
        early_stopping=True,
        plot_progress=not args.no_plots,
        run_dir=args.run_dir,
        overrides=(f"data.num_train={args.trials}", f"data.num_val={max(16, args.trials // 4)}",
                   f"data.duration={args.duration}", f"data.cue_duration={min(0.1, args.duration / 3):.4f}",
                   f"data.settle_time={min(0.05, args.duration / 6):.4f}"),
    )

    print(f"\nTrained {len(history['epoch'])} epochs ({trainer.trainer.state.stop_reason}).")
    print(f"train loss {history['train_loss'][0]:.5f} -> {history['train_loss'][-1]:.5f}, "
          f"val loss {history['val_loss'][0]:.5f} -> {history['val_loss'][-1]:.5f}, "
          f"learning rate {history['learning_rate'][0]:.2e} -> {history['learning_rate'][-1]:.2e}")
    print("\nRing parameters (initial -> after the last epoch):")
    for name, start in initial.items():
        print(f"  {name:14s} {start:8.4f} -> {trainer.param_history[name][-1]:8.4f}")
    after = measure(trained_model, args.measure_trials)
    print("\nOn fresh trials (best-validation weights):   before     after")
    for name, value in before.items():
        print(f"  {name:40s} {value:8.2f}  {after[name]:8.2f}")
    print(f"\nRun directory: {trainer.run_dir}")


if __name__ == "__main__":
    main()
