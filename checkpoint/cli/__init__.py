"""`elastic-ckpt` (also `python -m checkpoint`): the commands, the catalogue of a checkpoint
root, export/import, and the tables and progress bars they print.
"""
