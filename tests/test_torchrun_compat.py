"""torchrun's own launcher scenarios (pytorch's test/distributed/launcher/run_test.py), run
against `elastic-run` with torchrun's command lines: real processes, a real etcd, real signals.

The worker (tests/scripts/touch_rank.py) records its rank's view and imports no torch, so each
launch takes about a second. PET_WARM_POOL=0 keeps the command lines torchrun's own while
sparing the warm pool's torch imports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from elastic.host.net import free_port
from elastic.launcher.cli import build_parser, main
from elastic.launcher.node_slot import NodeSlot
from elastic.launcher.numa_binding import bind_process
from helpers import SCRIPTS, alive, child_env, wait_for_files, wait_gone

TOUCH = os.path.join(SCRIPTS, "touch_rank.py")
TOUCH_SH = os.path.join(SCRIPTS, "touch_rank.sh")


@pytest.fixture(autouse=True)
def own_tmpdir(tmp_path_factory, monkeypatch):
    """The agents' lock files (node slots, the c10d etcd's port) and etcd data stay in the test's tree."""
    monkeypatch.setenv("TMPDIR", str(tmp_path_factory.mktemp("agent-tmp")))


def launch(*args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "elastic", *args], env=child_env(**{"PET_WARM_POOL": "0", **env}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(*args: str, timeout: float = 60, **env: str) -> tuple[int, str]:
    proc = launch(*args, **env)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def views(outdir) -> dict[int, dict]:
    return {int(p.stem): json.loads(p.read_text()) for p in outdir.glob("*.json")}


def assert_world(outdir, world: int) -> dict[int, dict]:
    found = views(outdir)
    assert sorted(found) == list(range(world)), found
    assert {v["WORLD_SIZE"] for v in found.values()} == {str(world)}
    return found


def test_every_option_of_torchruns_own_parser_is_known():
    from torch.distributed.run import get_args_parser  # noqa: PLC0415  (torch only for this test)

    theirs = {option for action in get_args_parser()._actions for option in action.option_strings}
    ours = {option for action in build_parser()._actions for option in action.option_strings}
    assert len(theirs) > 50 and theirs <= ours, sorted(theirs - ours)


def test_python_script_on_an_etcd_backend(etcd_server, run_id, tmp_path):
    code, err = run("--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=etcd", f"--rdzv-endpoint={etcd_server.endpoint}",
                    f"--rdzv-id={run_id}", "--monitor-interval=0.1", "--start-method=spawn", TOUCH, str(tmp_path))
    assert code == 0, err
    found = assert_world(tmp_path, 2)
    assert found[1]["LOCAL_RANK"] == "1" and found[1]["TORCHELASTIC_RUN_ID"] == run_id
    assert found[0]["argv"] == [str(tmp_path)] and "note:" not in err  # spawn is torchrun's default


def test_static_master_without_etcd_gives_torchrun_environment(tmp_path):
    port = free_port()
    code, err = run("--nnodes", "1", "--nproc_per_node", "2", "--node_rank", "0", "--master_addr", "localhost",
                    "--master_port", str(port), "--monitor-interval", "0.1", "--start-method", "spawn",
                    "--role", "trainer", TOUCH, str(tmp_path))
    assert code == 0, err
    found = assert_world(tmp_path, 2)
    assert {(v["MASTER_ADDR"], v["MASTER_PORT"]) for v in found.values()} == {("localhost", str(port))}
    assert found[1]["GROUP_RANK"] == "0" and found[1]["ROLE_NAME"] == "trainer"
    assert found[1]["TORCHELASTIC_RESTART_COUNT"] == "0" and found[1]["LOCAL_WORLD_SIZE"] == "2"


def test_static_master_two_nodes_restart_together_after_a_failure(tmp_path):
    """Two static agents (node ranks 0 and 1) on one host. Node 1's worker dies; node 0 learns
    it only as its own worker's all-reduce fails; both restart their groups (no etcd), which
    form one process group again on the same master port."""
    port = free_port()
    agents = [launch("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(r), "--master-addr", "127.0.0.1",
                     "--master-port", str(port), "--max-restarts", "1", os.path.join(SCRIPTS, "static_peer.py"),
                     str(tmp_path)) for r in (0, 1)]
    errs = [a.communicate(timeout=90)[1] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], errs
    assert "rank 1 exit code 3; restarting" in errs[1] and "rank 0 raised" in errs[0]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"restart1-rank{rank}.json").read_text())
        assert seen == {"world": 2, "sum": 2.0, "port": str(port)}
    assert not (tmp_path / "restart0-rank0.json").exists() and not (tmp_path / "restart0-rank1.json").exists()


