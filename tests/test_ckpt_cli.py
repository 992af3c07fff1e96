"""elastic-ckpt against checkpoints written by the real CheckpointManager (local and memory://)."""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import re
import subprocess
import sys
import textwrap
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem
import pytest
import torch
from safetensors.torch import load_file

from checkpoint import CheckpointManager
from checkpoint.cli import progress_bar
from checkpoint.cli.commands import main, parse_storage_option
from checkpoint.cli.tables import fit, size
from helpers import REPO, child_env

LOSSES = {10: 0.5, 20: 0.3, 30: 0.4, 40: 0.35}


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "ckpt")
    return f"memory://cli-{uuid.uuid4().hex}"


def model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def write(url: str, losses: dict[int, float] = LOSSES) -> None:
    net = model()
    with CheckpointManager(url, async_write=False) as ckpt:
        for step, loss in losses.items():
            ckpt.save(step, {"model": net, "meta": {"name": "x", "lr": 0.01}},
                      {"val_loss": loss, "acc": 1 - loss}, epoch=step // 20)


def leftover(url: str, step: int) -> None:
    """What a crash mid-save leaves: a shard file and no manifest."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(f"{root}/step_{step:012d}", exist_ok=True)
    fs.pipe_file(f"{root}/step_{step:012d}/rank00000-crashed.safetensors", b"x" * 100)


def step_dirs(url: str) -> list[int]:
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return sorted(int(p.rstrip("/").rsplit("_", 1)[1]) for p in fs.ls(root, detail=False))


def shard(url: str, step: int) -> str:
    fs, root = fsspec.core.url_to_fs(url)
    (path,) = [p for p in fs.ls(f"{root}/step_{step:012d}", detail=False) if p.endswith(".safetensors")]
    return path


def flip_byte(url: str, step: int, from_end: int = 10) -> str:
    fs, _ = fsspec.core.url_to_fs(url)
    path = shard(url, step)
    data = bytearray(fs.cat_file(path))
    data[-from_end] ^= 0x01
    fs.pipe_file(path, bytes(data))
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def rows(out: str) -> dict[int, list[str]]:
    """Table rows of `inspect` by step: [mark, step, ...cells]."""
    found = {}
    for line in out.splitlines():
        line = re.sub(r"(\d) (B|KiB|MiB)\b", r"\1\2", line)  # one cell for "3.6 KiB"
        match = re.match(r"^(L?B?)\s+(\d+)\s+(.*)$", line)
        if match:
            found[int(match.group(2))] = [match.group(1), match.group(2), *match.group(3).split()]
    return found


# ---------------------------------------------------------------- inspect


def test_inspect_table_marks_latest_best_and_incomplete(url, capsys):
    write(url)
    leftover(url, 50)
    code, out, err = run(capsys, "inspect", url, "--metric", "val_loss", "--keep-best", "2")
    assert code == 0 and err == ""
    assert all(len(line) <= 80 for line in out.splitlines()), out
    table = rows(out)
    assert sorted(table) == [10, 20, 30, 40, 50]
    assert {s: r[0] for s, r in table.items()} == {10: "", 20: "B", 30: "", 40: "LB", 50: ""}
    # step, epoch, world size, run/round, size, files, age, status, metrics
    assert table[20][2:5] == ["1", "1", "-"] and table[20][8] == "committed"
    assert table[20][9:] == ["val_loss=0.3", "acc=0.7"]
    assert table[50][-2:] == ["incomplete", "-"]
    assert out.splitlines()[0].startswith("4 committed, 1 incomplete, run - in ")
    assert "B = best 2 by val_loss (min)" in out


def test_inspect_shows_run_and_round(url, capsys, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("ELASTIC_ROUND", "1")
    write(url, {10: 0.5})
    code, out, _ = run(capsys, "inspect", url)
    assert out.splitlines()[0] == fit(f"1 committed, run job-a in {url}", 80, middle=True)
    assert out.splitlines()[1].split()[:5] == ["STEP", "EPOCH", "WORLD", "ROUND", "SIZE"]
    assert rows(out)[10][4] == "1"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    monkeypatch.setenv("ELASTIC_ROUND", "4")
    write(url, {20: 0.4})
    code, out, _ = run(capsys, "inspect", url)
    assert code == 0 and out.splitlines()[1].split()[3] == "RUN/ROUND"
    assert rows(out)[10][4] == "job-a/1" and rows(out)[20][4] == "job-b/4"
    code, out, _ = run(capsys, "inspect", url, "--json")
    assert [(c["run_id"], c["round"]) for c in json.loads(out)["checkpoints"]] == [("job-a", 1), ("job-b", 4)]


def test_inspect_json_schema(url, capsys):
    write(url, {10: 0.5, 20: float("nan"), 30: 0.4})
    leftover(url, 40)
    code, out, _ = run(capsys, "inspect", url, "--json")
    doc = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert code == 0
    assert doc["schema_version"] == 1 and doc["kind"] == "checkpoints" and doc["url"] == url
    assert doc["latest"] == 30
    # the only metric name is not unique (acc and val_loss), so nothing is ranked by default
    assert doc["best"] is None
    by_step = {c["step"]: c for c in doc["checkpoints"]}
    assert set(by_step[10]) == {
        "step", "status", "epoch", "metrics", "world_size", "run_id", "round", "created", "tier",
        "age_seconds", "bytes", "files", "latest", "best", "error",
    }
    assert by_step[10]["tier"] == "durable"
    assert by_step[20]["metrics"] == {"acc": "nan", "val_loss": "nan"}
    assert by_step[30]["latest"] and not by_step[10]["latest"]
    assert by_step[40]["status"] == "incomplete" and by_step[40]["metrics"] == {}
    assert by_step[40]["bytes"] == 100 and by_step[40]["files"] == 1
    assert by_step[10]["world_size"] == 1 and by_step[10]["epoch"] == 0 and by_step[10]["files"] == 2
    code, out, _ = run(capsys, "inspect", url, "--json", "--metric", "val_loss", "--mode", "max")
    assert json.loads(out)["best"] == {"metric": "val_loss", "mode": "max", "keep": 1, "steps": [10]}


def test_inspect_step_lists_tensors_and_state(url, capsys):
    write(url)
    code, out, err = run(capsys, "inspect", url, "--step", "20")
    assert code == 0 and err == ""
    assert all(len(line) <= 80 for line in out.splitlines()), out
    assert re.search(r"^model/weight\s+float32\s+\[3,4\]\s+48 B\s+0$", out, re.M), out
    assert re.search(r"^model/bias\s+float32\s+\[3\]\s+12 B\s+0$", out, re.M), out
    assert '  meta/name = "x"' in out.splitlines() and "  meta/lr = 0.01" in out.splitlines()
    assert "metrics: acc=0.7 val_loss=0.3" in out
    code, out, _ = run(capsys, "inspect", url, "--step", "20", "--json")
    doc = json.loads(out)
    assert doc["kind"] == "checkpoint" and doc["step"] == 20 and doc["epoch"] == 1
    (file,) = doc["files"]
    assert doc["tensors"][1] == {
        "name": "model/weight", "dtype": "float32", "shape": [3, 4], "bytes": 48,
        "files": [file["name"]], "chunks": 1,
    }
    assert doc["state"]["meta"] == {"name": "x", "lr": 0.01}


def test_inspect_step_of_incomplete_leftover_is_one_line_error(url, capsys):
    write(url, {10: 0.5})
    leftover(url, 20)
    code, out, err = run(capsys, "inspect", url, "--step", "20")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no committed checkpoint for step 20" in err
    assert "Committed steps: [10]" in err


# ---------------------------------------------------------------- prune


def test_prune_dry_run_then_real_matches_the_manager(url, capsys):
    write(url)
    leftover(url, 50)
    policy = ["--keep-last", "1", "--keep-best", "1", "--metric", "val_loss"]
    expected = CheckpointManager(url, keep_last=1, keep_best=1, metric="val_loss").prune(dry_run=True, all_runs=True)
    assert expected == [10, 30, 50]
    freed = sum(fsspec.core.url_to_fs(url)[0].du(os.path.dirname(shard(url, s))) for s in (10, 30))

    code, out, err = run(capsys, "prune", url, *policy, "--dry-run")
    assert code == 0 and err == ""
    assert out.splitlines() == [
        "policy: keeping the 1 newest and the 1 best by val_loss (min)",
        f"would delete step 10 (committed, {size(freed // 2)}, 2 files)",
        f"would delete step 30 (committed, {size(freed // 2)}, 2 files)",
        f"would free {size(freed)} in 2 checkpoints; kept steps: 20, 40, 50",
        "kept incomplete steps 50; --incomplete deletes them (when no job writes here)",
    ]
    assert step_dirs(url) == [10, 20, 30, 40, 50]

    code, out, _ = run(capsys, "prune", url, *policy)
    assert code == 0 and "deleted step 10 " in out and "deleted step 30 " in out
    assert step_dirs(url) == [20, 40, 50]
    assert CheckpointManager(url).steps() == [20, 40]

    code, out, _ = run(capsys, "prune", url, "--incomplete")
    assert code == 0 and out.splitlines()[1] == "deleted step 50 (incomplete, 100 B, 1 file)"
    assert step_dirs(url) == [20, 40]


def test_prune_never_deletes_the_latest_even_when_it_is_worst(url, capsys):
    write(url, {10: 0.1, 20: 0.2, 30: 0.9})
    code, out, _ = run(capsys, "prune", url, "--keep-best", "1", "--metric", "val_loss")
    assert code == 0
    assert CheckpointManager(url).steps() == [10, 30]


def test_prune_refuses_unknown_metric_listing_those_that_exist(url, capsys):
    write(url)
    code, out, err = run(capsys, "prune", url, "--keep-best", "1", "--metric", "loss")
    assert code == 2 and out == ""
    assert err == (
        f"elastic-ckpt: error: metric 'loss' is not recorded by any checkpoint in {url}; "
        "metrics that exist: acc, val_loss\n"
    )
    assert step_dirs(url) == [10, 20, 30, 40]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "prune needs --keep-last N, --keep-best K --metric NAME, or --incomplete"),
        (["--keep-best", "2"], "--keep-best K and --metric NAME go together; pass both or neither"),
        (["--keep-last", "0"], "keep_last=0 must be at least 1"),
    ],
)
def test_prune_argument_errors(tmp_path, capsys, args, message):
    url = str(tmp_path / "ckpt")
    write(url, {10: 0.5, 20: 0.4})
    code, out, err = run(capsys, "prune", url, *args)
    assert code == 2 and out == ""
    assert err.startswith(f"elastic-ckpt: error: {message}") and err.count("\n") == 1
    assert step_dirs(url) == [10, 20]


# ---------------------------------------------------------------- verify


def test_verify_names_the_file_with_a_flipped_byte(url, capsys):
    write(url, {10: 0.5, 20: 0.4, 30: 0.3})
    leftover(url, 40)
    code, out, err = run(capsys, "verify", url)
    assert code == 0 and err == ""
    path = flip_byte(url, 20)
    code, out, err = run(capsys, "verify", url)
    assert code == 1
    assert out.splitlines() == [
        f"step 10: ok (1 file, {size(fsspec.core.url_to_fs(url)[0].size(shard(url, 10)))})",
        f"step 30: ok (1 file, {size(fsspec.core.url_to_fs(url)[0].size(shard(url, 30)))})",
        "step 40: incomplete (no manifest), nothing to verify",
    ]
    (line,) = err.splitlines()
    assert line.startswith(f"step 20: BAD shard file {path}: chunk 'model/") and "has checksum crc32:" in line
    assert main(["verify", url, "--step", "30"]) == 0
    assert main(["verify", url, "--step", "20"]) == 1
    capsys.readouterr()
    code, out, _ = run(capsys, "inspect", url, "--verify")
    assert code == 0 and rows(out)[20][8] == "corrupt" and rows(out)[30][8] == "committed"
    flip_byte(url, 30)  # now the newest is damaged too: load() would resume from step 10
    code, out, _ = run(capsys, "inspect", url, "--verify", "--json")
    doc = json.loads(out)
    assert doc["latest"] == 10 and [c["status"] for c in doc["checkpoints"]] == [
        "committed", "corrupt", "corrupt", "incomplete"
    ]
    assert doc["checkpoints"][1]["error"].startswith(f"shard file {path}: chunk ")


def test_verify_progress_bar_is_forced_or_off(tmp_path, capsys):
    url = str(tmp_path / "ckpt")
    write(url, {10: 0.5})
    code, _, err = run(capsys, "verify", url, "--progress", "always")
    assert code == 0 and "\rstep 10 [" in err and "100%" in err
    assert all(len(part) <= 80 for part in err.split("\r"))
    code, _, err = run(capsys, "verify", url)  # auto: not a terminal
    assert code == 0 and err == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_auto_only_on_a_terminal_for_large_checkpoints():
    assert progress_bar.wanted(Terminal(), progress_bar.LARGE_BYTES, "auto")
    assert not progress_bar.wanted(Terminal(), progress_bar.LARGE_BYTES - 1, "auto")
    assert not progress_bar.wanted(io.StringIO(), progress_bar.LARGE_BYTES, "auto")
    assert not progress_bar.wanted(Terminal(), progress_bar.LARGE_BYTES, "never")
    bar = progress_bar.ProgressBar(stream := Terminal(), 4 << 20, "step 7")
    bar.advance(1 << 20)
    bar.advance(3 << 20)
    bar.close()
    frames = stream.getvalue().split("\r")[1:]
    assert frames[0].endswith(" 25%  1.0 MiB/4.0 MiB") and frames[1].endswith("100%  4.0 MiB/4.0 MiB")
    assert all(len(f) <= 79 for f in frames) and frames[-1] == ""


# ---------------------------------------------------------------- errors


def test_errors_are_one_clear_line(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert run(capsys, "inspect", missing) == (
        2, "", f"elastic-ckpt: error: {missing} does not exist; pass the checkpoint directory given "
        "to CheckpointManager or elastic-run --checkpoint-dir\n",
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hi")
    code, _, err = run(capsys, "verify", str(other))
    assert code == 2 and err.startswith(
        f"elastic-ckpt: error: {other} is not a checkpoint root: no step_<12 digits> directories "
        "in it (it holds notes.txt)"
    )
    url = str(tmp_path / "ckpt")
    write(url, {10: 0.5})
    step_dir = os.path.dirname(shard(url, 10))
    code, _, err = run(capsys, "prune", step_dir, "--keep-last", "1")
    assert code == 2 and err == (
        f"elastic-ckpt: error: {step_dir} is one step directory, not a checkpoint root; pass its parent {url}\n"
    )
    code, _, err = run(capsys, "inspect", shard(url, 10))
    assert code == 2 and "is a file, not a checkpoint root" in err
    code, _, err = run(capsys, "inspect", url, "--storage-option", "novalue")
    assert code == 2 and "'novalue' is not key=value" in err


def test_manifest_path_escaping_the_root_is_refused(url, tmp_path, capsys):
    write(url, {10: 0.5, 20: 0.4})
    fs, root = fsspec.core.url_to_fs(url)
    manifest_path = f"{root}/step_{20:012d}/manifest.json"
    manifest = json.loads(fs.cat_file(manifest_path))
    manifest["files"][0]["path"] = "../../../etc/passwd"
    fs.pipe_file(manifest_path, json.dumps(manifest).encode())
    dest = str(tmp_path / "out.safetensors")
    for argv in (["inspect", url, "--step", "20"], ["export", url, "--step", "20", "--to", dest]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and err.count("\n") == 1, (argv, err)
        assert err.startswith("elastic-ckpt: error: ")
        assert "file path '../../../etc/passwd' is not a bare file name" in err
    assert not os.path.exists(dest)
    for argv in (["verify", url, "--step", "20"], ["verify", url]):
        code, out, err = run(capsys, *argv)
        (line,) = err.splitlines()
        assert code == 1 and line.startswith("step 20: BAD ") and "'../../../etc/passwd' is not a bare" in line
    assert out.splitlines() == ["step 10: ok (1 file, 236 B)"]
    code, out, _ = run(capsys, "inspect", url)
    assert rows(out)[20][8:] == ["corrupt", "-"] and rows(out)[10][0] == "L"
    code, out, _ = run(capsys, "prune", url, "--keep-last", "1")
    assert code == 0 and CheckpointManager(url).steps() == [10, 20]  # never deletes what it cannot read


class TokenFileSystem(LocalFileSystem):
    """Local files that list only for the right `token` storage option, like a store with credentials."""

    protocol = "tokenfile"

    def __init__(self, token: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.token = token

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("tokenfile://"))

    def ls(self, path, detail=False, **kwargs):
        if self.token != "s3cret":
            raise PermissionError(errno.EACCES, "wrong token", path)
        return super().ls(path, detail=detail, **kwargs)


def test_storage_options_reach_the_filesystem(tmp_path, capsys):
    fsspec.register_implementation("tokenfile", TokenFileSystem, clobber=True)
    path = str(tmp_path / "ckpt")
    write(path, {10: 0.5})
    url = f"tokenfile://{path}"
    code, _, err = run(capsys, "inspect", url, "--storage-option", "token=wrong")
    assert code == 2 and err.startswith(f"elastic-ckpt: error: permission denied reading {url} (wrong token)")
    code, out, err = run(capsys, "inspect", url, "--storage-option", "token=s3cret", "--json")
    assert code == 0 and [c["step"] for c in json.loads(out)["checkpoints"]] == [10]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("anon=true", ("anon", True)),
        ('client_kwargs={"endpoint_url": "http://127.0.0.1:5000"}',
         ("client_kwargs", {"endpoint_url": "http://127.0.0.1:5000"})),
        ("region=eu-west-1", ("region", "eu-west-1")),
        ("key=a=b", ("key", "a=b")),
    ],
)
def test_storage_option_values_are_json_when_they_parse(text, expected):
    assert parse_storage_option(text) == expected


# ---------------------------------------------------------------- real processes


def python_m(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "checkpoint", *args], env=child_env(), capture_output=True, text=True,
        timeout=240, **kwargs,
    )


def test_python_m_checkpoint_in_a_subprocess(tmp_path):
    url = str(tmp_path / "ckpt")
    write(url)
    proc = python_m("inspect", url, "--metric", "val_loss")
    assert proc.returncode == 0 and proc.stderr == ""
    assert all(len(line) <= 80 for line in proc.stdout.splitlines())
    assert rows(proc.stdout)[40][0] == "L" and rows(proc.stdout)[20][0] == "B"


class ModeBitsFileSystem(LocalFileSystem):
    """Local files with the read permission bits enforced for root too (the kernel lets root
    read anything, and these tests may run as root)."""

    protocol = "modebits"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("modebits://"))

    def ls(self, path, detail=False, **kwargs):
        path = self._strip_protocol(path)
        if not os.stat(path).st_mode & stat.S_IRUSR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return super().ls(path, detail=detail, **kwargs)


def test_permission_denied_is_one_line(tmp_path, capsys):
    path = str(tmp_path / "ckpt")
    write(path, {10: 0.5})
    url = path
    if os.geteuid() == 0:
        fsspec.register_implementation("modebits", ModeBitsFileSystem, clobber=True)
        url = f"modebits://{path}"
    os.chmod(path, 0o000)
    try:
        code, out, err = run(capsys, "inspect", url)
    finally:
        os.chmod(path, 0o755)
    assert code == 2 and out == ""
    assert err == (
        f"elastic-ckpt: error: permission denied reading {url} (Permission denied); check its "
        "permissions or credentials (--storage-option) and run as a user who can read it\n"
    )


# ---------------------------------------------------------------- export / import

SHARDED_WRITER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from checkpoint import CheckpointManager
    from checkpoint.cli import progress_bar
    dist.init_process_group("gloo")
    big = torch.arange(1024 * 1024, dtype=torch.float32).reshape(1024, 1024)
    with CheckpointManager(sys.argv[1], async_write=False) as ckpt:
        ckpt.save(7, {"w": big, "b": torch.ones(3, dtype=torch.int64), "n": 5}, {"loss": 1.5})
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> str:
    """A checkpoint written by 2 ranks: "w" is cut into row blocks spread over 2 files."""
    url = str(tmp_path_factory.mktemp("sharded") / "ckpt")
    with socket_port() as port:
        env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    procs = [
        subprocess.Popen([sys.executable, "-c", SHARDED_WRITER, url], env=dict(env, RANK=str(r)), cwd=REPO,
                         stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    return url


class socket_port:
    """A free TCP port on loopback (released on exit, for the workers to bind)."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return self._sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


def test_export_consolidates_a_sharded_checkpoint(sharded, tmp_path, capsys):
    code, out, _ = run(capsys, "inspect", sharded, "--step", "7", "--json")
    doc = json.loads(out)
    (w,) = [t for t in doc["tensors"] if t["name"] == "w"]
    assert doc["world_size"] == 2 and len(doc["files"]) == 2 and len(w["files"]) == 2 and w["chunks"] == 4
    dest = str(tmp_path / "full.safetensors")
    code, out, err = run(capsys, "export", sharded, "--step", "7", "--to", dest)
    assert code == 0 and err == "" and out == f"exported step 7: 2 tensors, {size(4 * 2**20 + 24)} to {dest}\n"
    loaded = load_file(dest)  # the plain safetensors library, no elastic code
    assert torch.equal(loaded["w"], torch.arange(1024 * 1024, dtype=torch.float32).reshape(1024, 1024))
    assert torch.equal(loaded["b"], torch.ones(3, dtype=torch.int64))
    code, _, err = run(capsys, "export", sharded, "--step", "7", "--to", dest)
    assert code == 2 and err == f"elastic-ckpt: error: {dest} already exists; pass --force to overwrite it or choose another --to\n"

    back = f"memory://cli-{uuid.uuid4().hex}"
    code, out, _ = run(capsys, "import", dest, back, "--step", "3")
    assert code == 0 and out == f"imported {dest}: 2 tensors as committed step 3 of {back}\n"
    state = {"w": torch.zeros(1024, 1024), "b": torch.zeros(3, dtype=torch.int64), "n": None}
    ckpt = CheckpointManager(back)
    assert ckpt.load(state) == 3 and ckpt.manifest(3).metrics == {"loss": 1.5}
    assert torch.equal(state["w"], loaded["w"]) and state["n"] == 5
    assert run(capsys, "verify", back)[0] == 0
