"""What the agent and its workers exchange, through files and the environment: the progress
record, the control file, the error record and the ELASTIC_* variable names. Torch-free and
imported by both sides, so that neither side imports the other.
"""
