"""TrainLoop's data path: DataLoader workers load exactly the batches of the training-thread
path, augmentation seeded by the sample, loader workers end with the loop, device moves, and
the datasets and options it refuses."""

from __future__ import annotations

import collections
import dataclasses
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import elastic
from elastic.errors import ConfigError
from elastic.worker.batches import SampleIndex, move_to
from helpers import alive

N, G, M = 23, 7, 2


class Augmented(torch.utils.data.Dataset):
    """x plus noise drawn from the sample's own generator; also says which process loaded it."""

    def __init__(self) -> None:
        self.x = torch.randn(N, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: SampleIndex):
        noise = torch.randn(3, dtype=torch.float64, generator=elastic.sample_generator(4, i.epoch, i))
        x = self.x[i] + 0.1 * noise
        return x, x.sum().sin().reshape(1), i, os.getpid()


def record_pid(path: str, worker_id: int) -> None:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def train(num_workers: int, max_steps: int = 8, **kw):
    """Batches seen per step (x, ids, loading pids) and the final parameters."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
    loop = elastic.TrainLoop(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                             dataset=Augmented(), global_batch_size=G, micro_batch_size=M,
                             max_steps=max_steps, num_workers=num_workers, **kw)
    seen = []
    for step in loop:
        for x, y, ids, pids in step:
            step.backward(F.mse_loss(model(x), y))
            seen.append((step.index, x, ids.tolist(), set(pids.tolist())))
    return seen, [p.detach() for p in model.parameters()]


def test_loader_workers_load_the_same_batches_off_the_training_thread():
    """Over two epochs (N=23, G=7: 3 steps each): the same ids, the same augmented samples, the
    same parameters, whether the samples are loaded here or by 2 worker processes."""
    here, params_here = train(0)
    workers, params_workers = train(2, prefetch_factor=3, persistent_workers=True)
    assert [(s, ids) for s, _, ids, _ in here] == [(s, ids) for s, _, ids, _ in workers]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(here, workers))
    assert all(torch.equal(a, b) for a, b in zip(params_here, params_workers))
    assert {p for *_, pids in here for p in pids} == {os.getpid()}
    assert len({p for *_, pids in workers for p in pids}) == 2 and os.getpid() not in {
        p for *_, pids in workers for p in pids}


def test_augmentation_depends_on_seed_epoch_and_sample_only():
    a = torch.rand(4, generator=elastic.sample_generator(1, 0, 17))
    assert torch.equal(a, torch.rand(4, generator=elastic.sample_generator(1, 0, 17)))
    assert not torch.equal(a, torch.rand(4, generator=elastic.sample_generator(1, 1, 17)))
    assert not torch.equal(a, torch.rand(4, generator=elastic.sample_generator(1, 0, 18)))
    assert not torch.equal(a, torch.rand(4, generator=elastic.sample_generator(2, 0, 17)))


def test_sigterm_ends_the_loader_workers_with_the_loop(tmp_path):
    from checkpoint import CheckpointManager

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    pids = tmp_path / "pids"
    with CheckpointManager(str(tmp_path / "ckpt")) as ckpt:
        loop = elastic.TrainLoop(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 dataset=Augmented(), global_batch_size=G, micro_batch_size=G, max_steps=10,
                                 checkpoint=ckpt, num_workers=2, worker_init_fn=lambda w: record_pid(str(pids), w))
        with pytest.raises(SystemExit) as exit_info:
            for step in loop:
                if step.index == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                for x, y, *_ in step:
                    step.backward(F.mse_loss(model(x), y))
        assert exit_info.value.code == 143 and ckpt.steps() == [2]
    started = [int(line) for line in pids.read_text().split()]
    assert len(started) == 2 and not any(alive(pid) for pid in started)


def test_batches_move_to_the_device_whatever_holds_them():
    Pair = collections.namedtuple("Pair", "a b")

    @dataclasses.dataclass
    class Batch:
        tokens: torch.Tensor
        meta: dict

    batch = {"x": [torch.zeros(2), (torch.ones(1), 3)], "p": Pair(torch.zeros(1), "s"),
             "d": Batch(torch.zeros(3), {"m": torch.ones(2)})}
    moved = move_to(batch, torch.device("meta"), non_blocking=False)
    assert moved["x"][0].is_meta and moved["x"][1][0].is_meta and moved["x"][1][1] == 3
    assert isinstance(moved["p"], Pair) and moved["p"].a.is_meta and moved["p"].b == "s"
    assert isinstance(moved["d"], Batch) and moved["d"].tokens.is_meta and moved["d"].meta["m"].is_meta
    assert not batch["x"][0].is_meta  # the loader's batch is left as it was


def test_device_option_moves_every_batch():
    """On the meta device (no accelerator needed): tensors move, the loop runs as usual."""
    model = torch.nn.Linear(3, 1, device="meta", dtype=torch.float64)
    loop = elastic.TrainLoop(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                             dataset=Augmented(), global_batch_size=G, micro_batch_size=M, max_steps=2,
                             device="meta")
    moved = []
    for step in loop:
        for x, y, ids, _ in step:
            moved.append(x.is_meta and y.is_meta and ids.is_meta)
            step.backward(F.mse_loss(model(x), y))
    assert moved == [True] * 8 and loop.step == 2


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from range(10)


@pytest.mark.parametrize("dataset, kw, pattern", [
    (Stream(), {}, r"the dataset is a Stream without len\(\) and \[i\]: .* pass a map-style view"),
    (iter(range(50)), {}, r"the dataset is a range_iterator without len\(\) and \[i\]"),
    (list(range(50)), {"num_workers": -1}, r"num_workers=-1: it must be >= 0"),
    (list(range(50)), {"prefetch_factor": 2}, r"prefetch_factor and persistent_workers need loader worker "
                                              r"processes: pass num_workers >= 1"),
    (list(range(50)), {"num_workers": 1, "prefetch_factor": 0}, r"prefetch_factor=0: it must be >= 1"),
])
def test_refused_datasets_and_options(dataset, kw, pattern):
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ConfigError, match=pattern):
        elastic.TrainLoop(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dataset=dataset,
                          global_batch_size=4, micro_batch_size=2, max_steps=1, **kw)
