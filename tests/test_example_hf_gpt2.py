"""examples/hf_gpt2.py under elastic-run (2 ranks), exported with `elastic-ckpt export
--format hf`: transformers' from_pretrained loads the directory with no missing or unexpected
key and gives the same logits as the model loaded from the checkpoint by CheckpointManager."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, child_env
from safetensors.torch import load_file

from checkpoint import CheckpointManager
from checkpoint.cli.commands import main as elastic_ckpt

# CI installs the `examples` extra; the guard is for environments without it.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason='transformers is not installed: pip install -e ".[examples]"')
STEPS = 3


def test_the_example_trains_under_elastic_run_and_exports_what_transformers_loads(tmp_path):
    ckpt_dir, out = tmp_path / "ckpt", str(tmp_path / "hf")
    run = subprocess.Popen(
        [sys.executable, "-m", "elastic", "--standalone", "--nproc-per-node", "2", "--checkpoint-dir",
         str(ckpt_dir), os.path.join(REPO, "examples", "hf_gpt2.py"), "--steps", str(STEPS),
         "--block", "16", "--max-chars", "20000", "--global-batch", "8",
         "--micro-batch", "4"],
        env=child_env(HF_HUB_OFFLINE="1"), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Imported while the workers start: transformers takes seconds to import.
        from transformers import GPT2Config, GPT2LMHeadModel

        output, _ = run.communicate(timeout=240)
    finally:
        if run.poll() is None:  # its workers and etcd die with it (parent-death signal)
            run.kill()
            run.wait()
    assert run.returncode == 0, output
    assert f"done at step {STEPS}" in output and "world 2  accumulation 1" in output, output

    assert elastic_ckpt(["export", str(ckpt_dir), "--step", str(STEPS), "--to", out, "--format", "hf",
                         "--prefix", "model/", "--config-entry", "hf_config", "--exclude", "lm_head.weight"]) == 0
    assert "lm_head.weight" not in load_file(os.path.join(out, "model.safetensors"))
    hf, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # nothing missing, unexpected or mismatched
    assert hf.lm_head.weight is hf.transformer.wte.weight  # transformers tied the excluded copy again

    with CheckpointManager(str(ckpt_dir)) as ckpt:
        config = GPT2Config.from_dict(json.loads(ckpt.manifest(STEPS).state["hf_config"]))
        torch.manual_seed(1)  # another start than the example's: the load must overwrite every weight
        reference = GPT2LMHeadModel(config)
        assert ckpt.load({"model": reference}) == STEPS
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    hf.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(hf(tokens).logits, reference(tokens).logits)
        torch.manual_seed(0)  # the example's initial weights: training moved them
        assert not torch.equal(GPT2LMHeadModel(config).eval()(tokens).logits, hf(tokens).logits)
