"""The error record a worker leaves ($ELASTIC_ERROR_FILE) and the agent's "same failure again"
rule built on it (elastic.launcher.failure_rules.failure_signature)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from checkpoint.errors import CheckpointError, StorageError
from elastic.launcher.failure_rules import FailureHistory, deterministic_reason, failure_signature
from elastic.exchange.error_record import ErrorRecord
from helpers import child_env

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="a real ENOSPC comes from /dev/full")


def disk_full(path: str) -> CheckpointError:
    """What a checkpoint save on a full disk raises: a real ENOSPC (writing to /dev/full),
    wrapped as the checkpoint manager wraps it (async save -> storage error -> OSError)."""
    try:
        try:
            with open("/dev/full", "wb", buffering=0) as f:
                f.write(b"x")
        except OSError as exc:
            raise StorageError(f"could not write {path!r}: {exc}", path=path) from exc
    except StorageError as exc:
        try:
            raise CheckpointError(f"async save failed: {exc!r}") from exc
        except CheckpointError as outer:
            return outer
    raise AssertionError("writing to /dev/full succeeded")


def test_record_of_a_full_disk_carries_the_errno_and_the_file(tmp_path):
    record = ErrorRecord.from_exception(disk_full("/ckpt/step_9/rank0-3f9c2a1b7d4e.safetensors"))
    assert record.errno == errno.ENOSPC
    assert record.type == "builtins.OSError"  # the error the system gave, not the wrapper
    assert record.filename == "/ckpt/step_9/rank0-3f9c2a1b7d4e.safetensors"
    assert record.message.startswith("CheckpointError: async save failed: StorageError(")
    assert "No space left on device" in record.message and "Traceback" in record.traceback
    path = str(tmp_path / "error.json")
    record.write(path)
    assert ErrorRecord.read(path) == record


def test_record_without_an_os_error_names_the_raised_type(tmp_path):
    try:
        raise ValueError("bad batch\nsecond line")
    except ValueError as exc:
        record = ErrorRecord.from_exception(exc)
    assert (record.type, record.errno, record.filename) == ("builtins.ValueError", None, None)
    assert record.message == "second line"  # the last line, as the summary shows it


def test_torch_record_format_and_unreadable_files(tmp_path):
    path = tmp_path / "error.json"
    path.write_text(json.dumps({"message": {"message": "RuntimeError: boom\n", "extraInfo": {"timestamp": "12"}}}))
    assert ErrorRecord.read(str(path)) == ErrorRecord("RuntimeError: boom", 12.0)
    path.write_text('{"message": "half written')
    assert ErrorRecord.read(str(path)) is None
    assert ErrorRecord.read(str(tmp_path / "missing.json")) is None


def test_bootstrap_writes_the_record_of_an_uncaught_os_error(tmp_path):
    script = tmp_path / "full.py"
    script.write_text("with open('/dev/full', 'wb', buffering=0) as f:\n    f.write(b'x')\n")
    error_file = tmp_path / "error-rank0.json"
    done = subprocess.run([sys.executable, "-m", "elastic.launcher.bootstrap", str(script)], capture_output=True,
                          env=child_env(ELASTIC_ERROR_FILE=str(error_file)), timeout=60)
    assert done.returncode == 1
    record = ErrorRecord.read(str(error_file))
    assert record is not None and record.errno == errno.ENOSPC and record.filename is None
    assert record.message == "OSError: [Errno 28] No space left on device"


def test_same_os_error_is_the_same_failure_whatever_the_file_rank_or_step():
    a = ErrorRecord.from_exception(disk_full("/ckpt/step_9/rank0-aaaaaaaaaaaa.safetensors"))
    b = ErrorRecord.from_exception(disk_full("/ckpt/step_12/manifest.json"))
    first = failure_signature(a, "rank 0 raised ...", 9, committed=6)
    assert first == failure_signature(b, "rank 1 raised ...", 11, committed=6)
    assert first == failure_signature(b, "rank 1 raised ...", None, committed=6)  # no step reported
    # A newer checkpoint was committed in between: the job made progress, so it is a new fault.
    assert first != failure_signature(b, "rank 1 raised ...", 11, committed=9)
    other = ErrorRecord("OSError: [Errno 13] Permission denied", 0.0, "builtins.PermissionError", errno.EACCES)
    assert first != failure_signature(other, "rank 0 raised ...", 9, committed=6)


def test_other_errors_must_repeat_their_message_at_the_same_step():
    def boom(token: str) -> ErrorRecord:
        return ErrorRecord(f"RuntimeError: boom in /tmp/x-{token}", 0.0, "builtins.RuntimeError")

    first = failure_signature(boom("3f9c2a1b7d4e"), "", 3, committed=0)
    assert first == failure_signature(boom("9e8d7c6b5a41"), "", 3, committed=0)  # random token blanked
    assert first != failure_signature(boom("9e8d7c6b5a41"), "", 4, committed=0)
    assert failure_signature(boom("3f9c2a1b7d4e"), "", None, committed=0) is None
    hang = "rank 1 hung: no step for 4s after step 6"  # no error recorded: the detail counts
    assert failure_signature(None, hang, 6, None) == failure_signature(None, hang, 6, 3)


def test_a_failure_repeats_only_with_the_same_signature_and_not_when_killed():
    history = FailureHistory(limit=2)
    boom = ("message", "RuntimeError: boom", 3)
    assert not history.repeated(boom, killed=False)
    assert history.repeated(boom, killed=False)
    assert not history.repeated(boom, killed=True)  # a signal says nothing about the code
    assert not history.repeated(None, killed=False) and not history.repeated(None, killed=False)


def test_only_a_crash_loop_backs_off():
    history = FailureHistory()
    assert [history.back_off(step_done=False) for _ in range(5)] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert history.back_off(step_done=True) == 0.0  # a step since the restart: it worked
    assert [history.back_off(step_done=False) for _ in range(9)][-1] == 30.0


def test_reason_for_a_full_checkpoint_directory_says_what_to_do():
    record = ErrorRecord.from_exception(disk_full("/data/ckpt/step_9/manifest.json"))
    reason = deterministic_reason("rank 1 raised X", 9, record, "/data/ckpt", 3)
    assert "the checkpoint directory's filesystem is full (ENOSPC)" in reason
    assert "free space or point --checkpoint-dir elsewhere" in reason
    elsewhere = deterministic_reason("rank 1 raised X", 9, record, "/other", 3)
    assert "the filesystem of /data/ckpt/step_9/manifest.json is full (ENOSPC)" in elsewhere
    assert deterministic_reason("rank 1 raised Y", 3, None, None, 3) == (
        "rank 1 raised Y again at step 3; the same-failure rule stopped the job (3 identical failures "
        "in a row; --same-failure-limit): not retrying a deterministic failure")


def test_a_round_of_a_script_without_progress_reports_backs_off_only_if_it_failed_early(tmp_path):
    """Without progress reports (a plain script), how long the round ran decides whether its
    failure is a crash loop; with them, whether a step completed."""
    import time
    import types

    from elastic.exchange.progress import Progress
    from elastic.launcher.hang_watch import HangLimits, ProgressWatch
    from elastic.launcher.recovery import NO_PROGRESS_CRASH_LOOP, _progressed

    path = str(tmp_path / "rank0.progress")
    watch = ProgressWatch({0: path}, HangLimits())
    watch.read()
    assert not watch.reporting()
    ran = types.SimpleNamespace  # the two things _progressed asks of a worker group
    assert not _progressed(ran(progress=watch, started=time.monotonic() - 1.0))
    assert _progressed(ran(progress=watch, started=time.monotonic() - NO_PROGRESS_CRASH_LOOP - 1.0))

    with open(path, "wb") as f:  # a rank that resumed at step 3 and has not completed a step since
        f.write(Progress(step=3, changed_at=time.time(), resumed=3).encode())
    watch.read()
    assert watch.reporting()
    assert not _progressed(ran(progress=watch, started=time.monotonic() - NO_PROGRESS_CRASH_LOOP - 1.0))
