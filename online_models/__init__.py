"""Torch CTR models, the ReLoop2 error-compensation memory, metrics, River baselines, drift detectors and policy.

The ground floor: pure logic only. Nothing here imports Kafka, Ray, Beam or Feast, nor any other
reloop package (``lint-imports`` holds both). The errors every layer raises derive from
:class:`online_models.errors.ReloopError`.
"""
