"""The trainer's batch order: random while padding is cheap, else shuffled length buckets from the
smallest window that keeps padding within budget."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from kubetune.api import FineTuneJob, resolve_spec
from kubetune_trainer.training import (
    PADDING_BUDGET,
    bucketed_order,
    choose_window,
    padding_waste,
    training_arguments,
)
from tests.conftest import valid_job


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def test_every_example_once_whole_batches_first() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(5, 500) for _ in range(203)]
    for window in (1, 2, 4, 64):
        order = bucketed_order(lengths, 8, window, torch.Generator().manual_seed(3))
        assert sorted(order) == list(range(203))
        sizes = [len(b) for b in _batches(order, 8)]
        assert sizes == [8] * 25 + [3], window  # the short batch last, every other one whole


def test_window_one_is_random_order_and_a_big_window_sorts() -> None:
    rng = random.Random(2)
    lengths = [rng.randint(5, 500) for _ in range(96)]
    order = bucketed_order(lengths, 8, 1, torch.Generator().manual_seed(4))
    assert order == torch.randperm(96, generator=torch.Generator().manual_seed(4)).tolist()
    everything = bucketed_order(lengths, 8, 12, torch.Generator().manual_seed(4))
    batches = _batches(everything, 8)
    # One window of the whole dataset: each batch is a run of the lengths sorted, in any order.
    runs = sorted((sorted(lengths[i] for i in b) for b in batches), key=lambda b: b[0])
    flat = [x for run in runs for x in run]
    assert flat == sorted(lengths)
    assert [lengths[i] for i in everything] != sorted(lengths, reverse=True)  # batches shuffled


def test_padding_shrinks_as_the_window_grows() -> None:
    rng = random.Random(3)
    lengths = [rng.choice([20, 30, 400, 500]) for _ in range(800)]
    wastes = [padding_waste(lengths, 8, w, 1) for w in (1, 2, 4, 8, 16)]
    assert wastes == sorted(wastes, reverse=True)
    assert wastes[0] > 1.0 and wastes[-1] < 0.1


def test_uniform_lengths_keep_random_order() -> None:
    # Like the demo's text-to-SQL examples (most of 70 to 84 tokens): random order pads ~7%.
    rng = random.Random(4)
    lengths = [rng.randint(70, 84) for _ in range(317)]
    window, waste = choose_window(lengths, 8, 1)
    assert window == 1 and 0.03 < waste <= PADDING_BUDGET


def test_spread_lengths_get_the_smallest_window_within_budget() -> None:
    rng = random.Random(5)
    lengths = [rng.choice([rng.randint(10, 40), rng.randint(300, 900)]) for _ in range(2000)]
    window, waste = choose_window(lengths, 8, 8)
    assert window > 1 and waste <= PADDING_BUDGET
    smaller = window // 2
    assert padding_waste(lengths, 8, smaller, 8) > PADDING_BUDGET


def test_a_window_of_the_whole_dataset_is_the_last_resort() -> None:
    # 16 examples too spread for any batch of 8 to be cheap: sorting all of them (a window of two
    # batches) is the best there is, and it is taken though over budget.
    lengths = [10, 20, 40, 80, 160, 320, 640, 1280] * 2
    window, waste = choose_window(lengths, 8, 1)
    assert window == 2 and waste > PADDING_BUDGET


def test_the_hyperparameters_seed_orders_the_batches(tmp_path: Path) -> None:
    """hyperparameters.seed is documented to make "initialisation and data order reproducible";
    dataset.seed only shuffles and splits the data, so it must not fix the batch order too."""
    doc = valid_job()
    doc["spec"]["hyperparameters"]["seed"] = 7
    doc["spec"]["dataset"]["seed"] = 3
    spec = resolve_spec(FineTuneJob.model_validate(doc).spec)
    args = training_arguments(spec, tmp_path, has_validation=False)
    assert (args.seed, args.data_seed) == (7, None)
    assert args.train_sampling_strategy == "random"