def test_no_python_shell_script(tmp_path):
    code, err = run("--standalone", "--nproc-per-node", "2", "--no-python", TOUCH_SH, str(tmp_path))
    assert code == 0, err
    assert_world(tmp_path, 2)


def test_pet_variables_of_a_kubeflow_pod_need_no_flags(tmp_path):
    """PyTorchJob's operator sets these; c10d's endpoint host (this one) serves the etcd."""
    rdzv_port = free_port()
    code, err = run(TOUCH, str(tmp_path), PET_NNODES="1", PET_NPROC_PER_NODE="2", PET_RDZV_BACKEND="c10d",
                    PET_RDZV_ENDPOINT=f"127.0.0.1:{rdzv_port}", PET_RDZV_ID="pytorchjob-1",
                    PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(free_port()), PET_NODE_RANK="0")
    assert code == 0, err
    found = assert_world(tmp_path, 2)
    assert found[0]["TORCHELASTIC_RUN_ID"] == "pytorchjob-1"
    assert "--master-addr, --master-port, --node-rank only apply to the static rendezvous" in err
    with pytest.raises(OSError):  # the etcd served for the job went with its agent
        socket.create_connection(("127.0.0.1", rdzv_port), timeout=1).close()


@pytest.mark.parametrize("nproc", ["auto", "3"])
def test_nproc_auto_and_number(nproc, tmp_path):
    code, err = run("--nnodes=1", f"--nproc-per-node={nproc}", "--monitor-interval=0.1", TOUCH, str(tmp_path))
    assert code == 0, err
    assert_world(tmp_path, os.cpu_count() if nproc == "auto" else 3)  # no GPU here: auto is one per CPU


def test_nnodes_1_2_with_one_agent(run_id, tmp_path):
    code, err = run("--nnodes=1:2", "--nproc-per-node=2", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint=localhost:{free_port()}", f"--rdzv-id={run_id}",
                    "--rdzv-conf=last_call_timeout=1,read_timeout=60", TOUCH, str(tmp_path))
    assert code == 0, err
    assert_world(tmp_path, 2)


