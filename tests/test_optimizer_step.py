"""Between the last backward and the next step: GradScaler (skipped steps, its checkpointed
state), on_before_optimizer_step, clip_grad_norm, and torch.compile'd models."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import elastic
from elastic.errors import ConfigError
from elastic.exchange.progress import read_progress
from elastic.worker import context
from elastic.worker.sampler import ElasticSampler
from helpers import child_env
from loop_launch import Group
from loop_worker import build_dataset, build_model

N, G, SEED = 23, 7, 0
CLIP_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "clip_worker.py")
POISONED = ElasticSampler(N, G, seed=SEED).samples(1).ids[0]  # its forward gives inf: position 1 overflows


def dataset(poisoned: int | None = POISONED):
    x = torch.randn(N, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = x.sum(1, keepdim=True).sin()
    if poisoned is not None:
        x[poisoned] = math.inf
    return [(x[i], y[i]) for i in range(N)]


def model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)


def scaler():
    return torch.amp.GradScaler("cpu", init_scale=2.0**10)


def global_norm(grads) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def test_a_step_the_scaler_skips_consumes_its_samples_but_no_step(tmp_path, monkeypatch):
    monkeypatch.setattr(context, "_progress", context.ProgressFile(str(tmp_path / "progress")))
    model, opt, sched = model_and_opt()
    grad_scaler = scaler()
    loop = elastic.TrainLoop(model=model, optimizer=opt, scheduler=sched, dataset=dataset(), global_batch_size=G,
                             micro_batch_size=G, max_steps=2, seed=SEED, grad_scaler=grad_scaler)
    seen = []
    for step in loop:
        seen.append((step.index, step.global_sample_ids))
        for x, y in step:
            step.backward(F.mse_loss(model(x), y))
    sampler = ElasticSampler(N, G, seed=SEED)
    assert seen == [(0, sampler.samples(0).ids), (1, sampler.samples(1).ids), (1, sampler.samples(2).ids)]
    assert loop.step == 2 and sched.last_epoch == 2 and grad_scaler.get_scale() == 2.0**9
    record = read_progress(str(tmp_path / "progress"))
    assert (record.step, record.skipped_steps) == (2, 1)
    # The steps taken are exactly those of plain SGD over the other positions (scaling by
    # powers of two is exact).
    ref, ref_opt, ref_sched = model_and_opt()
    data = dataset()
    for position in (0, 2):
        ids = sampler.samples(position).ids
        x, y = torch.stack([data[i][0] for i in ids]), torch.stack([data[i][1] for i in ids])
        F.mse_loss(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_sched.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_hook_sees_the_unscaled_global_mean_then_clipping_applies():
    model, opt, _ = model_and_opt()
    ref, _, _ = model_and_opt()
    start = [p.detach().clone() for p in model.parameters()]
    seen = {}

    def hook(step):
        seen["grads"] = [p.grad.clone() for p in model.parameters()]
        seen["index"] = step.index

    loop = elastic.TrainLoop(model=model, optimizer=opt, dataset=dataset(None), global_batch_size=G,
                             micro_batch_size=2, max_steps=1, seed=SEED, grad_scaler=scaler(),
                             clip_grad_norm=1e-3, on_before_optimizer_step=hook)
    data = dataset(None)
    for step in loop:
        for x, y in step:
            step.backward(F.mse_loss(model(x), y))
        ids = step.global_sample_ids
    F.mse_loss(ref(torch.stack([data[i][0] for i in ids])), torch.stack([data[i][1] for i in ids])).backward()
    expected = [p.grad for p in ref.parameters()]
    norm = global_norm(expected)
    assert seen["index"] == 0
    for got, want in zip(seen["grads"], expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(step.grad_norm, norm, rtol=1e-12, atol=0)
    assert norm > 1e-2  # so the clipping below changed the step
    for p, p0, g in zip(model.parameters(), start, expected):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g * (1e-3 / (norm + 1e-6)), rtol=1e-10, atol=1e-15)


def test_clipping_under_fsdp2_matches_ddp(tmp_path):
    """World size 2 on gloo, DDP then FSDP2 (fully_shard) in the same process group, uneven
    shares (7 samples on 2 ranks): step.grad_norm is the global-mean gradient's norm under
    both, the optimizer steps with that gradient scaled down to the max norm, and the
    parameters end within 1e-7 of DDP's."""
    max_norm = 0.05
    out = tmp_path / "clip.pt"
    Group([str(out), str(max_norm)], 2, child_env(), worker=CLIP_WORKER).wait_ok()
    ddp, fsdp2 = torch.load(out).values()
    assert fsdp2["ids"] == ddp["ids"] and len(ddp["ids"]) == 3
    # Step 0 starts from the same parameters in one process: the full global batch's gradient.
    model, data = build_model(), build_dataset()
    ids = ddp["ids"][0]
    F.mse_loss(model(torch.stack([data[i][0] for i in ids])), torch.stack([data[i][1] for i in ids])).backward()
    torch.testing.assert_close(ddp["norms"][0], global_norm([p.grad for p in model.parameters()]), rtol=1e-12, atol=0)
    for norm, want, clipped, want_clipped in zip(fsdp2["norms"], ddp["norms"], fsdp2["clipped"], ddp["clipped"]):
        assert want > max_norm  # every step was clipped
        torch.testing.assert_close(norm, want, rtol=1e-12, atol=0)
        for got, expected in zip(clipped, want_clipped):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(global_norm(clipped), max_norm * want / (want + 1e-6), rtol=1e-12, atol=0)
    for k, want in ddp["params"].items():
        torch.testing.assert_close(fsdp2["params"][k], want, rtol=0, atol=1e-7)


