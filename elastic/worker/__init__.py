"""What runs inside a worker process (imports torch): `elastic.init()`, `TrainLoop`, the
elastic sampler, accumulation planning, random streams and the round fence for commits.
"""
