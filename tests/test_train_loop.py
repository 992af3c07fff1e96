"""TrainLoop in one process (no process group): exact global mean, misuse, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import elastic
from elastic.context import ProgressFile, context_from_env
from elastic.errors import ConfigError, TrainLoopUsageError

N = 23


def dataset():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, dtype=torch.float64, generator=gen)
    return [(x[i], x[i].sum().sin().reshape(1), i) for i in range(N)]


def model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def make_loop(g=7, m=2, max_steps=3, **kw):
    model, opt = model_and_opt()
    loop = elastic.TrainLoop(model=model, optimizer=opt, dataset=dataset(), global_batch_size=g,
                             micro_batch_size=m, max_steps=max_steps, **kw)
    return model, opt, loop


def test_public_names():
    assert {"TrainLoop", "ElasticSampler", "init", "Context", "ConfigError",
            "StateMismatchError", "TrainLoopUsageError"} <= set(dir(elastic))


@pytest.mark.parametrize("m", [1, 2, 3, 7])
def test_step_gradient_is_the_exact_mean_over_the_global_batch(m):
    """One step with any micro-batch size applies the full-batch mean gradient."""
    model, opt, loop = make_loop(g=7, m=m, max_steps=1)
    ref_model, _ = model_and_opt()
    data = dataset()
    for step in loop:
        ids = step.global_sample_ids
        x = torch.stack([data[i][0] for i in ids])
        y = torch.stack([data[i][1] for i in ids])
        F.mse_loss(ref_model(x), y).backward()
        expected = [p.grad.clone() for p in ref_model.parameters()]
        for xb, yb, _ in step:
            step.backward(F.mse_loss(model(xb), yb))
        assert step.accumulation_steps == -(-7 // m)
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.grad, e, rtol=0, atol=1e-15)
    assert loop.step == 1
    assert all(p.grad is None for p in model.parameters())  # zero_grad ran when the loop advanced


def test_loss_backward_instead_of_step_backward_is_caught():
    model, _, loop = make_loop()
    with pytest.raises(TrainLoopUsageError, match=r"step 0: micro-batch 0 ended without step.backward"):
        for step in loop:
            for x, y, _ in step:
                F.mse_loss(model(x), y).backward()


def test_breaking_out_of_the_micro_batches_is_caught():
    model, _, loop = make_loop()
    with pytest.raises(TrainLoopUsageError, match=r"before all 4 micro-batches were iterated"):
        for step in loop:
            for x, y, _ in step:
                step.backward(F.mse_loss(model(x), y))
                break


def test_backward_outside_and_twice():
    model, _, loop = make_loop()
    with pytest.raises(TrainLoopUsageError, match="outside `for batch in step`"):
        for step in loop:
            step.backward(torch.zeros((), requires_grad=True))
    model, _, loop = make_loop()
    with pytest.raises(TrainLoopUsageError, match="called twice for micro-batch 0"):
        for step in loop:
            for x, y, _ in step:
                loss = F.mse_loss(model(x), y)
                step.backward(loss)
                step.backward(loss)


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"m": 0}, r"micro_batch_size=0: it must be a positive"),
        ({"m": -1}, r"micro_batch_size=-1: it must be a positive"),
        ({"g": 24}, r"the dataset has 23 samples, fewer than global_batch_size=24"),
        ({"max_steps": -1}, r"max_steps=-1"),
        ({"save_every": 0}, r"save_every=0"),
    ],
)
def test_bad_options(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        make_loop(**kw)


def test_save_without_manager():
    _, _, loop = make_loop()
    with pytest.raises(ConfigError, match="needs a checkpoint manager"):
        loop.save()


def test_context_from_env():
    assert context_from_env({}) == elastic.Context(0, 1, 0, 0, 0, "local", None)
    env = {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1",
           "TORCHELASTIC_RESTART_COUNT": "4", "ELASTIC_ROUND": "7", "TORCHELASTIC_RUN_ID": "job",
           "ELASTIC_CHECKPOINT_DIR": "memory://c"}
    assert context_from_env(env) == elastic.Context(2, 3, 0, 4, 7, "job", "memory://c")
    with pytest.raises(ConfigError, match="sets RANK, WORLD_SIZE but not MASTER_ADDR, MASTER_PORT"):
        context_from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="RANK=3 is not below WORLD_SIZE=3"):
        context_from_env({**env, "RANK": "3"})
    with pytest.raises(ConfigError, match="ELASTIC_ROUND='x' is not an integer"):
        context_from_env({**env, "ELASTIC_ROUND": "x"})


def test_init_single_process_is_idempotent():
    assert elastic.init() is elastic.init()
    assert elastic.init().world_size == 1


def test_progress_file(tmp_path):
    path = tmp_path / "progress"
    progress = ProgressFile(str(path))
    progress.write(9)
    assert path.read_text() == "9\n"
    progress.write(10)
    assert path.read_text() == "10\n"
    progress.write(3)
    assert path.read_text() == "3\n"
