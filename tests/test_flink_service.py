"""The Flink job server service: command line, version, clear errors, and (integration) a real portable run.

The integration test starts the shared job server (idempotent, ``reloop up --with flink``) and runs a
splittable DoFn + a shuffle on it with ``--environment_type=LOOPBACK --parallelism=2``: no Docker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reloop import services
from tests.flink_support import flink_job_endpoint  # noqa: F401  (fixture)


def _fake_lib(tmp_path: Path, complete: bool = True) -> Path:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "beam-runners-flink-1.19-2.62.0.jar").write_bytes(b"")
    (lib / "beam-runners-flink-1.19-job-server-2.62.0.jar").write_bytes(b"")  # must not confuse version()
    if complete:
        (lib / ".complete").touch()
    return lib


def test_flink_is_registered_and_uses_its_own_ports(tmp_path):
    svc = services.get("flink")
    assert isinstance(svc, services.Flink)
    f = services.Flink(tmp_path, job_port=18099, artifact_port=18098, expansion_port=18097, heap="768m")
    assert f.address() == "localhost:18099"


def test_flink_command_is_one_bounded_jvm_with_local_master(tmp_path, monkeypatch):
    f = services.Flink(tmp_path, job_port=18099, artifact_port=18098, expansion_port=18097, heap="768m")
    monkeypatch.setattr(f, "lib", _fake_lib(tmp_path))
    cmd = f.command()
    assert "-Xmx768m" in cmd
    assert "--add-opens=java.base/java.lang=ALL-UNNAMED" in cmd
    assert "--add-opens=java.base/java.nio=ALL-UNNAMED" in cmd
    assert "--add-opens=java.base/java.util=ALL-UNNAMED" in cmd
    assert cmd[cmd.index("-cp") + 2] == "org.apache.beam.runners.flink.FlinkJobServerDriver"
    assert "--flink-master=[local]" in cmd
    assert {"--job-port=18099", "--artifact-port=18098", "--expansion-port=18097"} <= set(cmd)
    assert f.version() == "beam 2.62.0, flink 1.19"


def test_flink_without_fetched_jars_says_how_to_fetch(tmp_path, monkeypatch):
    f = services.Flink(tmp_path)
    monkeypatch.setattr(f, "lib", _fake_lib(tmp_path, complete=False))
    with pytest.raises(services.ServiceError, match="scripts/setup.sh"):
        f.command()


def test_flink_not_ready_on_a_closed_port(tmp_path):
    from tests.conftest import free_port

    f = services.Flink(tmp_path, job_port=free_port(), expansion_port=free_port())
    assert not f.ready()
    assert not f.status().running


@pytest.mark.integration
def test_splittable_dofn_and_shuffle_run_on_local_flink(flink_job_endpoint):  # noqa: F811  (the fixture)
    import apache_beam as beam
    from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to
    from apache_beam.transforms.core import RestrictionProvider

    class Ranges(RestrictionProvider):
        def initial_restriction(self, n):
            return OffsetRange(0, n)

        def create_tracker(self, r):
            return OffsetRestrictionTracker(r)

        def restriction_size(self, n, r):
            return r.size()

        def split(self, n, r):
            return r.split(max(1, r.size() // 4))

    class Count(beam.DoFn):
        def process(self, n, tracker=beam.DoFn.RestrictionParam(Ranges())):  # noqa: B008  (Beam's marker)
            i = tracker.current_restriction().start
            while tracker.try_claim(i):
                yield i
                i += 1

    sizes = [1000, 10, 0]
    expected: dict[int, int] = {}
    for n in sizes:
        for x in range(n):
            expected[x % 7] = expected.get(x % 7, 0) + x
    opts = PipelineOptions(
        [
            "--runner=PortableRunner",
            f"--job_endpoint={flink_job_endpoint}",
            "--environment_type=LOOPBACK",
            "--parallelism=2",
        ]
    )
    with beam.Pipeline(options=opts) as p:
        sums = (
            p
            | beam.Create(sizes)
            | "Split" >> beam.ParDo(Count())
            | beam.Map(lambda x: (x % 7, x))
            | beam.CombinePerKey(sum)
        )
        assert_that(sums, equal_to(sorted(expected.items())))


def test_kafka_expansion_runs_java_transforms_in_a_process_environment(tmp_path, monkeypatch):
    import json

    x = services.KafkaExpansion(tmp_path, port=18096)
    lib = tmp_path / "xlib"
    lib.mkdir()
    (lib / "beam-sdks-java-io-kafka-2.73.0.jar").write_bytes(b"")
    monkeypatch.setattr(x, "lib", lib)
    with pytest.raises(services.ServiceError, match="scripts/setup.sh"):
        x.command()
    (lib / ".complete").touch()
    cmd = x.command()
    assert cmd[cmd.index("org.apache.beam.sdk.expansion.service.ExpansionService") + 1] == "18096"
    assert "--defaultEnvironmentType=PROCESS" in cmd
    config = json.loads(next(a for a in cmd if a.startswith("--defaultEnvironmentConfig=")).split("=", 1)[1])
    assert config["command"].endswith("infra/flink/java-harness-boot")
    assert x.version() == "beam 2.73.0"