def run(directory, max_steps, stop_at=None):
    from checkpoint import CheckpointManager

    model, opt, sched = model_and_opt()
    grad_scaler = scaler()
    ids = {}
    with CheckpointManager(str(directory)) as ckpt:
        loop = elastic.TrainLoop(model=model, optimizer=opt, scheduler=sched, dataset=dataset(), global_batch_size=G,
                                 micro_batch_size=3, max_steps=max_steps, seed=SEED, checkpoint=ckpt, save_every=2,
                                 grad_scaler=grad_scaler, clip_grad_norm=0.5)
        for step in loop:
            if step.index == stop_at:
                break
            ids[step.index] = step.global_sample_ids
            for x, y in step:
                step.backward(F.mse_loss(model(x), y))
        ckpt.wait()
    return [p.detach().clone() for p in model.parameters()], grad_scaler.state_dict(), ids


def test_resume_with_a_grad_scaler_is_bitwise(tmp_path):
    """The checkpoint holds the scaler's state and the skipped steps: a run stopped after a
    skip resumes on the same samples, with the same scale, to the same parameters."""
    full, full_scaler, full_ids = run(tmp_path / "a", max_steps=6)
    run(tmp_path / "b", max_steps=6, stop_at=3)
    resumed, resumed_scaler, resumed_ids = run(tmp_path / "b", max_steps=6)
    assert min(resumed_ids) == 2 and resumed_ids == {k: v for k, v in full_ids.items() if k >= 2}
    assert resumed_scaler == full_scaler and full_scaler["scale"] < 2.0**10
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))


def test_compiled_model_trains_like_the_module():
    eager, _, _ = model_and_opt()
    for compiled in (False, True):
        model, opt, _ = model_and_opt()
        loop = elastic.TrainLoop(model=torch.compile(model, backend="eager") if compiled else model, optimizer=opt,
                                 dataset=dataset(None), global_batch_size=G, micro_batch_size=2, max_steps=2)
        for step in loop:
            for x, y in step:
                step.backward(F.mse_loss(loop.model(x), y))
        if not compiled:
            eager = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(eager, model.parameters()))


@pytest.mark.parametrize("kw, pattern", [
    ({"clip_grad_norm": 0.0}, r"clip_grad_norm=0.0: it must be a finite max norm > 0"),
    ({"clip_grad_norm": math.nan}, r"clip_grad_norm=nan: it must be a finite max norm > 0"),
    ({"on_before_optimizer_step": 3}, r"on_before_optimizer_step must be a callable taking the Step"),
])
def test_bad_options(kw, pattern):
    model, opt, _ = model_and_opt()
    with pytest.raises(ConfigError, match=pattern):
        elastic.TrainLoop(model=model, optimizer=opt, dataset=dataset(), global_batch_size=G, micro_batch_size=2,
                          max_steps=1, **kw)
