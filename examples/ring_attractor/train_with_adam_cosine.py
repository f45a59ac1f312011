"""The seed's "Adam + cosine" example: a training config, the trainer, checkpoints and parameter history.

    python examples/ring_attractor/train_with_adam_cosine.py                     # 800/200 neurons, 150 epochs
    python examples/ring_attractor/train_with_adam_cosine.py --n-exc 64 --n-inh 16 --epochs 2 --trials 32

`create_training_config` takes the seed's settings, `AdamCosineTrainer(model, config).train()` runs the
launcher's loop (Adam with cosine annealing to min_lr, constraints, early stopping, best.pt), then the
example saves a checkpoint of its own, loads it back and prints how g_ee evolved.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, from wherever this runs

from models.ring_attractor import AdamCosineTrainer, RingAttractorNetwork, create_training_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-exc", type=int, default=800)
    parser.add_argument("--n-inh", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--trials", type=int, default=256, help="training trials per epoch (data.num_train)")
    parser.add_argument("--duration", type=float, default=0.5, help="seconds per training trial")
    parser.add_argument("--run-dir", default=None, help="default: a new directory under checkpoints/ring_attractor_api/")
    args = parser.parse_args()

    model = RingAttractorNetwork(n_exc=args.n_exc, n_inh=args.n_inh, sigma_ee=0.3)
    config = create_training_config(
        learning_rate=1e-3,
        max_epochs=args.epochs,
        min_lr=1e-6,
        weight_decay=1e-4,
        batch_size=32,
        early_stopping=True,
        patience=20,
        run_dir=args.run_dir,
        overrides=(f"data.num_train={args.trials}", f"data.num_val={max(16, args.trials // 4)}",
                   f"data.duration={args.duration}", f"data.cue_duration={min(0.1, args.duration / 3):.4f}",
                   f"data.settle_time={min(0.05, args.duration / 6):.4f}"),
    )
    trainer = AdamCosineTrainer(model, config)
    history = trainer.train()

    for epoch, train_loss, val_loss, lr in zip(history["epoch"], history["train_loss"], history["val_loss"],
                                              history["learning_rate"]):
        print(f"epoch {epoch:3d}  train loss {train_loss:.5f}  val loss {val_loss:.5f}  lr {lr:.2e}")

    checkpoint = trainer.save_checkpoint(trainer.epoch, trainer.run_dir / "my_checkpoint.pth")
    start_epoch = trainer.load_checkpoint(checkpoint)
    print(f"Saved and loaded {checkpoint}: training would resume after epoch {start_epoch}.")
    print(f"Initial g_ee: {trainer.param_history['g_ee'][0]:.4f}")
    print(f"Final g_ee: {trainer.param_history['g_ee'][-1]:.4f}")


if __name__ == "__main__":
    main()