def test_nnodes_1_2_with_two_agents_on_one_host_and_no_node_id(run_id, tmp_path):
    """torchrun's test starts both agents with the same line: each needs its own identity, and
    both join one round (MAX reached: sealed at once), served by one agent's etcd."""
    args = ("--nnodes=1:2", "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            f"--rdzv-id={run_id}", "--rdzv-conf=last_call_timeout=20", TOUCH, str(tmp_path))
    agents = [launch(*args), launch(*args)]
    errs = [a.communicate(timeout=90)[1] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], errs
    found = assert_world(tmp_path, 4)
    host = socket.gethostname()
    assert {v["ELASTIC_NODE_ID"] for v in found.values()} == {host, f"{host}-slot1"}


def test_node_slot_is_freed_when_its_agent_dies_and_taken_again(tmp_path):
    claim = ("from elastic.launcher.node_slot import NodeSlot; import signal; "
             f"s = NodeSlot('r', lock_dir={str(tmp_path)!r}); print(s.node_id, flush=True); signal.pause()")
    holder = subprocess.Popen([sys.executable, "-c", claim], env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == socket.gethostname()
        second = NodeSlot("r", lock_dir=str(tmp_path))
        assert second.node_id == f"{socket.gethostname()}-slot1"
        assert NodeSlot("other-run", lock_dir=str(tmp_path)).slot == 0  # slots are per run
    finally:
        holder.kill()
        holder.wait()
    restarted = NodeSlot("r", lock_dir=str(tmp_path))  # the SIGKILLed agent's slot, and id, again
    assert restarted.node_id == socket.gethostname()
    second.close()
    restarted.close()


def test_standalone(tmp_path):
    code, err = run("--standalone", "--nproc-per-node=2", TOUCH, str(tmp_path))
    assert code == 0, err
    assert_world(tmp_path, 2)


def test_run_path_runs_the_script_as_main(tmp_path):
    code, err = run("--run-path", "--no-python", "--nproc-per-node=1", "--standalone", TOUCH, str(tmp_path))
    assert code == 0, err
    assert assert_world(tmp_path, 1)[0]["name"] == "__main__"  # with Python: --run-path wins over --no-python


@pytest.mark.parametrize("restarts", [0, 1])
def test_failing_worker_with_max_restarts(restarts, tmp_path):
    """Static rendezvous: the local group restarts on the same master port, up to --max-restarts."""
    code, err = run("--nnodes=1", "--nproc-per-node=2", "--master-port", str(free_port()),
                    f"--max-restarts={restarts}", TOUCH, str(tmp_path), "fail")
    assert code == 1
    assert "FAILED" in err and "exit code 3" in err and f"restarts exhausted ({restarts} allowed)" in err
    # The first rank to fail wrote its view; its peer may have been killed before writing one.
    assert str(restarts) in {v["TORCHELASTIC_RESTART_COUNT"] for v in views(tmp_path).values()}


def test_every_torchrun_flag_is_accepted_and_the_inert_ones_say_so_once(tmp_path):
    code, err = run("--nnodes", "1:1", "--nproc-per-node", "2", "--master-port", str(free_port()),
                    "--start-method", "fork", "--event-log-handler", "console", "--role", "r", "--logs-specs", "x",
                    "--duplicate-stdout-filters", "a,b", "--duplicate-stderr-filters", "c", "--shutdown-timeout", "4",
                    "--signals-to-handle", "SIGTERM,SIGUSR2", "--virtual-local-rank", "--local-addr", "127.0.0.1",
                    "--log-dir", str(tmp_path / "logs"), "-r", "0", "-t", "3", "--local-ranks-filter", "0",
                    "--monitor-interval", "0.1", "--max-restarts", "0", "--rdzv-conf", "join_timeout=30",
                    TOUCH, str(tmp_path), CUDA_VISIBLE_DEVICES="5,7")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("elastic-run: note:")]
    assert len(notes) == 5 and all(err.count(n) == 1 for n in notes), notes
    for flag in ("--start-method", "--event-log-handler", "--logs-specs", "--duplicate-stdout-filters",
                 "--duplicate-stderr-filters"):
        assert any(n.startswith(f"elastic-run: note: {flag}:") for n in notes), flag
    found = assert_world(tmp_path, 2)
    assert [(v["LOCAL_RANK"], v["CUDA_VISIBLE_DEVICES"]) for _, v in sorted(found.items())] == [("0", "5"), ("0", "7")]


def test_bind_process_binds_every_thread_of_a_worker():
    """--numa-binding's mechanics (which CPUs is torch's answer, and needs GPUs): a process with
    a second thread running has both threads bound, and a thread it starts later inherits it."""
    code = ("import threading, os, sys; threading.Thread(target=threading.Event().wait, daemon=True).start(); "
            "print(len(os.listdir('/proc/self/task')), flush=True); sys.stdin.readline(); "
            "t = threading.Thread(target=lambda: print(sorted(os.sched_getaffinity(0)), flush=True)); t.start(); t.join()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "2"
        bind_process(proc.pid, frozenset({0}))
        tids = os.listdir(f"/proc/{proc.pid}/task")
        assert len(tids) == 2 and all(os.sched_getaffinity(int(t)) == {0} for t in tids)
        out, _ = proc.communicate("go\n", timeout=10)
        assert out.strip() == "[0]"
    finally:
        proc.kill()
        proc.wait()


def test_a_signal_to_handle_stops_the_workers(tmp_path):
    """--signals-to-handle SIGUSR2 (Slurm's warning): the job stops as on SIGTERM, no orphans."""
    proc = launch("--nproc-per-node", "2", "--master-port", str(free_port()), "--signals-to-handle", "SIGTERM,SIGUSR2",
                  "--shutdown-timeout", "2", TOUCH, str(tmp_path), "hold")
    wait_for_files([str(tmp_path / "0.json"), str(tmp_path / "1.json")], proc=proc)
    workers = {v["pid"] for v in views(tmp_path).values()}
    assert all(alive(p) for p in workers)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGUSR2, err
    assert not wait_gone(workers) and not any(alive(p) for p in workers)


@pytest.mark.parametrize(("args", "message"), [
    (["--standalone", "--master-addr", "10.0.0.1", TOUCH], "--standalone and --master-addr contradict"),
    (["--grace", "3", "--shutdown-timeout", "4", "--standalone", TOUCH], "--grace 3 and --shutdown-timeout 4"),
    (["--nnodes", "1:2", "--master-port", "29500", TOUCH], "the static rendezvous (--master-addr/--master-port) has a fixed size"),
    (["--nnodes", "2", "--node-rank", "2", TOUCH], "--node-rank 2 must be in 0..1"),
    (["--nproc-per-node", "unknown", "--standalone", TOUCH], "--nproc-per-node 'unknown' must be a number"),
    (["--signals-to-handle", "SIGNOPE", "--standalone", TOUCH], "'SIGNOPE' is not a signal name"),
    (["--numa-binding", "rack", "--standalone", TOUCH], "--numa-binding 'rack' must be one of"),
])
def test_contradictions_and_bad_values_get_one_line(args, message, capsys):
    code = main(list(args))  # in-process: the same checks, without an interpreter start per case
    lines = capsys.readouterr().err.strip().splitlines()
    err = "\n".join(lines)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("elastic-run: error:") and message in lines[0], err
