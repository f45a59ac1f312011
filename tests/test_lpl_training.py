"""The LPL family's presets trained for real: the exported files (formats, shapes, names, atomic, under the
run directory), BYOL's first-layer-only update and its EMA target, the analysis command over the
exports, resume with exports, and two torchrun processes staying in sync for the local learner.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from models.lpl.analysis import invariance_score, main as analysis_main, probe_split
from models.lpl.callbacks import ExportRepresentations, TrainingLogJSON
from tests.cli_helpers import CPU, load, paths, run
from utils.training.callbacks import Callback
from utils.training.runner import fit

EXPORTS = "outputs/activations"


class StateTrace(Callback):
    """Every parameter after every step (and at the start); each rank also writes a digest per step."""

    last: "StateTrace | None" = None

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        StateTrace.last = self

    def _keep(self, trainer: Any) -> None:
        self.states.append({k: v.detach().clone() for k, v in trainer.model.named_parameters()})

    def on_fit_start(self, trainer: Any) -> None:
        self._keep(trainer)

    def on_after_optimizer_step(self, trainer: Any, batch: Any, outputs: dict[str, Any]) -> None:
        self._keep(trainer)
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in trainer.model.parameters())).hexdigest()
        with open(Path(trainer.run_dir) / f"weights_rank{trainer.dist.rank}.txt", "a", encoding="utf-8") as f:
            f.write(f"{trainer.state.step} {digest}\n")


TRACE = "+callbacks.trace={_target_:tests.test_lpl_training.StateTrace}"


def preset(make_cfg, tmp_path: Path, experiment: str, *overrides: str):
    return make_cfg(tmp_path, f"experiment={experiment}", "debug=fast", *overrides, shrink_trainer=False,
                    tiny_grokking=False)


def exports(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / EXPORTS).iterdir())


def test_lpl_cifar10_exports_activations_of_128_units(make_cfg, tmp_path: Path) -> None:
    result = fit(preset(make_cfg, tmp_path, "lpl_cifar10"))  # debug=fast: the generated CIFAR-format sample
    run_dir = result.run_dir
    assert exports(run_dir) == ["activations_after.pt", "activations_after_second_frame.pt",
                                "activations_before.pt", "activations_before_second_frame.pt"]
    for when in ("before", "after"):
        data = load(run_dir / EXPORTS / f"activations_{when}.pt")
        assert sorted(data) == ["activations", "labels"]
        assert data["activations"].shape == (64, 128) and data["activations"].dtype == torch.float32
        assert data["labels"].shape == (64,) and data["labels"].dtype == torch.int64
    before, after = (load(run_dir / EXPORTS / f"activations_{w}.pt") for w in ("before", "after"))
    assert torch.equal(before["labels"], after["labels"]) and not torch.equal(before["activations"], after["activations"])
    # the after-export is the trained model's view of the same validation pairs
    model = result.trainer.model
    batch = result.trainer.data.collate_fn(result.trainer.data.val_dataset.__getitems__(list(range(64))))
    torch.testing.assert_close(after["activations"], model.representations(batch["x1"])["activations"])
    assert not list((run_dir / EXPORTS).glob(".*"))  # no temporary files left behind (atomic writes)


def test_byol_trains_only_the_first_conv_layer_and_averages_the_target(make_cfg, tmp_path: Path) -> None:
    result = fit(preset(make_cfg, tmp_path, "byol", TRACE))
    trace = StateTrace.last
    assert trace is not None and len(trace.states) == 7
    first, last = trace.states[0], trace.states[-1]
    changed = sorted(k for k in first if not torch.equal(first[k], last[k]))
    assert changed == ["online_encoder.conv1.bias", "online_encoder.conv1.weight",
                       "target_encoder.conv1.bias", "target_encoder.conv1.weight"]
    trainable = sorted(n for n, p in result.trainer.model.named_parameters() if p.requires_grad)
    assert trainable == ["online_encoder.conv1.bias", "online_encoder.conv1.weight"]
    for previous, current in zip(trace.states[:-1], trace.states[1:]):  # target <- 0.99 target + 0.01 online
        for name in ("weight", "bias"):
            expected = torch.lerp(previous[f"target_encoder.conv1.{name}"], current[f"online_encoder.conv1.{name}"], 0.01)
            torch.testing.assert_close(current[f"target_encoder.conv1.{name}"], expected, rtol=0, atol=1e-7)
    run_dir = result.run_dir
    assert run_dir.name == "test"
    for when in ("before", "after"):  # on the shapes, with the seed's byol_shapes_ names
        data = load(run_dir / EXPORTS / f"byol_shapes_embeddings_{when}.pt")
        assert sorted(data) == ["embeddings", "labels"] and data["embeddings"].shape == (64, 256)
        torch.testing.assert_close(data["embeddings"].norm(dim=1), torch.ones(64))  # L2-normalised
    logs = json.loads((run_dir / "outputs" / "byol_shapes_training_logs.json").read_text())
    assert [r["step"] for r in logs["val"]] == [3, 6] and "train/loss" in logs["train"][-1]


def test_export_and_log_names_follow_the_data() -> None:
    export = ExportRepresentations("byol_embeddings", by_data={"shapes": "byol_shapes_embeddings"})
    log = TrainingLogJSON("byol_training_logs.json", by_data={"shapes": "byol_shapes_training_logs.json"})
    for data_name, stem in (("cifar10", "byol_embeddings"), ("shapes", "byol_shapes_embeddings")):
        trainer = SimpleNamespace(run_dir=Path("/runs/r"), data=SimpleNamespace(name=data_name))
        main, pair = export.paths(trainer, "before")
        assert main == Path(f"/runs/r/outputs/activations/{stem}_before.pt")
        assert pair == Path(f"/runs/r/outputs/activations/{stem}_before_second_frame.pt")
    assert dict(log.by_data)["shapes"] == "byol_shapes_training_logs.json"


@pytest.mark.slow  # three short runs; bitwise resume of every preset is also the contract test's
def test_hierarchical_exports_resume_and_analysis(make_cfg, tmp_path: Path, capsys) -> None:
    straight = fit(preset(make_cfg, tmp_path / "a", "lpl_hierarchical"))
    fit(preset(make_cfg, tmp_path / "b", "lpl_hierarchical", "trainer.max_steps=3"))
    run_b = tmp_path / "b" / "ck" / "test"
    before = (run_b / EXPORTS / "hierarchical_activations_before.pt").read_bytes()
    resumed = fit(preset(make_cfg, tmp_path / "b", "lpl_hierarchical"))
    assert resumed.state.step == 6
    assert (run_b / EXPORTS / "hierarchical_activations_before.pt").read_bytes() == before  # not re-exported
    for when in ("before", "after"):
        a = load(straight.run_dir / EXPORTS / f"hierarchical_activations_{when}.pt")
        b = load(run_b / EXPORTS / f"hierarchical_activations_{when}.pt")
        assert sorted(a) == ["labels", "layer1_activations", "layer2_activations"]
        assert a["layer1_activations"].shape == (64, 128) and a["layer2_activations"].shape == (64, 64)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{when}: {key} differs after resume"
    assert analysis_main([str(straight.run_dir)]) == 0
    table = capsys.readouterr().out
    rows = [line.split() for line in table.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("hierarchical_activations_after.pt", "layer1_activations"), ("hierarchical_activations_after.pt", "layer2_activations"),
        ("hierarchical_activations_before.pt", "layer1_activations"), ("hierarchical_activations_before.pt", "layer2_activations")]
    assert all(r[5] != "-" for r in rows)  # the second frames were found: an invariance score for each
    assert analysis_main([str(tmp_path / "nothing_here")]) == 2


def test_probe_and_invariance_measure_what_they_say() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 4
    separable = torch.nn.functional.one_hot(labels, 4).float() + 0.1 * torch.randn(400, 4, generator=generator)
    assert probe_split(separable, labels) == 1.0
    assert probe_split(torch.randn(400, 4, generator=generator), labels) < 0.5
    features = torch.randn(300, 16, generator=generator)
    assert invariance_score(features, features) == pytest.approx(1.0, abs=0.1)  # identical frames
    assert abs(invariance_score(features, torch.randn(300, 16, generator=generator))) < 0.1  # unrelated frames


def test_two_processes_stay_in_sync_and_follow_one_process(make_cfg, tmp_path: Path) -> None:
    args = ["experiment=lpl_hierarchical", "debug=fast", CPU, TRACE, "run_name=sync"]
    two = run("train.py", *args, "trainer.nproc_per_node=2", *paths(tmp_path / "two"))
    assert two.returncode == 0, two
    one = fit(make_cfg(tmp_path / "one", *args, "run_name=sync", shrink_trainer=False, tiny_grokking=False))
    run_dir = tmp_path / "two" / "sync"
    rank0 = (run_dir / "weights_rank0.txt").read_text().splitlines()
    rank1 = (run_dir / "weights_rank1.txt").read_text().splitlines()
    assert len(rank0) == 6 and rank0 == rank1  # identical weights on both ranks after every step
    w_one = load(one.run_dir / "latest.pt")["model"]
    w_two = load(run_dir / "latest.pt")["model"]
    # The rule's batch statistics (means, variances, covariances) are per rank, over half the batch, so the
    # two-process update is the average of two half-batch updates: close to, not equal to, one process's.
    for key in w_one:
        torch.testing.assert_close(w_two[key], w_one[key], rtol=0, atol=2e-4)
    assert any(not torch.equal(w_two[k], w_one[k]) for k in w_one)
