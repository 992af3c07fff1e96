"""How elastic-run starts a Python worker: `python -m elastic.launcher.bootstrap [-m] TARGET ARGS...`.

It runs the script (or module) exactly as `python TARGET ARGS` would (same sys.argv,
sys.path[0], __main__, exit status, traceback) and then ends the process without the
interpreter's final teardown. Why: a torch.distributed gloo process group that is still
alive when the interpreter tears down aborts the process ("terminate called without an
active exception", SIGABRT) in a good share of runs with torch 2.13, also under torchrun,
and a script that finished its work must not be reported, and restarted, as a crash.
Non-daemon threads are joined and atexit handlers run first, as at a normal exit.

Two more things for the agent: SIGUSR1 dumps every thread's Python stack to stderr (the
agent sends it to a hung rank before killing it; faulthandler writes even while another
thread holds the GIL), and an uncaught exception is also written as JSON to
$ELASTIC_ERROR_FILE (elastic/exchange/error_record.py), so the job's summary can name the error that
ended it and the agent can tell a deterministic failure.

Warm start (`python -m elastic.launcher.bootstrap --warm FD`, see elastic/launcher/warm_pool.py): the process
imports WARM_IMPORTS first, sends one byte on socket FD to say it is ready, then blocks until
the agent writes its assignment there (JSON: the worker's full environment, its working
directory and the argv above) and runs it as a cold worker would; end of file without an
assignment means it is not needed.
"""

from __future__ import annotations

import atexit
import faulthandler
import importlib
import json
import os
import runpy
import signal
import socket
import sys
import threading

from elastic.exchange.error_record import ErrorRecord

WARM_FLAG = "--warm"

# What a warm worker imports before its assignment: torch and the parts of it that a script
# under elastic-run imports anyway (most of a worker's start-up time: torch._dynamo is
# imported by the first DistributedDataParallel(...), FSDP and DTensor by the training loop),
# and this package's worker side. Installed packages only, besides our own: a module that the
# script's directory could shadow (say its own checkpoint.py) is left for the script.
WARM_IMPORTS = ("torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo", "torch.distributed.fsdp",
                "torch.distributed.checkpoint.state_dict", "fsspec.implementations.local", "safetensors.torch",
                "elastic.worker.context", "elastic.worker.train_loop")


def boot_command(*args: str) -> list[str]:
    """The argv that starts this module in a fresh interpreter."""
    return [sys.executable, "-u", "-m", "elastic.launcher.bootstrap", *args]


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


# What the script left behind (its globals, or the exception that ended it), kept alive until
# os._exit: freeing a DDP model or a gloo group while gloo's threads still finish their last
# work deadlocks on the GIL in some runs with torch 2.13 (a destructor joins a thread that
# waits for the GIL), so nothing of the script is destroyed before the process ends.
_left_behind: list[object] = []


def run(argv: list[str]) -> int:
    as_module = bool(argv) and argv[0] == "-m"
    target, args = (argv[1], argv[2:]) if as_module else (argv[0], argv[1:])
    try:
        if as_module:
            sys.argv = [target, *args]
            sys.path[0] = os.getcwd()
            _left_behind.append(runpy.run_module(target, run_name="__main__", alter_sys=True))
        else:
            sys.argv = [target, *args]
            sys.path[0] = os.path.dirname(os.path.abspath(target))
            _left_behind.append(runpy.run_path(target, run_name="__main__"))
        return 0
    except SystemExit as exc:
        _left_behind.append(exc)
        return _exit_code(exc)
    except KeyboardInterrupt as exc:
        _left_behind.append(exc)
        return 130
    except BaseException as exc:  # noqa: BLE001  (reported exactly as the interpreter would)
        _left_behind.append(exc)
        sys.excepthook(*sys.exc_info())
        _write_error_file(exc)
        return 1


def _write_error_file(exc: BaseException) -> None:
    path = os.environ.get("ELASTIC_ERROR_FILE")
    if path:
        ErrorRecord.from_exception(exc).write(path)


def _read_all(channel: socket.socket, into: bytearray) -> None:
    try:
        while chunk := channel.recv(1 << 16):
            into.extend(chunk)
    except ConnectionResetError:
        # The agent closed its end with our ready byte unread (after sending the assignment,
        # which is kept), or died: the end of the message either way, and no traceback.
        pass


def wait_for_assignment(fd: int) -> list[str]:
    """Warm start: import WARM_IMPORTS, say so, then take on the assignment read from `fd`."""
    channel = socket.socket(fileno=fd)
    message = bytearray()
    # Read while importing, so the agent's write never waits for the imports (a full buffer).
    reader = threading.Thread(target=_read_all, args=(channel, message), name="assignment", daemon=True)
    reader.start()
    for name in WARM_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  (the script's own import of it reports the error)
            pass
    try:
        channel.send(b"1")  # ready
    except OSError:
        pass  # the agent already handed us a rank and closed its end
    reader.join()
    channel.close()
    if not message:
        os._exit(0)  # the agent closed the pool
    assignment = json.loads(message)
    os.chdir(assignment["cwd"])
    os.environ.clear()
    os.environ.update(assignment["env"])
    return assignment["argv"]


def main() -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    argv = sys.argv[1:]
    if argv[:1] == [WARM_FLAG]:
        argv = wait_for_assignment(int(argv[1]))
    code = run(argv)
    threading._shutdown()  # what the interpreter does first at exit: join non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # closed or broken pipe: nothing more to say
    os._exit(code)


if __name__ == "__main__":
    main()
