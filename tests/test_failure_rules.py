"""Which failures count toward the same-failure rule: faults (transient network errors,
object-store throttling, a peer's death) never do; k identical failures in a row stop the
job (--same-failure-limit), and the final reason names the rule that stopped it."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys

import pytest
from botocore.exceptions import ClientError

from elastic.errors import ConfigError
from elastic.exchange.error_record import ErrorRecord
from elastic.host.net import free_port
from elastic.launcher.cli import build_parser, config_from_args
from elastic.launcher.failure_rules import FailureHistory, failure_signature, fault_kind
from helpers import SCRIPTS, child_env, elastic_run

PROGRESS = os.path.join(SCRIPTS, "progress_worker.py")


def record_of(exc: BaseException) -> ErrorRecord:
    try:
        raise exc
    except BaseException as raised:  # noqa: BLE001  (any exception: it is only recorded)
        return ErrorRecord.from_exception(raised)


def test_connection_reset_at_the_same_step_is_retried_until_the_budget_is_spent(tmp_path):
    # Rank 1 raises ConnectionResetError (errno 104) at step 3 in every attempt: a flaky
    # network, not a bug. Every restart is spent, and the reason names the budget. Two
    # restarts make three identical failures in a row, as many as the default
    # --same-failure-limit (3), and the agent applies that rule before the budget: were the
    # fault counted, the third failure would stop the job as deterministic instead. Workers
    # start cold: a warm spare, started after the first step, would still be importing when
    # the next attempt needs it.
    proc = elastic_run("--standalone", "--nproc-per-node", "2", "--max-restarts", "2", "--no-warm-pool",
                       PROGRESS, str(tmp_path), "reset", "3")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err
    assert "not retrying a deterministic failure" not in err
    assert "the restart budget stopped the job: restarts exhausted (2 allowed)" in err
    assert "restarts: 2" in err


@pytest.mark.parametrize("exc", [
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    OSError(errno.ETIMEDOUT, "Connection timed out"),
    OSError(errno.EHOSTUNREACH, "No route to host"),
    BrokenPipeError(errno.EPIPE, "Broken pipe"),
    TimeoutError("the read timed out"),  # no errno: the type says it
    # What boto3 / s3fs raise when S3 throttles, and GCS's answer to the same.
    ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}}, "PutObject"),
    ClientError({"Error": {"Code": "503", "Message": "Service Unavailable"}}, "UploadPart"),
    RuntimeError("429 Too Many Requests: rateLimitExceeded"),
], ids=lambda e: type(e).__name__)
def test_faults_never_count_as_deterministic(exc):
    error = record_of(exc)
    assert fault_kind(error) is not None
    assert failure_signature(error, "rank 0 raised ...", 3, committed=None) is None
    history = FailureHistory(limit=2)
    assert not any(history.repeated(failure_signature(error, "", 3, None), killed=False) for _ in range(5))


def test_the_error_a_peer_raises_when_another_rank_dies_is_not_deterministic(tmp_path):
    # Two real gloo ranks: rank 1 dies after the first all_reduce; rank 0's next one raises
    # what gloo says then, recorded by the bootstrap as in a job.
    script = tmp_path / "peer.py"
    script.write_text("import os, torch, torch.distributed as dist\n"
                      "dist.init_process_group('gloo')\n"
                      "t = torch.ones(1)\n"
                      "dist.all_reduce(t)\n"
                      "if dist.get_rank() == 1:\n"
                      "    os._exit(1)\n"
                      "dist.all_reduce(t)\n")
    port = str(free_port("127.0.0.1"))
    ranks = [subprocess.Popen([sys.executable, "-m", "elastic.launcher.bootstrap", str(script)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=child_env(ELASTIC_ERROR_FILE=str(tmp_path / f"error{rank}.json"),
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
                                            RANK=str(rank)))
             for rank in (0, 1)]
    assert [p.wait(timeout=120) for p in ranks] == [1, 1]
    error = ErrorRecord.read(str(tmp_path / "error0.json"))
    assert error is not None and error.errno is None  # gloo says it in a RuntimeError's message
    assert fault_kind(error) == "a peer's death", error.message
    assert failure_signature(error, "rank 0 raised ...", 1, committed=None) is None


def test_a_bug_is_not_a_fault():
    for exc in (RuntimeError("boom at step 3"), FileNotFoundError(errno.ENOENT, "No such file", "/data/x"),
                ValueError("bad batch shape (4, 500)")):
        assert fault_kind(record_of(exc)) is None


def test_k_identical_failures_in_a_row_stop_the_job():
    boom, other = ("message", "RuntimeError: boom", 3), ("message", "RuntimeError: other", 3)
    history = FailureHistory(limit=3)
    assert [history.repeated(boom, killed=False) for _ in range(3)] == [False, False, True]
    history = FailureHistory(limit=3)
    for signature, killed in ((boom, False), (boom, False), (other, False), (boom, False), (boom, False)):
        assert not history.repeated(signature, killed=killed)  # a different failure ends the streak
    for signature, killed in ((None, False), (boom, True), (boom, False)):
        assert not history.repeated(signature, killed=killed)  # so does a fault, or a kill
    disabled = FailureHistory(limit=0)
    assert not any(disabled.repeated(boom, killed=False) for _ in range(10))


def test_same_failure_limit_flag(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")

    def config(*flags: str):
        return config_from_args(build_parser().parse_args([*flags, str(script)]))

    assert config().same_failure_limit == 3
    assert config("--same-failure-limit", "0").same_failure_limit == 0
    assert config("--same_failure_limit", "5").same_failure_limit == 5
    for bad, says in (("1", "must be 0 (off) or >= 2"), ("-2", "must be 0 (off) or >= 2"),
                      ("x", "must be a whole number")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            config("--same-failure-limit", bad)
