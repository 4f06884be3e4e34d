"""Streams: the event contract, Kafka I/O and the Beam feature jobs (Kafka -> parse/validate -> windowed
features -> Feast + training examples).

Pure feature math lives in :mod:`pipelines.aggregates` (NumPy/Arrow, no Beam),
so the evaluation protocol and the scoring service compute features with the
same code as the job. Runners and services bind only in each job's ``run()``.
"""
