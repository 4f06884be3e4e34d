"""Beam's own ``ReadFromKafka`` (Java KafkaIO, cross-language) on the local Flink, without Docker.

Python 2.73 expands ``ReadFromKafka`` through the Java expansion service of the same release
(``reloop up --with expansion``); the Flink job server runs the Java part in a PROCESS environment
(``infra/flink/java-harness-boot`` starts the Java SDK harness) and the Python part in LOOPBACK workers.
"""

from __future__ import annotations

import json

import pytest

from tests.flink_support import flink_args, flink_job_endpoint, kafka_expansion_service  # noqa: F401

pytestmark = pytest.mark.integration


def test_read_from_kafka_on_local_flink(
    kafka_config,
    unique_topic,
    flink_job_endpoint,  # noqa: F811
    kafka_expansion_service,
):  # noqa: F811
    import apache_beam as beam
    from apache_beam.io.kafka import ReadFromKafka
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to

    from reloop.datasets import load_dataset
    from reloop.replay import replay_table

    table = load_dataset("movielens-100k", limit=300)
    replay_table(table, kafka_config, topic=unique_topic)
    with beam.Pipeline(options=PipelineOptions(flink_args(flink_job_endpoint))) as p:
        records = p | ReadFromKafka(
            consumer_config={"bootstrap.servers": kafka_config.bootstrap_servers, "auto.offset.reset": "earliest"},
            topics=[unique_topic],
            max_num_records=table.num_rows,
            expansion_service=kafka_expansion_service,
        )
        keyed = records | beam.Map(lambda kv: (kv[0].decode(), json.loads(kv[1])["event_id"]))
        assert_that(keyed, equal_to(list(zip(table["user_id"].to_pylist(), table["event_id"].to_pylist()))))
