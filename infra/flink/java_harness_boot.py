"""Start Beam's Java SDK harness for a PROCESS environment, without the SDK container's Go boot binary.

The runner (our Flink job server) calls ``java-harness-boot --id=ID --provision_endpoint=HOST:PORT ...``.
Like the container's boot, this asks the provision service for the pipeline options, the control and
logging endpoints and the runner capabilities, then replaces itself with
``java -cp infra/flink/expansion/lib/* org.apache.beam.fn.harness.FnHarness`` configured through the
environment variables FnHarness reads. The jars are those of the expansion service (same Beam release
as the Python SDK), so the harness runs exactly the transforms that service expanded. The harness's
output goes to ``java-harness-<ID>.log`` in the working directory (the job server's state dir).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from apache_beam.portability.api import beam_provision_api_pb2, beam_provision_api_pb2_grpc
from google.protobuf import json_format

LIB = Path(__file__).resolve().parent / "expansion" / "lib"
HEAP = os.environ.get("RELOOP_JAVA_HARNESS_HEAP", "256m")


def main(argv: list[str] | None = None) -> None:

    ap = argparse.ArgumentParser()
    ap.add_argument("--id", required=True)
    ap.add_argument("--provision_endpoint", required=True)
    args, _ = ap.parse_known_args(argv)
    log = os.open(f"java-harness-{args.id}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    with grpc.insecure_channel(args.provision_endpoint) as ch:
        info = (
            beam_provision_api_pb2_grpc.ProvisionServiceStub(ch)
            .GetProvisionInfo(beam_provision_api_pb2.GetProvisionInfoRequest(), metadata=[("worker_id", args.id)])
            .info
        )
    env = dict(os.environ)
    env.update(
        {
            "HARNESS_ID": args.id,
            "PIPELINE_OPTIONS": json_format.MessageToJson(info.pipeline_options),
            "LOGGING_API_SERVICE_DESCRIPTOR": f'url: "{info.logging_endpoint.url}"',
            "CONTROL_API_SERVICE_DESCRIPTOR": f'url: "{info.control_endpoint.url}"',
            "RUNNER_CAPABILITIES": " ".join(info.runner_capabilities),
        }
    )
    cmd = [
        "java",
        f"-Xmx{HEAP}",
        "-XX:+UseSerialGC",
        *(f"--add-opens=java.base/{m}=ALL-UNNAMED" for m in ("java.lang", "java.nio", "java.util")),
        "-cp",
        str(LIB / "*"),
        "org.apache.beam.fn.harness.FnHarness",
    ]
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
