"""Torch CTR models, the ReLoop2 error-compensation memory, River baselines and streaming metrics.

Pure logic only: nothing here imports Kafka, Ray or Beam.
"""
