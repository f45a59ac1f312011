"""The helpers of dataset/errors.py and the config checks of data modules that have no test file of their own.

The families' bad-file cases are in their own test files (test_sudoku, test_maze, test_arc,
test_modular_arithmetic, test_streaming); this checks the pieces they share.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from dataset.errors import DatasetFileError, first_non_utf8_byte, load_tensor_file, not_utf8_message, short_reason
from dataset.multimodal.data_module import VisionUnifiedData
from dataset.oja.gaussian import GaussianData
from dataset.prepare import instantiate_data
from utils.config.errors import ConfigError


def test_first_non_utf8_byte_counts_lines_across_read_chunks(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    # 'é' (2 bytes in UTF-8) straddles the 1 MiB read boundary and must not count as an error.
    head = b"a" * ((1 << 20) - 1) + "é".encode() + b"\n"
    path.write_bytes(head + b"line 2\nline 3 \xff\n")
    assert first_non_utf8_byte(path) == (3, 0xFF)
    path.write_bytes(head + b"fine\n")
    assert first_non_utf8_byte(path) is None
    path.write_bytes(b"ok\ncut off: " + "é".encode()[:1])  # a sequence cut by the end of the file
    assert first_non_utf8_byte(path) == (2, 0xC3)
    assert not_utf8_message(path, fix="do X") == f"{path}:2: not UTF-8 text (byte 0xc3); do X"


def test_load_tensor_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "split.pt"
    torch.save({"x": torch.arange(1000)}, path)
    assert torch.equal(load_tensor_file(path)["x"], torch.arange(1000))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DatasetFileError) as info:
        load_tensor_file(path)
    message = str(info.value)
    assert message.startswith(f"{path} is truncated or damaged (") and message.endswith("--rebuild-dataset")
    assert len(message) < 300  # torch's paragraph of advice is cut to its first sentence
    with pytest.raises(DatasetFileError, match=f"{tmp_path / 'gone.pt'} is missing; .*--rebuild-dataset"):
        load_tensor_file(tmp_path / "gone.pt")


def test_short_reason_keeps_the_first_sentence_of_the_first_line() -> None:
    err = RuntimeError("PytorchStreamReader failed: not a ZIP archive. This is an internal miniz error.\nmore")
    assert short_reason(err) == "RuntimeError: PytorchStreamReader failed: not a ZIP archive"
    assert short_reason(EOFError()) == "EOFError"


def test_data_module_config_checks_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.variances must hold at least two positive numbers"):
        GaussianData(variances=[1.0])
    with pytest.raises(ConfigError, match=r"data\.name must be a plain directory name"):
        VisionUnifiedData(str(tmp_path), name="../elsewhere")
    with pytest.raises(ConfigError, match=r"data\.val_every must be an integer >= 2"):
        VisionUnifiedData(str(tmp_path), name="vu", val_every=1)
    with pytest.raises(ConfigError, match=r"data\.font_size 300 does not fit a data\.image_size=\[64, 128\] image"):
        VisionUnifiedData(str(tmp_path), name="vu", font_size=300)


def test_instantiate_data_raises_the_constructors_config_error_and_wraps_nothing_else() -> None:
    bad_value = OmegaConf.create({"_target_": "dataset.oja.gaussian.GaussianData", "variances": [-1.0, 1.0]})
    with pytest.raises(ConfigError, match=r"data\.variances"):
        instantiate_data(bad_value)
    bug = OmegaConf.create({"_target_": "dataset.oja.gaussian.GaussianData", "no_such_argument": 1})
    with pytest.raises(InstantiationException):  # a TypeError of the call stays Hydra's error, with its traceback
        instantiate_data(bug)
