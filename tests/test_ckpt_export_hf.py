"""`elastic-ckpt export --format hf`: a Hugging Face model directory (model.safetensors +
config.json) from a checkpoint written by the real CheckpointManager, and its one-line errors.
That transformers loads it with equal outputs is tested end to end in test_example_hf_gpt2.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_ckpt_cli import run

from checkpoint import CheckpointManager

CONFIG = {"model_type": "toy", "id2label": {0: "a", 1: "b"}}  # int keys, as transformers' configs have
CONFIG_TEXT = '{\n  "model_type": "toy"\n}\n'


class Tied(torch.nn.Module):
    """An embedding whose output layer shares its weight, as GPT-2's lm_head does."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 4)
        self.fc = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight


@pytest.fixture
def ckpt(tmp_path) -> tuple[str, Tied]:
    torch.manual_seed(0)
    net = Tied()
    url = str(tmp_path / "ckpt")
    optimizer = torch.optim.Adam(net.parameters())
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # optimizer state: tensors under optimizer/, which the export leaves out
    with CheckpointManager(url, async_write=False) as m:
        m.save(1, {"model": net, "optimizer": optimizer, "cfg": CONFIG, "cfg_text": CONFIG_TEXT})
    return url, net


def export(capsys, url: str, dest: str, *extra: str) -> tuple[int, str, str]:
    return run(capsys, "export", url, "--step", "1", "--to", dest, "--format", "hf", *extra)


def test_the_model_entry_becomes_model_safetensors_under_its_parameter_names(ckpt, tmp_path, capsys):
    url, net = ckpt
    dest = str(tmp_path / "hf")
    code, out, err = export(capsys, url, dest, "--prefix", "model/", "--config-entry", "cfg",
                            "--exclude", "head.weight")
    assert (code, err) == (0, "")
    assert out.startswith("exported step 1: 3 tensors, ") and out.endswith(f" to {dest}\n")
    tensors = load_file(f"{dest}/model.safetensors")  # the plain safetensors library
    assert sorted(tensors) == ["emb.weight", "fc.bias", "fc.weight"]  # no optimizer state, no tied copy
    for name, value in tensors.items():
        assert torch.equal(value, net.state_dict()[name]), name
    with safe_open(f"{dest}/model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses files without it
    with open(f"{dest}/config.json") as f:
        assert json.load(f) == {"model_type": "toy", "id2label": {"0": "a", "1": "b"}}


@pytest.mark.parametrize("source", ["file", "entry"])
def test_config_json_is_copied_verbatim_from_a_file_or_a_text_entry(ckpt, tmp_path, capsys, source):
    url, _ = ckpt
    config = tmp_path / "config.json"
    config.write_text(CONFIG_TEXT)
    flag = ["--config", str(config)] if source == "file" else ["--config-entry", "cfg_text"]
    code, _, err = export(capsys, url, str(tmp_path / "hf"), "--prefix", "model/", *flag)
    assert (code, err) == (0, "")
    assert (tmp_path / "hf" / "config.json").read_text() == CONFIG_TEXT
    assert "head.weight" in load_file(tmp_path / "hf" / "model.safetensors")  # kept unless excluded


def test_an_existing_export_is_replaced_only_with_force(ckpt, tmp_path, capsys):
    url, _ = ckpt
    dest = str(tmp_path / "hf")
    args = ("--prefix", "model/", "--config-entry", "cfg")
    assert export(capsys, url, dest, *args)[0] == 0
    code, _, err = export(capsys, url, dest, *args)
    assert code == 2
    assert err == f"elastic-ckpt: error: {dest} already holds model.safetensors; pass --force to overwrite it or choose another --to\n"
    assert export(capsys, url, dest, *args, "--exclude", "head.weight", "--force")[0] == 0
    assert "head.weight" not in load_file(f"{dest}/model.safetensors")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--step", "9", "--prefix", "model/", "--config-entry", "cfg"], "no committed checkpoint for step 9"),
        (["--prefix", "nope/", "--config-entry", "cfg"],
         "no tensor of step 1 starts with --prefix 'nope/'; its tensor names start with model/, optimizer/"),
        (["--prefix", "model", "--config-entry", "cfg"],
         "--prefix 'model' ends inside a name (it leaves '/emb.weight'); end it at a '/', e.g. --prefix model/"),
        (["--prefix", "model/"], "--format hf needs the model's config.json: pass --config FILE or --config-entry NAME"),
        (["--prefix", "model/", "--config-entry", "missing"],
         "step 1 has no state entry 'missing' for --config-entry; its entries are cfg, cfg_text, model, optimizer"),
        (["--prefix", "model/", "--config-entry", "model"], "--config-entry 'model' holds tensors"),
        (["--prefix", "model/", "--config", "{nojson}"], "is not JSON"),
        (["--prefix", "model/", "--config", "{missing}"], "cannot read --config"),
        (["--prefix", "model/", "--config-entry", "cfg", "--exclude", "head"],
         "--exclude 'head' is not a tensor under --prefix 'model/' in step 1; names there look like emb.weight"),
        (["--config-entry", "cfg"], "--format hf needs --prefix: the key prefix of the model's tensors"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(ckpt, tmp_path, capsys, extra, message):
    url, _ = ckpt
    (tmp_path / "nojson").write_text("model_type: toy\n")
    extra = [a.format(nojson=tmp_path / "nojson", missing=tmp_path / "missing.json") for a in extra]
    dest = tmp_path / "hf"
    code, out, err = export(capsys, url, str(dest), *extra)
    assert (code, out) == (2, "")
    assert err.startswith("elastic-ckpt: error: ") and err.count("\n") == 1 and message in err, err
    assert not dest.exists()


def test_hf_options_need_format_hf(ckpt, tmp_path, capsys):
    url, _ = ckpt
    code, _, err = run(capsys, "export", url, "--step", "1", "--to", str(tmp_path / "x.safetensors"),
                       "--prefix", "model/")
    assert code == 2
    assert err == "elastic-ckpt: error: --prefix, --config, --config-entry and --exclude go with --format hf\n"
