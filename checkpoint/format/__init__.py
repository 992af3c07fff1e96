"""The checkpoint format, with no I/O: the manifest schema, the state tree (user state <->
JSON skeleton + tensors) and the write/read plans at any world size. Imports no fsspec.
"""
