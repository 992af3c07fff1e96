"""The per-node agent behind `elastic-run`: command line, rendezvous rounds, worker processes.

Runs in the launcher process, never inside a worker, and never imports torch (it starts in
milliseconds); it talks to workers only through elastic/exchange (files and environment).
"""
