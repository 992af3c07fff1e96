"""Checkpoint management: sharded safetensors on any fsspec filesystem."""
