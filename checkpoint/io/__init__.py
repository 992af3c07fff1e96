"""Checkpoint bytes on storage: fsspec calls and the commit, safetensors shard files, the
background writer, and verified chunk reads for loading.
"""
