"""The README's training script runs as written under `elastic-run --standalone` (no
--checkpoint-dir, as in the README's first command), after a preamble that defines what it
leaves to the reader: model, optimizer, dataset, loss_fn, evaluate."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from helpers import REPO, child_env

PREAMBLE = '''
import torch
import elastic
from torch.nn.parallel import DistributedDataParallel

elastic.init()
torch.manual_seed(0)
model = DistributedDataParallel(torch.nn.Linear(4, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
dataset = [(torch.randn(4), torch.randn(1)) for _ in range(256)]
loss_fn = torch.nn.functional.mse_loss
def evaluate(model):
    with torch.no_grad():
        return float(sum(loss_fn(model(x), y) for x, y in dataset[:16]) / 16)
'''


def readme_script() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        (block,) = re.findall(r"## A training script\n\n```python\n(.*?)```", f.read(), re.DOTALL)
    return block


def test_readme_training_script_runs_as_written(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(PREAMBLE + readme_script())
    done = subprocess.run([sys.executable, "-m", "elastic", "--standalone", "--nproc-per-node", "2", str(script)],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    (run_dir,) = (tmp_path / "checkpoints").iterdir()  # ./checkpoints/<run id>
    with open(run_dir / "step_000000001000" / "manifest.json") as f:
        assert "val_loss" in json.load(f)["metrics"]
