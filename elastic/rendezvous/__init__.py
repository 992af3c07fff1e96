"""The etcd v3 rendezvous: the protocol as pure decisions, its state in etcd, the executor
that joins rounds, reachability probes, the etcd client and an embedded etcd server.
Used by the launcher; imports neither torch nor the worker side.
"""
