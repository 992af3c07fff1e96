"""TrainLoop in one process (no process group): exact global mean, misuse, bad input."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import elastic
from elastic.worker.context import ProgressFile, context_from_env
from elastic.exchange.progress import Progress, read_progress
from elastic.worker.stop_agreement import check_interval
from elastic.errors import ConfigError, StateMismatchError, TrainLoopUsageError

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
        ({"save_every": 2}, r"save_every=2 needs a checkpoint manager"),
        ({"stop_check_every": 0}, r"stop_check_every=0: it must be >= 1"),
        ({"overlap_save": True}, r"overlap_save=True needs a checkpoint manager"),
        ({"memory_save_every": 0}, r"memory_save_every=0: it must be >= 1"),
        ({"memory_save_every": 1}, r"memory_save_every=1 saves into the checkpoint manager's memory tier"),
    ],
)
def test_bad_options(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        make_loop(**kw)


def test_overlap_save_refuses_a_model_with_buffers(tmp_path):
    from checkpoint import CheckpointManager

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).double()
    with CheckpointManager(str(tmp_path)) as ckpt, pytest.raises(
        ConfigError, match=r"overlap_save=True, but the model has buffers \(1\.running_mean, "
        r"1\.running_var, 1\.num_batches_tracked\)"
    ):
        elastic.TrainLoop(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          dataset=dataset(), global_batch_size=7, micro_batch_size=2, max_steps=3,
                          checkpoint=ckpt, overlap_save=True)


@pytest.mark.parametrize(
    "seconds, every, interval",
    [(0.0, None, 1), (0.001, None, 250), (1e-9, None, 1000), (2.0, None, 1), (0.001, 3, 3)],
)
def test_sigterm_check_interval(seconds, every, interval):
    assert check_interval(seconds, every) == interval


def test_save_without_manager():
    _, _, loop = make_loop()
    with pytest.raises(ConfigError, match="needs a checkpoint manager"):
        loop.save()


def test_context_from_env():
    assert context_from_env({}) == elastic.Context(0, 1, 0, 0, 0, "local", os.path.abspath("checkpoints/local"))
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
    path = str(tmp_path / "progress")
    progress = ProgressFile(path)
    assert read_progress(path).step is None
    progress.write(9)
    first = read_progress(path)
    assert (first.step, first.resumed, first.commits) == (9, 9, ())
    progress.write(1000)
    progress.commit(1000, 0.25)
    now = read_progress(path)
    assert (now.step, now.resumed, now.commits[-1].step, now.commits[-1].stall) == (1000, 9, 1000, 0.25)
    for step in range(1001, 1001 + Progress.KEPT_COMMITS):  # the newest few commits are kept
        progress.commit(step, 0.0)
    assert [c.step for c in read_progress(path).commits] == list(range(1001, 1001 + Progress.KEPT_COMMITS))
    assert now.changed_at >= first.changed_at
    progress.write(3)  # a shorter record: no stale tail of the longer one is left behind
    assert read_progress(path).step == 3


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def run_with_checkpoints(directory, *, max_steps, stop_at=None, g=7, m=2, hidden=5, overlap_save=False,
                         num_workers=0, memory_save_every=None):
    """Train in this process with a CheckpointManager; stop_at leaves the loop early (as a crash
    would, minus the process exit). Returns the parameters and the sample ids per step."""
    from checkpoint import CheckpointManager

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    counter = Counter()
    seen = {}
    with CheckpointManager(str(directory), keep_last=2, memory_tier=memory_save_every is not None) as ckpt:
        loop = elastic.TrainLoop(model=model, optimizer=opt, dataset=dataset(), global_batch_size=g,
                                 micro_batch_size=m, max_steps=max_steps, checkpoint=ckpt,
                                 save_every=2, scheduler=sched, overlap_save=overlap_save, num_workers=num_workers,
                                 memory_save_every=memory_save_every,
                                 extra_state={"counter": counter, "config": {"hidden": hidden}})
        resumed = loop.resume()
        assert counter.count == (resumed or 0)  # user extras come back with the checkpoint
        assert loop.extra("config") == {"hidden": hidden}
        for step in loop:
            counter.count += 1
            if step.index == stop_at:
                break
            ids = []
            for x, y, i in step:
                # dropout-like use of the RNG: resume must restore the RNG stream too
                noise = 1 + 1e-3 * torch.rand(())
                step.backward(F.mse_loss(model(x) * noise, y))
                ids.extend(i.tolist()[: step.micro_batch.size])
            seen[step.index] = ids
        ckpt.wait()
    return [p.detach().clone() for p in model.parameters()], seen


@pytest.mark.parametrize("overlap_save, num_workers", [(False, 0), (True, 0), (False, 2)])
def test_resume_in_one_process_is_bitwise(tmp_path, overlap_save, num_workers):
    full, full_ids = run_with_checkpoints(tmp_path / "a", max_steps=9)
    _, first_ids = run_with_checkpoints(tmp_path / "b", max_steps=9, stop_at=5, overlap_save=overlap_save,
                                        num_workers=num_workers)
    resumed, resumed_ids = run_with_checkpoints(tmp_path / "b", max_steps=9, overlap_save=overlap_save,
                                                num_workers=num_workers)
    assert min(resumed_ids) == 4  # saves every 2 steps: step 4 was the last one committed
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)
    assert {**first_ids, **resumed_ids} == full_ids


def test_memory_saves_resume_from_the_step_of_the_fault_bitwise(tmp_path, monkeypatch):
    """memory_save_every=1 beside save_every=2: the step of the fault comes back from memory."""
    from checkpoint import CheckpointManager

    monkeypatch.setenv("ELASTIC_MEMORY_DIR", str(tmp_path / "node-memory"))  # as the agent sets it
    full, full_ids = run_with_checkpoints(tmp_path / "a", max_steps=9)
    run_with_checkpoints(tmp_path / "b", max_steps=9, stop_at=5, memory_save_every=1)
    assert CheckpointManager(str(tmp_path / "b")).latest() == 4  # durable: every 2 steps
    resumed, resumed_ids = run_with_checkpoints(tmp_path / "b", max_steps=9, memory_save_every=1)
    assert min(resumed_ids) == 5  # step 5 was committed to memory only
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)
    assert CheckpointManager(str(tmp_path / "b")).latest() == 9  # the final save is durable


def test_checkpoint_of_another_model_names_the_keys(tmp_path):
    from checkpoint import CheckpointMismatchError

    run_with_checkpoints(tmp_path, max_steps=2)
    with pytest.raises(CheckpointMismatchError, match=r"0\.weight: checkpoint has float64\[5, 3\], the model has float64\[4, 3\]"):
        run_with_checkpoints(tmp_path, max_steps=4, hidden=4)


def test_checkpoint_with_another_sample_order_is_refused(tmp_path):
    run_with_checkpoints(tmp_path, max_steps=2)
    with pytest.raises(StateMismatchError, match=r"global_batch_size: checkpoint 7 != now 8"):
        run_with_checkpoints(tmp_path, max_steps=4, g=8)


def test_sigterm_in_one_process_saves_the_next_boundary_and_exits_143(tmp_path):
    import os
    import signal

    from checkpoint import CheckpointManager

    model, opt = model_and_opt()
    previous = signal.getsignal(signal.SIGTERM)
    with CheckpointManager(str(tmp_path)) as ckpt:
        loop = elastic.TrainLoop(model=model, optimizer=opt, dataset=dataset(), global_batch_size=7,
                                 micro_batch_size=7, max_steps=10, checkpoint=ckpt)
        with pytest.raises(SystemExit) as exit_info:
            for step in loop:
                if step.index == 2:
                    os.kill(os.getpid(), signal.SIGTERM)  # handled: the step still completes
                for x, y, _ in step:
                    step.backward(F.mse_loss(model(x), y))
        assert exit_info.value.code == 143
        assert ckpt.steps() == [3]
    assert signal.getsignal(signal.SIGTERM) is previous


def test_world_size_checks_in_a_two_rank_group(tmp_path):
    """G < W and an unwrapped model at W > 1, checked in a (fake, in-process) group of 2."""
    import subprocess
    import sys

    from helpers import child_env

    script = '''
import pytest, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
import elastic
dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
model = torch.nn.Linear(2, 1)
kw = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
          dataset=[(torch.zeros(2), torch.zeros(1))] * 8, micro_batch_size=1, max_steps=1)
with pytest.raises(elastic.ConfigError, match="global_batch_size=1 is smaller than the world size 2"):
    elastic.TrainLoop(global_batch_size=1, **kw)
with pytest.raises(elastic.ConfigError, match="plain Linear at world size 2"):
    elastic.TrainLoop(global_batch_size=4, **kw)
print("checked")
'''
    done = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "checked" in done.stdout, done.stdout + done.stderr


def run_saving_in_the_body(directory, *, max_steps, save_at=None, stop_after_save=False):
    """Each body draws noise from torch's RNG before its forwards; at step `save_at` the body
    calls loop.save() after that draw. Returns the final parameters."""
    from checkpoint import CheckpointManager

    model, opt = model_and_opt()
    with CheckpointManager(str(directory)) as ckpt:
        loop = elastic.TrainLoop(model=model, optimizer=opt, dataset=dataset(), global_batch_size=7,
                                 micro_batch_size=7, max_steps=max_steps, checkpoint=ckpt)
        for step in loop:
            noise = 1 + 1e-3 * torch.rand(())
            if step.index == save_at:
                loop.save(metrics={"val_loss": 1.0})
                if stop_after_save:
                    break
            for x, y, _ in step:
                step.backward(F.mse_loss(model(x) * noise, y))
        ckpt.wait()
    return [p.detach().clone() for p in model.parameters()]


def test_save_in_the_body_after_torch_draws_resumes_bitwise(tmp_path):
    """The torch streams saved are the boundary's, not those after the body's draws."""
    full = run_saving_in_the_body(tmp_path / "a", max_steps=6)
    run_saving_in_the_body(tmp_path / "b", max_steps=6, save_at=3, stop_after_save=True)
    resumed = run_saving_in_the_body(tmp_path / "b", max_steps=6)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))


def test_context_checkpoint_dir_defaults_to_checkpoints_run_id(tmp_path, monkeypatch):
    from elastic.worker.context import context_from_env

    monkeypatch.chdir(tmp_path)
    assert context_from_env({"TORCHELASTIC_RUN_ID": "job-3"}).checkpoint_dir == str(tmp_path / "checkpoints" / "job-3")
    assert context_from_env({}).checkpoint_dir == str(tmp_path / "checkpoints" / "local")
    assert context_from_env({"ELASTIC_CHECKPOINT_DIR": "s3://b/p"}).checkpoint_dir == "s3://b/p"
