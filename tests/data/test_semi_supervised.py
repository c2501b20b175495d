"""Semi-supervised data: N labels per class, a stable subset, labelled held-out splits, stratified weighted batches."""

from pathlib import Path

import pytest
import torch

from pyro_lvm.data import (
    DigitsDataModule,
    SemiSupervisedDigitsDataModule,
    SemiSupervisedMNISTDataModule,
    StratifiedBatchSampler,
    balanced_labelled_subset,
)

MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"


def train_labels(**options):
    dm = SemiSupervisedDigitsDataModule(**options)
    dm.setup("fit")
    return dm, dm.datasets["train"].y


@pytest.mark.parametrize("labels_per_class", [0, 1, 10])
def test_exactly_n_labels_per_class_are_kept_the_others_hidden(labels_per_class):
    dm, y = train_labels(labels_per_class=labels_per_class)
    kept = y[y >= 0]
    assert kept.bincount(minlength=10).tolist() == [labels_per_class] * 10
    assert int((y == -1).sum()) == dm.num_train - 10 * labels_per_class
    assert torch.equal(dm.labelled_index, (y >= 0).nonzero().flatten())
    for split in ("val", "test"):  # every held-out label kept: the classification error is measured there
        assert bool((dm.datasets[split].y >= 0).all())


def test_the_labelled_subset_is_the_true_labels_and_stable_for_a_seed():
    _, y = train_labels(labels_per_class=10, seed=0)
    _, again = train_labels(labels_per_class=10, seed=0)
    _, other = train_labels(labels_per_class=10, seed=1)
    assert torch.equal(y, again) and not torch.equal(y >= 0, other >= 0)
    labelled = DigitsDataModule(labels=True)  # the same split with every label
    labelled.setup("fit")
    truth = labelled.datasets["train"].y
    assert torch.equal(y[y >= 0], truth[y >= 0])


def test_the_subset_function_refuses_more_labels_than_a_class_has():
    assert balanced_labelled_subset(torch.tensor([0, 0, 1, 1]), 2).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="Class 1 has 1 training points"):
        balanced_labelled_subset(torch.tensor([0, 0, 1]), 2)
    with pytest.raises(ValueError, match="labels_per_class must be an integer >= 0"):
        SemiSupervisedDigitsDataModule(labels_per_class=-1)


def test_uniform_batches_carry_hidden_labels_and_no_weight():
    dm, _ = train_labels(labels_per_class=10, batch_size=64)
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch) == ["index", "x", "y"] and int(batch["y"].min()) >= -1


def test_stratified_batches_hold_k_labels_and_weights_that_keep_the_batch_sum_unbiased():
    dm, y = train_labels(labels_per_class=10, labelled_per_batch=8, batch_size=64)
    loader = dm.train_dataloader()
    batches = list(loader)
    n_l, n = 100, dm.num_train
    assert len(batches) == (n - n_l) // 56
    for b in batches:
        labelled = b["y"] >= 0
        assert int(labelled.sum()) == 8 and torch.equal(b["y"], y[b["index"]])
        # a uniform batch of B estimates B/N of the data's sum; so does the weighted one: sum of weights = B
        assert float(b["weight"].sum()) == pytest.approx(64, rel=1e-5)
        assert float(b["weight"][labelled][0]) == pytest.approx(64 * n_l / (n * 8))
    # every unlabelled point once per epoch, the labelled ones cycled; a new epoch, a new order
    unlabelled = torch.cat([b["index"][b["y"] < 0] for b in batches])
    assert len(unlabelled.unique()) == len(unlabelled)
    loader.batch_sampler.sampler.set_epoch(1)  # what Lightning calls
    assert not torch.equal(next(iter(loader))["index"], batches[0]["index"])


def test_the_sampler_refuses_impossible_batches():
    with pytest.raises(ValueError, match="labelled_per_batch must lie in 1..batch_size - 1 = 9"):
        StratifiedBatchSampler(torch.arange(3), torch.arange(3, 30), batch_size=10, labelled_per_batch=10)
    with pytest.raises(ValueError, match="needs labelled points"):
        StratifiedBatchSampler(torch.arange(0), torch.arange(30), batch_size=10, labelled_per_batch=2)


@pytest.mark.skipif(not MNIST.is_dir(), reason="MNIST IDX files not available")
def test_mnist_keeps_100_labels_of_the_50000_training_images():
    dm = SemiSupervisedMNISTDataModule(root=str(MNIST), labels_per_class=10, labelled_per_batch=10)
    dm.setup("fit")
    y = dm.datasets["train"].y
    assert dm.num_train == 50000 and y[y >= 0].bincount().tolist() == [10] * 10
    assert bool((dm.datasets["val"].y >= 0).all()) and bool((dm.datasets["test"].y >= 0).all())
    batch = next(iter(dm.train_dataloader()))
    assert int((batch["y"] >= 0).sum()) == 10 and set(batch["x"].unique().tolist()) <= {0.0, 1.0}
