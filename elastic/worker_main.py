"""How elastic-run starts a Python worker: `python -m elastic.worker_main [-m] TARGET ARGS...`.

It runs the script (or module) exactly as `python TARGET ARGS` would (same sys.argv,
sys.path[0], __main__, exit status, traceback) and then ends the process without the
interpreter's final teardown. Why: a torch.distributed gloo process group that is still
alive when the interpreter tears down aborts the process ("terminate called without an
active exception", SIGABRT) in a good share of runs with torch 2.13, also under torchrun,
and a script that finished its work must not be reported, and restarted, as a crash.
Non-daemon threads are joined and atexit handlers run first, as at a normal exit.
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys
import threading


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def run(argv: list[str]) -> int:
    as_module = bool(argv) and argv[0] == "-m"
    target, args = (argv[1], argv[2:]) if as_module else (argv[0], argv[1:])
    try:
        if as_module:
            sys.argv = [target, *args]
            sys.path[0] = os.getcwd()
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target, *args]
            sys.path[0] = os.path.dirname(os.path.abspath(target))
            runpy.run_path(target, run_name="__main__")
        return 0
    except SystemExit as exc:
        return _exit_code(exc)
    except KeyboardInterrupt:
        return 130
    except BaseException:  # noqa: BLE001  (reported exactly as the interpreter would)
        sys.excepthook(*sys.exc_info())
        return 1


def main() -> None:
    code = run(sys.argv[1:])
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
