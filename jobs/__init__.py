"""Ray jobs and long-running services: incremental trainer, retrain, evaluate, serve, drift monitor.

Each is runnable as ``python -m jobs.<name>`` locally (``ray.init()``) or on a
cluster through ``ray job submit --working-dir . -- python -m jobs.<name> ...``.
"""
