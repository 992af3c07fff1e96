"""The etcd password: taken from a file or the environment, never from argv; it reaches no
worker's argv or environment (their round fence reads a file only the user can read), and no
launcher-only setting leaks into workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import SCRIPTS, child_env, elastic_run
from test_etcd_security import auth_etcd  # noqa: F401  (the fixture: an etcd with user root, password s3cret)

PROBE = os.path.join(SCRIPTS, "fence_probe.py")
SECRET = "s3cret"


def _run(endpoint: str, conf: str, outdir, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "elastic", "--rdzv-endpoint", endpoint, "--rdzv-conf",
         f"user=root,last_call_timeout=0.5{conf}", "--nproc-per-node", "2", PROBE, str(outdir)],
        env=child_env(**env), capture_output=True, text=True, check=False, timeout=120)


@pytest.mark.parametrize("source", ["file", "environment"])
def test_the_password_reaches_etcd_and_the_fence_but_no_argv_or_worker_environment(auth_etcd, tmp_path, source):  # noqa: F811
    if source == "file":
        secret_file = tmp_path / "etcd-password"
        secret_file.write_text(SECRET + "\n")
        done = _run(auth_etcd.endpoint, f",password_file={secret_file}", tmp_path)
    else:
        done = _run(auth_etcd.endpoint, "", tmp_path, ELASTIC_RDZV_PASSWORD=SECRET)
    assert done.returncode == 0, done.stderr
    for rank in range(2):
        probe = json.loads((tmp_path / f"probe-rank{rank}.json").read_text())
        assert probe["fence"] == "ok"
        assert not [a for a in probe["argv"] if SECRET in a], probe["argv"]
        assert not {k for k, v in probe["env"].items() if SECRET in v}, "the password is in a worker's environment"
        assert "GRPC_ENABLE_FORK_SUPPORT" not in probe["env"]
        assert probe["password_file_mode"] == 0o600


def test_a_password_in_argv_is_refused_with_what_to_do_instead():
    proc = elastic_run("--rdzv-endpoint", "127.0.0.1:2379", "--rdzv-conf", f"user=root,password={SECRET}",
                       os.path.join(SCRIPTS, "plain_ddp.py"))
    _, err = proc.communicate(timeout=30)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, err
    assert "password_file=PATH" in lines[0] and "$ELASTIC_RDZV_PASSWORD" in lines[0], err


def test_a_user_without_a_password_says_where_to_put_it():
    proc = elastic_run("--rdzv-endpoint", "127.0.0.1:2379", "--rdzv-conf", "user=root",
                       os.path.join(SCRIPTS, "plain_ddp.py"))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "needs the etcd password" in err, err
