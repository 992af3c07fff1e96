"""The etcd v3 rendezvous: the protocol as pure decisions, its state in etcd (the keys'
layout and transactions, a watched mirror and the reads of it), the executor that joins
rounds and serves the running one, the lease's keep-alive, failure blame, reachability
probes, the etcd client and an embedded etcd server.
Used by the launcher; imports neither torch nor the worker side.
"""
