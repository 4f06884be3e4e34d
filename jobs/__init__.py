"""Ray jobs and long-running services: incremental trainer, retrain, scoring and serving, drift monitor,
alert delivery, the model registry.

Each is runnable as ``python -m jobs.<name>`` locally (``ray.init()``) or on a
cluster through ``ray job submit --working-dir . -- python -m jobs.<name> ...``.
"""
