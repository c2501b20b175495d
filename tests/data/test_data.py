"""Tests of pyro_lvm.data: the batch contract, splits, binarization, file readers and errors."""

import doctest
import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from pyro_lvm.data import (
    DATA_ENV_VAR,
    BinarizedMNISTDataModule,
    DigitsDataModule,
    MNISTDataModule,
    TensorDataModule,
    TensorDictDataset,
    check_data,
    read_amat,
    read_idx,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
NUM_DIGITS = 1797
IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


# --------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    big_endian = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[big_endian], array.ndim)
    payload = header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(big_endian).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_mnist(folder: Path, num_train: int = 40, num_test: int = 12, gz: bool = True, seed: int = 0):
    """Write a tiny MNIST in IDX format; return its images and labels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(num_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(num_test) % 10).astype(np.uint8),
    }
    for name, array in data.items():
        write_idx(folder / (name + (".gz" if gz else "")), array, gz)
    return data


def write_binarized_npz(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {name: rng.integers(0, 2, (n, 784), dtype=np.uint8)
              for name, n in (("train", 6), ("valid", 3), ("test", 2))}
    np.savez(folder / "binarized_mnist.npz", **arrays)
    return arrays


def write_amat(path: Path, array: np.ndarray) -> None:
    path.write_text("".join(" ".join(map(str, row)) + "\n" for row in array.tolist()))


def epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """All (index, x) of one pass, sorted by index."""
    batches = list(loader)
    index = torch.cat([b["index"] for b in batches])
    x = torch.cat([b["x"] for b in batches])
    order = index.argsort()
    return index[order], x[order]


# --------------------------------------------------------------------------- batch contract


def test_digits_batches_are_dicts_of_flat_float_x_and_int64_index():
    dm = DigitsDataModule(batch_size=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "index"}
    assert batch["x"].shape == (16, 64) and batch["x"].dtype == torch.float32
    assert batch["index"].shape == (16,) and batch["index"].dtype == torch.int64
    assert dm.event_shape == torch.Size([64])
    # "index" is the position inside the split: it fetches the same example back
    assert torch.equal(batch["x"], dm.datasets["train"].x[batch["index"]])


def test_digits_images_and_labels_match_scikit_learn_at_their_source_positions():
    from sklearn.datasets import load_digits

    images, targets = load_digits(return_X_y=True)
    dm = DigitsDataModule(batch_size=16, flatten=False, labels=True, binarize="none")
    batch = next(iter(dm.val_dataloader()))
    assert batch["x"].shape == (16, 1, 8, 8) and dm.event_shape == torch.Size([1, 8, 8])
    assert batch["y"].dtype == torch.int64 and batch["y"].shape == (16,)
    source = dm.source_index["val"][batch["index"]]
    assert torch.equal(batch["y"], torch.as_tensor(targets)[source])
    expected = torch.as_tensor(images, dtype=torch.float32)[source].reshape(16, 1, 8, 8) / 16
    assert torch.allclose(batch["x"], expected)


def test_static_binarized_digits_are_the_grey_levels_thresholded_at_one_half():
    grey = DigitsDataModule(binarize="none")
    binary = DigitsDataModule(binarize="static")
    x = binary.datasets["train"].x
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(x, (grey.datasets["train"].x >= 0.5).float())
    assert binary.is_binary and binary.data_range == (0.0, 1.0)


def test_unbinarized_digits_keep_all_seventeen_grey_levels_in_the_unit_interval():
    dm = DigitsDataModule(binarize="none")
    x = torch.cat([ds.x for ds in dm.datasets.values()])
    assert x.min() == 0.0 and x.max() == 1.0
    assert torch.equal(x.unique(), torch.arange(17) / 16)
    assert not dm.is_binary and dm.data_range == (0.0, 1.0)


# --------------------------------------------------------------------------- splits and loaders


def test_digit_splits_partition_the_data_and_depend_only_on_the_seed():
    dm = DigitsDataModule(val_fraction=0.2, test_fraction=0.1, seed=3)
    parts = {name: set(i.tolist()) for name, i in dm.source_index.items()}
    sizes = {name: len(ds) for name, ds in dm.datasets.items()}
    assert sizes == {"train": NUM_DIGITS - 359 - 180, "val": 359, "test": 180}
    assert dm.num_train == sizes["train"]
    assert parts["train"].isdisjoint(parts["val"]) and parts["train"].isdisjoint(parts["test"])
    assert parts["val"].isdisjoint(parts["test"])
    assert parts["train"] | parts["val"] | parts["test"] == set(range(NUM_DIGITS))

    again = DigitsDataModule(val_fraction=0.2, test_fraction=0.1, seed=3)
    other = DigitsDataModule(val_fraction=0.2, test_fraction=0.1, seed=4)
    assert all(torch.equal(dm.source_index[k], again.source_index[k]) for k in parts)
    assert not torch.equal(dm.source_index["val"], other.source_index["val"])


def test_train_batches_have_constant_size_and_eval_batches_cover_the_split_in_order():
    dm = DigitsDataModule(batch_size=100)
    train_sizes = [len(b["index"]) for b in dm.train_dataloader()]
    assert train_sizes == [100] * (dm.num_train // 100)
    val = list(dm.val_dataloader())
    assert [len(b["index"]) for b in val] == [100, 80]
    assert torch.equal(torch.cat([b["index"] for b in val]), torch.arange(180))


def test_a_split_smaller_than_one_batch_is_served_whole_not_dropped():
    dm = TensorDataModule(torch.rand(10, 3), batch_size=32)
    assert [len(b["index"]) for b in dm.train_dataloader()] == [10]


def test_setup_is_idempotent():
    dm = DigitsDataModule()
    dm.setup("fit")
    first = dm.datasets["train"]
    dm.setup("test")
    assert dm.datasets["train"] is first


# --------------------------------------------------------------------------- dynamic binarization


def test_dynamic_binarization_redraws_every_epoch_with_mean_equal_to_the_intensity():
    dm = DigitsDataModule(binarize="dynamic", batch_size=64)
    p = dm.datasets["train"].x
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)  # as Lightning does before every epoch
    index1, x1 = epoch(loader)
    loader.sampler.set_epoch(1)
    index2, x2 = epoch(loader)
    assert set(x1.unique().tolist()) == {0.0, 1.0}
    common = np.intersect1d(index1.numpy(), index2.numpy())
    x1 = x1[np.isin(index1.numpy(), common)]
    x2 = x2[np.isin(index2.numpy(), common)]
    q = p[common]
    assert (x1 != x2).float().mean() > 0.05  # a new draw, not a fixed binarization
    # sum(x - p) / sqrt(sum p (1 - p)) is standard normal under x ~ Bernoulli(p)
    for x in (x1, x2):
        z = (x - q).sum() / (q * (1 - q)).sum().sqrt()
        assert abs(z) < 5
    certain = (q == 0) | (q == 1)
    assert torch.equal(x1[certain], q[certain]) and torch.equal(x2[certain], q[certain])


def test_dynamic_binarization_and_order_depend_only_on_seed_and_epoch():
    dm = DigitsDataModule(binarize="dynamic", batch_size=64, seed=3)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(4)
    first = [b for b in loader]
    torch.manual_seed(123)  # the global RNG plays no part
    loader = DigitsDataModule(binarize="dynamic", batch_size=64, seed=3).train_dataloader()
    loader.sampler.set_epoch(4)
    second = [b for b in loader]
    assert all(torch.equal(a["index"], b["index"]) and torch.equal(a["x"], b["x"])
               for a, b in zip(first, second))


def test_held_out_sets_are_binarized_once_under_dynamic_binarization():
    dm = DigitsDataModule(binarize="dynamic", batch_size=64, seed=0)
    for loader in (dm.val_dataloader, dm.test_dataloader):
        _, a = epoch(loader())
        _, b = epoch(loader())
        assert torch.equal(a, b) and set(a.unique().tolist()) == {0.0, 1.0}
    same_seed = DigitsDataModule(binarize="dynamic", seed=0)
    assert torch.equal(dm.datasets["val"].x, same_seed.datasets["val"].x)


def test_tensor_dict_dataset_draws_bernoulli_per_fetch_from_the_global_rng():
    ds = TensorDictDataset(torch.full((2000, 8), 0.3), binarize="dynamic")
    torch.manual_seed(0)
    a = ds.__getitems__(list(range(2000)))["x"]
    b = ds.__getitems__(list(range(2000)))["x"]
    torch.manual_seed(0)
    assert torch.equal(ds.__getitems__(list(range(2000)))["x"], a)
    assert not torch.equal(a, b)
    assert abs(a.mean() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / a.numel())


def test_binarizing_data_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]; got min=-"):
        TensorDictDataset(torch.randn(5, 2), binarize="dynamic")
    with pytest.raises(ValueError, match="choose one of"):
        DigitsDataModule(binarize="dequantize")


# --------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([[-5, 70000], [2**31 - 1, -(2**31)]], dtype=np.int32),
        np.array([0.5, -1.25, 3e30], dtype=np.float32),
        np.array([-3, 4], dtype=np.int16),
    ],
    ids=["uint8-3d", "int32-2d", "float32-1d", "int16-1d"],
)
def test_read_idx_round_trips_what_was_written(tmp_path, array, gz):
    read = read_idx(write_idx(tmp_path / "a-idx", array, gz))
    assert read.shape == array.shape and read.dtype == array.dtype
    assert np.array_equal(read, array)


def test_read_idx_names_the_file_when_the_magic_number_is_wrong(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(b"\x08\x03\x00\x00" + bytes(16))
    with pytest.raises(ValueError, match=r"bad-idx3-ubyte is not an IDX file: .* magic number is 0x08030000"):
        read_idx(path)


def test_read_idx_names_the_file_when_it_is_truncated(tmp_path):
    path = write_idx(tmp_path / "short-idx3-ubyte", np.zeros((3, 4, 4), np.uint8), gz=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"short-idx3-ubyte has 59 bytes .* shape \(3, 4, 4\) .* truncated"):
        read_idx(path)


def test_read_idx_names_the_file_when_its_gzip_stream_is_cut(tmp_path):
    path = write_idx(tmp_path / "cut-idx1-ubyte.gz", np.arange(1000, dtype=np.uint8) % 7, gz=True)
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(ValueError, match=r"cut-idx1-ubyte.gz is gzipped but cannot be decompressed"):
        read_idx(path)


# --------------------------------------------------------------------------- MNIST from IDX


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_mnist_holds_out_the_last_training_images_and_tests_on_t10k(tmp_path, gz):
    data = write_mnist(tmp_path, num_train=40, num_test=12, gz=gz)
    dm = MNISTDataModule(root=str(tmp_path), val_size=10, binarize="none", labels=True, batch_size=8)
    images = torch.as_tensor(data["train-images-idx3-ubyte"]).float().reshape(40, 784) / 255
    test_images = torch.as_tensor(data["t10k-images-idx3-ubyte"]).float().reshape(12, 784) / 255
    assert dm.num_train == 30
    assert torch.allclose(dm.datasets["train"].x, images[:30])
    assert torch.allclose(dm.datasets["val"].x, images[30:])
    assert torch.allclose(dm.datasets["test"].x, test_images)
    assert torch.equal(dm.datasets["val"].y, torch.arange(30, 40) % 10)
    batch = next(iter(dm.test_dataloader()))
    assert batch["x"].shape == (8, 784) and batch["y"].dtype == torch.int64


def test_mnist_static_binarization_thresholds_grey_levels(tmp_path):
    data = write_mnist(tmp_path)
    dm = MNISTDataModule(root=tmp_path, val_size=10, binarize="static", flatten=False)
    grey = torch.as_tensor(data["train-images-idx3-ubyte"][:30]).float().unsqueeze(1) / 255
    assert dm.datasets["train"].x.shape == (30, 1, 28, 28)
    assert torch.equal(dm.datasets["train"].x, (grey >= 0.5).float())
    assert dm.hparams["root"] == str(tmp_path)  # a Path becomes a str, which YAML can hold


def test_mnist_dynamic_binarization_fixes_validation_and_test_with_the_seed(tmp_path):
    write_mnist(tmp_path)
    a = MNISTDataModule(root=tmp_path, val_size=10, seed=5)
    b = MNISTDataModule(root=tmp_path, val_size=10, seed=5)
    c = MNISTDataModule(root=tmp_path, val_size=10, seed=6)
    for split in ("val", "test"):
        assert torch.equal(a.datasets[split].x, b.datasets[split].x)
        assert not torch.equal(a.datasets[split].x, c.datasets[split].x)
    assert a.datasets["train"].binarize == "dynamic" and a.is_binary


def test_mnist_refuses_images_that_are_not_28_by_28(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((40, 8, 8), np.uint8), gz=True)
    with pytest.raises(ValueError, match=r"images-idx3-ubyte.gz holds uint8 data of shape \(40, 8, 8\)"):
        MNISTDataModule(root=tmp_path).setup()


def test_mnist_refuses_a_validation_set_that_leaves_no_training_data(tmp_path):
    write_mnist(tmp_path, num_train=40)
    with pytest.raises(ValueError, match="val_size=40 leaves no training images"):
        MNISTDataModule(root=tmp_path, val_size=40).setup()


def test_missing_mnist_names_every_file_and_every_folder_searched(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "data"))
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    (tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as error:
        MNISTDataModule().setup()
    message = str(error.value)
    assert all(name in message for name in MNIST_FILES)
    assert f"{tmp_path / 'data' / 'mnist'} (lacks train-labels-idx1-ubyte, t10k-images" in message
    assert f"{tmp_path / 'data'} (lacks train-images-idx3-ubyte, " in message
    assert "official MNIST distribution" in message and DATA_ENV_VAR in message


def test_missing_mnist_without_root_or_environment_says_nothing_was_searched(monkeypatch):
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=f"root is None and {DATA_ENV_VAR} is not set"):
        MNISTDataModule().setup()


def test_missing_fashion_mnist_points_to_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    if Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is installed system-wide")
    with pytest.raises(FileNotFoundError) as error:
        MNISTDataModule(fashion=True).setup()
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "/usr/share/datasets/fashion-mnist" in message and str(tmp_path / "fashion-mnist") in message


def test_data_folder_comes_from_the_environment_variable(tmp_path, monkeypatch):
    write_mnist(tmp_path / "mnist", num_train=20)
    write_mnist(tmp_path / "fashion-mnist", num_train=24)
    write_binarized_npz(tmp_path / "binarized_mnist")
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    assert MNISTDataModule(val_size=5).num_train == 15
    assert MNISTDataModule(val_size=5, fashion=True).num_train == 19
    assert BinarizedMNISTDataModule().num_train == 6


# --------------------------------------------------------------------------- binarized MNIST


def test_binarized_mnist_reads_the_npz_splits_unchanged(tmp_path):
    arrays = write_binarized_npz(tmp_path)
    dm = BinarizedMNISTDataModule(root=tmp_path, batch_size=4, flatten=False)
    for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        assert torch.equal(dm.datasets[split].x.reshape(-1, 784), torch.as_tensor(arrays[key]).float())
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (4, 1, 28, 28) and set(batch) == {"x", "index"}
    assert dm.is_binary


def test_binarized_mnist_reads_the_amat_text_files_like_the_npz(tmp_path):
    arrays = write_binarized_npz(tmp_path / "npz")
    (tmp_path / "amat").mkdir()
    for key, array in arrays.items():
        write_amat(tmp_path / "amat" / f"binarized_mnist_{key}.amat", array)
    from_npz = BinarizedMNISTDataModule(root=tmp_path / "npz")
    from_amat = BinarizedMNISTDataModule(root=tmp_path / "amat")
    for split in ("train", "val", "test"):
        assert torch.equal(from_npz.datasets[split].x, from_amat.datasets[split].x)


def test_read_amat_accepts_any_whitespace_and_a_missing_final_newline(tmp_path):
    path = tmp_path / "x.amat"
    path.write_bytes(b"0 1  1\r\n\n1\t0 0")
    assert np.array_equal(read_amat(path, dim=3), [[0, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    "text, match",
    [
        ("0 1 1\n1 2 0\n", r"line 2: found '2'"),
        ("0 1 1\n1 0 10\n", r"line 2: found '10'"),
        ("0 1 1\n1 0\n", r"line 2: found 2 values, expected 3"),
    ],
    ids=["not-a-bit", "number", "short-line"],
)
def test_read_amat_names_the_line_of_a_malformed_file(tmp_path, text, match):
    path = tmp_path / "bad.amat"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"bad.amat, {match}"):
        read_amat(path, dim=3)


def test_binarized_mnist_refuses_an_npz_without_the_three_splits_or_with_grey_levels(tmp_path):
    np.savez(tmp_path / "binarized_mnist.npz", train=np.zeros((2, 784), np.uint8), test=np.zeros((2, 784)))
    with pytest.raises(ValueError, match=r"lacks the arrays \['valid'\]"):
        BinarizedMNISTDataModule(root=tmp_path).setup()
    np.savez(tmp_path / "binarized_mnist.npz", train=np.full((2, 784), 0.5), valid=np.zeros((2, 784)),
             test=np.zeros((2, 784)))
    with pytest.raises(ValueError, match=r"train split .* values other than 0 and 1 \(e.g. 0.5\)"):
        BinarizedMNISTDataModule(root=tmp_path).setup()


def test_missing_binarized_mnist_names_the_npz_the_amat_files_and_the_folders(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        BinarizedMNISTDataModule(root=tmp_path / "empty").setup()
    message = str(error.value)
    for name in ("binarized_mnist.npz", "binarized_mnist_train.amat", "binarized_mnist_valid.amat",
                 "binarized_mnist_test.amat", "Larochelle & Murray"):
        assert name in message
    assert f"{tmp_path / 'empty'} (does not exist)" in message
    assert str(tmp_path / "empty" / "binarized_mnist") in message


# --------------------------------------------------------------------------- check_data and tensors


def test_check_data_reports_how_many_nan_and_inf_values_and_where():
    check_data(torch.rand(4, 3))
    check_data(torch.arange(6))  # integers cannot be NaN
    x = torch.zeros(4, 3)
    x[1, 2] = float("nan")
    x[3, 0] = float("nan")
    message = r"train contains 2 non-finite values \(2 NaN, 0 inf\), the first at index \(1, 2\)"
    with pytest.raises(ValueError, match=message):
        check_data(x, name="train")
    x = torch.zeros(4, 3)
    x[2, 1] = -float("inf")
    message = r"data contains 1 non-finite value \(0 NaN, 1 inf\), the first at index \(2, 1\)"
    with pytest.raises(ValueError, match=message):
        check_data(x)
    check_data(torch.full((3,), 3e38))  # the sum overflows, the data are finite


def test_setup_checks_every_split_before_training():
    val = torch.rand(5, 2)
    val[4, 1] = float("nan")
    dm = TensorDataModule(torch.rand(10, 2), val=val)
    with pytest.raises(ValueError, match=r"TensorDataModule val split contains 1 non-finite value .* \(4, 1\)"):
        dm.setup("fit")


def test_tensor_data_module_serves_user_tensors_and_labels_as_dict_batches():
    x, y = torch.randn(50, 2, 3), torch.arange(50) % 4
    dm = TensorDataModule((x, y), val=x[:7], batch_size=16, flatten=True)
    assert dm.event_shape == torch.Size([6])
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "y", "index"} and batch["x"].shape == (16, 6)
    assert torch.equal(batch["y"], y[batch["index"]])
    assert torch.equal(batch["x"], x.flatten(1)[batch["index"]])
    assert set(next(iter(dm.val_dataloader()))) == {"x", "index"}
    assert not dm.is_binary and dm.data_range == (float(x.min()), float(x.max()))
    with pytest.raises(ValueError, match=r"one event shape; got \{'train': \(2, 3\), 'val': \(3,\)\}"):
        TensorDataModule(x, val=torch.zeros(4, 3))


class _LinearModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        self.train_sizes: list[int] = []
        self.val_indices: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.train_sizes.append(len(batch["index"]))
        return self.linear(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _LinearModelWithValidation(_LinearModel):
    def validation_step(self, batch, batch_idx):
        self.val_indices.append(batch["index"])


def _trainer() -> pl.Trainer:
    return pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def test_lightning_trainer_consumes_dict_batches_and_skips_an_absent_validation_split():
    model = _LinearModel()
    _trainer().fit(model, datamodule=TensorDataModule(torch.rand(70, 3), batch_size=32))
    assert model.train_sizes == [32, 32]  # constant size, the last 6 examples dropped


def test_lightning_trainer_validates_on_every_validation_example():
    model = _LinearModelWithValidation()
    dm = TensorDataModule(torch.rand(70, 3), val=torch.rand(40, 3), batch_size=32)
    _trainer().fit(model, datamodule=dm)
    assert torch.equal(torch.cat(model.val_indices), torch.arange(40))


# --------------------------------------------------------------------------- real data and docs


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="the shared MNIST copy is absent")
def test_real_mnist_has_50000_10000_10000_images_and_10000_test_labels():
    dm = MNISTDataModule(root=SHARED_DATA / "mnist", labels=True)
    sizes = {name: len(ds) for name, ds in dm.datasets.items()}
    assert sizes == {"train": 50000, "val": 10000, "test": 10000}
    counts = torch.bincount(dm.datasets["test"].y, minlength=10)
    assert counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert int(counts.sum()) == 10000


@pytest.mark.skipif(not (SHARED_DATA / "binarized_mnist").is_dir(), reason="the shared copy is absent")
def test_real_binarized_mnist_has_50000_10000_10000_binary_images():
    dm = BinarizedMNISTDataModule(root=SHARED_DATA)
    sizes = {name: len(ds) for name, ds in dm.datasets.items()}
    assert sizes == {"train": 50000, "val": 10000, "test": 10000}
    assert dm.is_binary


def test_docstring_examples_run():
    import pyro_lvm.data.datasets
    import pyro_lvm.data.modules
    import pyro_lvm.data.quadrants
    import pyro_lvm.data.readers

    modules = [pyro_lvm.data.datasets, pyro_lvm.data.modules, pyro_lvm.data.quadrants, pyro_lvm.data.readers]
    results = [doctest.testmod(m, optionflags=doctest.ELLIPSIS) for m in modules]
    assert sum(r.attempted for r in results) > 0 and sum(r.failed for r in results) == 0
