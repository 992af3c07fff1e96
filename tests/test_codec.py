"""The records that cross a process boundary: one JSON codec, tolerant of versions."""

from __future__ import annotations

import json

import pytest

from elastic.exchange.error_record import ErrorRecord
from elastic.exchange.progress import Commit, Progress
from elastic.rendezvous.protocol import FailureClaim, Member, NodeRecord, SealedRound


@pytest.mark.parametrize("record", [
    Member("node-a", "10.0.0.1", 29500, 8, probe_port=4100),
    NodeRecord(failures=3, last_failure=12.5),
    FailureClaim(at=99.25, unreachable=("node-b", "node-c")),
    Progress(7, 1.5, resumed=3, commits=(Commit(5, 1.0, 0.25), Commit(6, 1.2, 0.0)), parked=6),
    ErrorRecord("OSError: [Errno 28] No space left", 3.0, "builtins.OSError", 28, "/ckpt/x", "Traceback ..."),
    SealedRound(4, ("a", "b"), (2, 2), "10.0.0.1", 29500, 1),
    SealedRound(4, ("a", "b", "c"), (2, 1, 4), "10.0.0.1", 29500, 1),
])
def test_round_trip(record):
    assert type(record).from_json(record.to_json()) == record


def test_a_newer_writer_field_is_ignored_and_a_missing_optional_takes_its_default():
    """Agents of two versions share a job during a rolling upgrade."""
    newer = {"node_id": "n", "addr": "h", "port": 1, "nproc": 2, "gpu_model": "H200"}
    assert Member.from_json(json.dumps(newer)) == Member("n", "h", 1, 2, probe_port=0)
    assert Progress.from_json(b'{"step": 4, "changed_at": 2.0, "skipped": 1}') == Progress(4, 2.0)
    sealed = json.loads(SealedRound(1, ("a",), (8,), "h", 2, 0).to_json()) | {"zone": "eu"}
    assert SealedRound.from_json(json.dumps(sealed)).node_ids == ("a",)


@pytest.mark.parametrize("raw", ["[]", '"x"', '{"addr": "h", "port": 1, "nproc": 2}', "{"])
def test_not_a_record_is_a_value_error(raw):
    with pytest.raises(ValueError):
        Member.from_json(raw)


def test_error_file_from_another_version_is_read(tmp_path):
    path = tmp_path / "error.json"
    path.write_text(json.dumps({"message": "RuntimeError: boom", "time": 1.0, "hostname": "n1"}))
    assert ErrorRecord.read(str(path)) == ErrorRecord("RuntimeError: boom", 1.0)
