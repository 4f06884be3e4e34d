"""Start, health-check and stop the local services reloop runs on.

Each service is a process started by us, remembered by a pid file in the state
dir (``$RELOOP_STATE_DIR``, default ``./.state``), and stopped by that pid only:
never ``pkill``/``killall``/``ray stop``, which would hit other users' processes.
Every call is idempotent: ``start`` on a running service returns at once,
``stop`` on a stopped one does nothing.

- Kafka 4 (KRaft, combined broker+controller) from the jars in ``infra/kafka/lib``
  (fetched from Maven Central by ``scripts/setup.sh``), on 127.0.0.1.
- Redis from Debian's ``redis-server`` (the Feast production profile), on 127.0.0.1, with a generated
  password in the state dir (``redis/password``; Feast reads it through ``feast.redis_password_env`` or,
  for this local service, from that file) and FLUSHALL/FLUSHDB/CONFIG disabled.
- A Ray head (``ray start --head --block``) with token authentication, for
  ``ray job submit``; the token lives in the state dir, never in the repo.
  ``--workers N`` adds N more Ray nodes (``ray start --address``) on their own
  ports, each with its own custom resource (``reloop_head``, ``reloop_worker_1``...)
  so placement on a node can be asked for and seen.
- s3proxy (``infra/s3proxy/lib``, its filesystem backend) as an S3 endpoint for
  ``s3://`` storage URIs; its generated credentials live in the state dir
  (``s3/credentials.json``), and :func:`s3_client_env` gives the ``AWS_*``
  environment a client (or a Ray worker) needs.

Command line: ``python -m reloop.services {start|stop|status} [kafka|redis|ray|s3 ...] [--workers N]``
(what ``reloop up/down/status`` and the ``infra/*.sh`` scripts call).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pyarrow.fs as pafs
from kafka import KafkaAdminClient

from online_models.errors import ReloopError

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"


def state_dir() -> Path:
    d = Path(os.environ.get("RELOOP_STATE_DIR", REPO / ".state")).resolve()
    d.mkdir(parents=True, exist_ok=True)
    return d


def _port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


KAFKA_PORT = _port("RELOOP_KAFKA_PORT", 9092)
KAFKA_CONTROLLER_PORT = _port("RELOOP_KAFKA_CONTROLLER_PORT", 9093)
REDIS_PORT = _port("RELOOP_REDIS_PORT", 6399)
RAY_PORT = _port("RELOOP_RAY_PORT", 6385)
RAY_DASHBOARD_PORT = _port("RELOOP_RAY_DASHBOARD_PORT", 8265)
FLINK_JOB_PORT = _port("RELOOP_FLINK_JOB_PORT", 8099)
FLINK_ARTIFACT_PORT = _port("RELOOP_FLINK_ARTIFACT_PORT", 8098)
FLINK_EXPANSION_PORT = _port("RELOOP_FLINK_EXPANSION_PORT", 8097)
KAFKA_EXPANSION_PORT = _port("RELOOP_KAFKA_EXPANSION_PORT", 8096)
S3_PORT = _port("RELOOP_S3_PORT", 9000)
RAY_CLIENT_PORT = _port("RELOOP_RAY_CLIENT_PORT", 10001)
#: the extra Ray nodes' ports: node k uses RAY_WORKER_PORT_BASE + 200 * (k - 1) + [0, 200)
RAY_WORKER_PORT_BASE = _port("RELOOP_RAY_WORKER_PORT_BASE", 24000)

KAFKA_BOOTSTRAP = f"127.0.0.1:{KAFKA_PORT}"
REDIS_URL = f"127.0.0.1:{REDIS_PORT}"
RAY_ADDRESS = f"127.0.0.1:{RAY_PORT}"
RAY_DASHBOARD = f"http://127.0.0.1:{RAY_DASHBOARD_PORT}"
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
#: the bucket ``reloop up s3`` creates (the cluster profile's storage URIs live in it)
S3_BUCKET = "reloop"
#: the custom resource of each Ray node ``reloop up ray`` starts: ``{name: NODE_RESOURCE_UNITS}``
RAY_HEAD_RESOURCE = "reloop_head"
NODE_RESOURCE_UNITS = 100


class ServiceError(ReloopError, RuntimeError):
    """A service could not be started, or did not become ready in time."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); look at its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@dataclass
class Status:
    name: str
    running: bool
    pid: int | None
    address: str
    version: str
    detail: str = ""


class Service:
    """A process we own: started detached, tracked by its pid file."""

    name = "service"
    ready_timeout_s = 90.0

    def __init__(self, root: Path | None = None) -> None:
        #: where this instance keeps its pid file, data and logs (default: the state dir)
        self.root = Path(root) if root is not None else None

    @property
    def dir(self) -> Path:
        d = (self.root or state_dir()) / self.name
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def pid_file(self) -> Path:
        return self.dir / "pid"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    # subclasses fill these in
    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def prepare(self) -> None:
        """One-time set-up before the first start (formatting storage, configs)."""

    def ready(self) -> bool:
        raise NotImplementedError

    def version(self) -> str:
        return ""

    def address(self) -> str:
        raise NotImplementedError

    def start(self) -> Status:
        if self.pid() is not None and self.ready():
            return self.status()
        if self.pid() is None and self.ready():
            raise ServiceError(
                f"{self.name}: {self.address()} is already in use by a process reloop did not start; "
                f"stop it or choose another port (see reloop/services.py)"
            )
        self.prepare()
        log = open(self.dir / "process.log", "ab")
        proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env(),
            cwd=self.dir,
            start_new_session=True,
        )
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with code {proc.returncode}; see {self.dir / 'process.log'}\n{self._tail()}"
                )
            if self.ready():
                return self.status()
            time.sleep(0.5)
        self.stop()  # don't leave a half-started process behind
        raise ServiceError(f"{self.name} not ready after {self.ready_timeout_s:.0f}s; see {self.dir / 'process.log'}")

    def _tail(self, n: int = 20) -> str:
        try:
            return "\n".join((self.dir / "process.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> None:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return
        # signal the whole process group we created (start_new_session), so children go too
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the process group at once (crash tests)."""
        pid = self.pid()
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for _ in range(50):
                if not _alive(pid):
                    break
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)

    def status(self) -> Status:
        pid = self.pid()
        up = pid is not None and self.ready()
        return Status(self.name, up, pid, self.address(), self.version() if up else "")


class Kafka(Service):
    """Single-node Kafka 4 in KRaft combined mode."""

    name = "kafka"
    lib = INFRA / "kafka" / "lib"

    def __init__(
        self, root: Path | None = None, port: int = KAFKA_PORT, controller_port: int = KAFKA_CONTROLLER_PORT
    ) -> None:
        super().__init__(root)
        self.port, self.controller_port = port, controller_port

    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def version(self) -> str:
        jars = sorted(self.lib.glob("kafka_2.13-*.jar"))
        return jars[0].stem.split("-", 1)[1] if jars else "?"

    def _java(self) -> str:
        java = shutil.which("java")
        if not java:
            raise ServiceError("java not found: Kafka needs Java 17+")
        return java

    def _classpath(self) -> str:
        if not (self.lib / ".complete").exists():
            raise ServiceError(f"Kafka jars missing in {self.lib}; run scripts/setup.sh (it fetches them with mvn)")
        return str(self.lib / "*")

    def _jvm(self, main: str, *args: str, heap: str = "-Xmx512m") -> list[str]:
        return [
            self._java(),
            heap,
            "-Xms128m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={INFRA / 'kafka' / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.dir / 'logs'}",
            "-cp",
            self._classpath(),
            main,
            *args,
        ]

    @property
    def props(self) -> Path:
        return self.dir / "server.properties"

    def prepare(self) -> None:
        data = self.dir / "data"
        template = (INFRA / "kafka" / "server.properties.template").read_text()
        self.props.write_text(template.format(port=self.port, controller_port=self.controller_port, data_dir=data))
        (self.dir / "logs").mkdir(exist_ok=True)
        if not (data / "meta.properties").exists():
            cluster_id = (
                subprocess.run(
                    self._jvm("kafka.tools.StorageTool", "random-uuid", heap="-Xmx128m"),
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            subprocess.run(
                self._jvm(
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(self.props),
                    "--standalone",
                    heap="-Xmx128m",
                ),
                check=True,
                capture_output=True,
                text=True,
            )

    def command(self) -> list[str]:
        return self._jvm("kafka.Kafka", str(self.props))

    def ready(self) -> bool:
        if not _port_open(self.port):
            return False
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.address(), request_timeout_ms=3000)
            try:
                admin.list_topics()
                return True
            finally:
                admin.close()
        except Exception:  # any client error means "not ready yet"; start() times out with the log
            return False


class Redis(Service):
    """A private redis-server (Debian's package) on loopback, no persistence."""

    name = "redis"
    ready_timeout_s = 20.0

    def address(self) -> str:
        return REDIS_URL

    def _bin(self) -> str:
        b = shutil.which("redis-server")
        if not b:
            raise ServiceError("redis-server not found; run scripts/setup.sh (apt-get install redis-server)")
        return b

    def version(self) -> str:
        try:
            out = subprocess.run([self._bin(), "--version"], capture_output=True, text=True).stdout
            return out.split("v=")[1].split()[0]
        except (IndexError, OSError, ServiceError):
            return "?"

    @property
    def password_file(self) -> Path:
        return self.dir / "password"

    @property
    def conf_file(self) -> Path:
        return self.dir / "redis.conf"

    def prepare(self) -> None:
        """A generated password in the state dir (0600), and a config file carrying it (not the command
        line, which every local user can read in ``ps``); FLUSHALL/FLUSHDB/CONFIG are disabled."""
        if not self.password_file.exists():
            self.password_file.write_text(secrets.token_hex(24))
            self.password_file.chmod(0o600)
        pw = self.password()
        self.conf_file.write_text(
            f'requirepass {pw}\nrename-command FLUSHALL ""\nrename-command FLUSHDB ""\nrename-command CONFIG ""\n'
        )
        self.conf_file.chmod(0o600)

    def password(self) -> str:
        try:
            return self.password_file.read_text().strip()
        except OSError:
            return ""

    def connection_string(self) -> str:
        """For Feast's Redis online store: ``host:port,password=...``."""
        pw = self.password()
        return f"{REDIS_URL},password={pw}" if pw else REDIS_URL

    def command(self) -> list[str]:
        return [
            self._bin(),
            str(self.conf_file),
            "--port",
            str(REDIS_PORT),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]

    def ready(self) -> bool:
        if not _port_open(REDIS_PORT):
            return False
        try:
            with socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=1) as s:
                s.sendall(f"AUTH {self.password()}\r\nPING\r\n".encode())
                time.sleep(0.05)
                return b"+PONG" in s.recv(256)
        except OSError:
            return False


class Ray(Service):
    """A Ray head for ``ray job submit``, with token auth; the token file lives in the state dir."""

    name = "ray"
    ready_timeout_s = 120.0

    def address(self) -> str:
        return RAY_DASHBOARD

    def version(self) -> str:

        return importlib.metadata.version("ray")

    @property
    def token_file(self) -> Path:
        return self.dir / "auth_token"

    def prepare(self) -> None:
        if not self.token_file.exists():
            self.token_file.write_text(secrets.token_hex(32))
            self.token_file.chmod(0o600)

    def env(self) -> dict[str, str]:
        return {**_cluster_environ(), **ray_client_env()}

    def command(self) -> list[str]:
        ray = Path(sys.executable).parent / "ray"
        return [
            str(ray),
            "start",
            "--head",
            "--block",
            f"--port={RAY_PORT}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={RAY_DASHBOARD_PORT}",
            "--include-dashboard=true",
            f"--temp-dir={self.dir / 'tmp'}",
            "--disable-usage-stats",
            f"--ray-client-server-port={RAY_CLIENT_PORT}",
            "--resources=" + json.dumps({RAY_HEAD_RESOURCE: NODE_RESOURCE_UNITS}),
        ]

    def stop(self, timeout_s: float = 30.0) -> None:
        for w in running_ray_workers():  # a worker node without its head only retries: stop it first
            w.stop(timeout_s)
        super().stop(timeout_s)

    def ready(self) -> bool:
        if not _port_open(RAY_DASHBOARD_PORT):
            return False
        try:
            req = urllib.request.Request(
                f"{RAY_DASHBOARD}/api/version", headers={"Authorization": f"Bearer {self._token()}"}
            )
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status == 200
        except Exception:  # not serving yet
            return False

    def _token(self) -> str:
        try:
            return self.token_file.read_text().strip()
        except OSError:
            return ""


class Flink(Service):
    """Beam's Flink job server with an embedded Flink (``--flink-master=[local]``) in one bounded JVM.

    ``[local]`` is a real Flink JobManager + TaskExecutor (parallel slots, network shuffles) inside the job
    server's JVM; pipelines reach it with ``--runner=PortableRunner --job_endpoint=localhost:8099
    --environment_type=LOOPBACK``. The classpath comes from ``infra/flink/lib`` (``scripts/setup.sh``).

    Beam's job server binds its job and artifact ports on every interface whatever ``--job-host`` says
    (its ``ServerFactory`` builds the gRPC server with ``NettyServerBuilder.forPort``); only the expansion
    port honours the host. It runs any pipeline it is sent, so keep 8098/8099 behind the host's firewall.
    """

    name = "flink"
    lib = INFRA / "flink" / "lib"
    ready_timeout_s = 120.0
    # Flink and Beam reflect into JDK internals; Java 17 refuses without these
    ADD_OPENS = (
        "java.base/java.lang",
        "java.base/java.lang.invoke",
        "java.base/java.lang.reflect",
        "java.base/java.io",
        "java.base/java.net",
        "java.base/java.nio",
        "java.base/java.text",
        "java.base/java.time",
        "java.base/java.util",
        "java.base/java.util.concurrent",
        "java.base/java.util.concurrent.atomic",
        "java.base/sun.nio.ch",
    )

    def __init__(
        self,
        root: Path | None = None,
        job_port: int = FLINK_JOB_PORT,
        artifact_port: int = FLINK_ARTIFACT_PORT,
        expansion_port: int = FLINK_EXPANSION_PORT,
        heap: str = os.environ.get("RELOOP_FLINK_HEAP", "1g"),
    ) -> None:
        super().__init__(root)
        self.job_port, self.artifact_port, self.expansion_port, self.heap = (
            job_port,
            artifact_port,
            expansion_port,
            heap,
        )

    def address(self) -> str:
        return f"localhost:{self.job_port}"

    def env(self) -> dict[str, str]:
        # glibc gives each of Flink's many threads its own malloc arena (64 MiB each): without a cap the
        # JVM's resident memory grows far past the heap over a few dozen jobs
        return {**os.environ, "MALLOC_ARENA_MAX": "2"}

    def version(self) -> str:
        jars = sorted(self.lib.glob("beam-runners-flink-1.*-[0-9]*.jar"))
        if not jars:
            return "?"
        flink, beam = jars[0].stem[len("beam-runners-flink-") :].split("-", 1)
        return f"beam {beam}, flink {flink}"

    def command(self) -> list[str]:
        java = shutil.which("java")
        if not java:
            raise ServiceError("java not found: the Flink job server needs Java 11 or 17")
        if not (self.lib / ".complete").exists():
            raise ServiceError(
                f"Flink job server jars missing in {self.lib}; run scripts/setup.sh (it fetches them with mvn)"
            )
        return [
            java,
            f"-Xmx{self.heap}",
            "-Xms256m",
            "-XX:MaxDirectMemorySize=512m",
            "-XX:+UseG1GC",
            "-XX:ParallelGCThreads=2",
            "-Djava.awt.headless=true",
            *(f"--add-opens={m}=ALL-UNNAMED" for m in self.ADD_OPENS),
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
            "-Dorg.slf4j.simpleLogger.log.org.apache.beam.runners.jobsubmission=info",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-cp",
            str(self.lib / "*"),
            "org.apache.beam.runners.flink.FlinkJobServerDriver",
            "--flink-master=[local]",
            "--job-host=localhost",
            f"--job-port={self.job_port}",
            f"--artifact-port={self.artifact_port}",
            f"--expansion-port={self.expansion_port}",
        ]

    def ready(self) -> bool:
        """Both gRPC endpoints answer an HTTP/2 handshake (a bare TCP probe would log protocol errors)."""
        if not (_port_open(self.job_port) and _port_open(self.expansion_port)):
            return False
        try:
            for port in (self.job_port, self.expansion_port):
                with grpc.insecure_channel(f"localhost:{port}") as ch:
                    grpc.channel_ready_future(ch).result(timeout=2)
            return True
        except Exception:  # not serving yet
            return False


class KafkaExpansion(Service):
    """Beam's Java expansion service with KafkaIO, for Python's ``ReadFromKafka``/``WriteToKafka`` on Flink.

    Same Beam release as the Python SDK (``infra/flink/expansion/lib``). The transforms it expands run in
    a PROCESS environment: the Flink job server starts ``infra/flink/java-harness-boot`` per worker,
    which runs the Java SDK harness from the same jars (no Docker).
    Beam's ``ExpansionService`` main binds its port on every interface (it takes no host), so keep it
    behind the host's firewall like the job server.
    """

    name = "expansion"
    lib = INFRA / "flink" / "expansion" / "lib"
    boot = INFRA / "flink" / "java-harness-boot"
    ready_timeout_s = 90.0

    def __init__(self, root: Path | None = None, port: int = KAFKA_EXPANSION_PORT, heap: str = "384m") -> None:
        super().__init__(root)
        self.port, self.heap = port, heap

    def address(self) -> str:
        return f"localhost:{self.port}"

    def version(self) -> str:
        jars = sorted(self.lib.glob("beam-sdks-java-io-kafka-*.jar"))
        return f"beam {jars[0].stem.rsplit('-', 1)[1]}" if jars else "?"

    def command(self) -> list[str]:
        java = shutil.which("java")
        if not java:
            raise ServiceError("java not found: the expansion service needs Java 11 or 17")
        if not (self.lib / ".complete").exists():
            raise ServiceError(f"expansion service jars missing in {self.lib}; run scripts/setup.sh")

        return [
            java,
            f"-Xmx{self.heap}",
            "-XX:+UseSerialGC",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
            "-cp",
            str(self.lib / "*"),
            "org.apache.beam.sdk.expansion.service.ExpansionService",
            str(self.port),
            "--defaultEnvironmentType=PROCESS",
            "--defaultEnvironmentConfig=" + json.dumps({"command": str(self.boot)}),
        ]

    def ready(self) -> bool:
        if not _port_open(self.port):
            return False
        try:
            with grpc.insecure_channel(self.address()) as ch:
                grpc.channel_ready_future(ch).result(timeout=2)
            return True
        except Exception:  # not serving yet
            return False


class RayWorker(Service):
    """One more Ray node on this machine (``ray start --address=<head> --block``), joining the head above.

    Node ``index`` gets the custom resource ``reloop_worker_<index>`` (placement can ask for it) and its own
    ports (:data:`RAY_WORKER_PORT_BASE`), so it never collides with another Ray on the machine. It shares
    the head's temp dir (one Ray session per machine) and token. Stopped by its pid like every service;
    killing that pid's process group is what a lost machine looks like to the head.
    """

    ready_timeout_s = 120.0

    def __init__(
        self,
        index: int = 1,
        root: Path | None = None,
        num_cpus: int | None = None,
        object_store_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        super().__init__(root)
        if index < 1:
            raise ServiceError(f"ray worker node index must be >= 1, got {index}")
        self.index, self.num_cpus, self.object_store_bytes = index, num_cpus, object_store_bytes
        self.name = f"ray-worker-{index}"
        self.base = RAY_WORKER_PORT_BASE + 200 * (index - 1)

    @property
    def resource(self) -> str:
        return ray_worker_resource(self.index)

    def address(self) -> str:
        return f"127.0.0.1:{self.base} (node of {RAY_ADDRESS})"

    def version(self) -> str:
        return Ray(self.root).version()

    def env(self) -> dict[str, str]:
        return {**_cluster_environ(), **ray_client_env()}

    def prepare(self) -> None:
        head = Ray(self.root)
        if head.pid() is None or not head.ready():
            raise ServiceError(f"{self.name}: the Ray head is not up; start it first (`reloop up ray`)")

    def command(self) -> list[str]:
        ray = Path(sys.executable).parent / "ray"
        b = self.base
        cmd = [
            str(ray),
            "start",
            f"--address={RAY_ADDRESS}",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--node-manager-port={b}",
            f"--object-manager-port={b + 1}",
            f"--dashboard-agent-listen-port={b + 2}",
            f"--dashboard-agent-grpc-port={b + 3}",
            f"--metrics-export-port={b + 4}",
            f"--runtime-env-agent-port={b + 5}",
            f"--min-worker-port={b + 100}",
            f"--max-worker-port={b + 199}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--temp-dir={Ray(self.root).dir / 'tmp'}",
            "--disable-usage-stats",
            "--resources=" + json.dumps({self.resource: NODE_RESOURCE_UNITS}),
        ]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        return cmd

    def start(self) -> Status:
        if self.pid() is None:
            # a node we killed stays "alive" in the head's view until its heartbeats time out: wait for that
            # rather than mistaking it for someone else's node
            deadline = time.monotonic() + 90
            while self.ready() and time.monotonic() < deadline:
                time.sleep(1)
        return super().start()

    def ready(self) -> bool:
        """The head lists a live node holding this node's resource."""
        return any(n["alive"] and self.resource in n["resources"] for n in ray_nodes())


def ray_worker_resource(index: int) -> str:
    """The custom resource that only Ray worker node ``index`` has (``reloop_worker_<index>``)."""
    return f"reloop_worker_{index}"


def ray_nodes() -> list[dict]:
    """The head's view of its nodes (node id, alive, resources), from the dashboard; [] when unreachable."""
    if not _port_open(RAY_DASHBOARD_PORT):
        return []

    token = state_dir() / "ray" / "auth_token"
    try:
        req = urllib.request.Request(
            f"{RAY_DASHBOARD}/nodes?view=summary", headers={"Authorization": f"Bearer {token.read_text().strip()}"}
        )
        with urllib.request.urlopen(req, timeout=3) as r:
            data = json.loads(r.read())
    except Exception:  # not serving yet, or no token: no nodes to report
        return []
    # the dashboard camel-cases every key (reloop_worker_1 -> reloopWorker1): map ours back
    ours = {_camel(r): r for r in (RAY_HEAD_RESOURCE, *(ray_worker_resource(i) for i in range(1, 65)))}
    out = []
    for n in data.get("data", {}).get("summary", []):
        raylet = n.get("raylet", {})
        res = {ours.get(k, k): v for k, v in raylet.get("resourcesTotal", {}).items()}
        out.append({"node_id": raylet.get("nodeId"), "alive": raylet.get("state") == "ALIVE", "resources": res})
    return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def running_ray_workers(root: Path | None = None) -> list[RayWorker]:
    """The worker nodes started from this state dir whose process is still alive."""
    out = []
    for d in sorted((root or state_dir()).glob("ray-worker-*")):
        try:
            w = RayWorker(int(d.name.rsplit("-", 1)[1]), root)
        except (ValueError, ServiceError):
            continue
        if w.pid() is not None:
            out.append(w)
    return out


def start_ray(workers: int = 0) -> list[Status]:
    """The Ray head plus ``workers`` more nodes (idempotent); returns their statuses, head first."""
    out = [Ray().start()]
    out += [RayWorker(i).start() for i in range(1, workers + 1)]
    return out


class S3Proxy(Service):
    """s3proxy with its filesystem backend: an S3 API on 127.0.0.1 for ``s3://`` URIs, with generated keys.

    The keys are made once per state dir (``s3/credentials.json``, mode 0600), never in the repo; objects
    live under ``s3/data/<bucket>/``. On start the bucket :data:`S3_BUCKET` is created.
    """

    name = "s3"
    lib = INFRA / "s3proxy" / "lib"
    ready_timeout_s = 60.0

    def __init__(self, root: Path | None = None, port: int = S3_PORT, heap: str = "256m") -> None:
        super().__init__(root)
        self.port, self.heap = port, heap

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def address(self) -> str:
        return self.endpoint

    def version(self) -> str:
        jars = sorted(self.lib.glob("s3proxy-*.jar"))
        return jars[0].stem.split("-", 1)[1] if jars else "?"

    @property
    def credentials_file(self) -> Path:
        return self.dir / "credentials.json"

    def credentials(self) -> dict[str, str]:
        """``{"access_key_id", "secret_access_key", "endpoint", "region", "bucket"}`` of this store."""
        try:
            return json.loads(self.credentials_file.read_text())
        except (OSError, ValueError) as e:
            raise ServiceError(
                f"s3: no credentials in {self.credentials_file} (`reloop up s3` makes them): {e}"
            ) from None

    def prepare(self) -> None:
        if not self.credentials_file.exists():
            self.credentials_file.touch(mode=0o600)
            self.credentials_file.write_text(
                json.dumps(
                    {
                        "access_key_id": "reloop-" + secrets.token_hex(8),
                        "secret_access_key": secrets.token_hex(24),
                        "region": "us-east-1",
                        "bucket": S3_BUCKET,
                    }
                )
            )
        creds = self.credentials()
        if creds.get("endpoint") != self.endpoint:  # the port may have moved since the keys were made
            creds["endpoint"] = self.endpoint
            self.credentials_file.write_text(json.dumps(creds))
        (self.dir / "data").mkdir(exist_ok=True)
        props = self.dir / "s3proxy.properties"
        props.touch(mode=0o600)  # it holds the secret too
        props.write_text(
            "\n".join(
                [
                    f"s3proxy.endpoint={self.endpoint}",
                    "s3proxy.authorization=aws-v2-or-v4",
                    f"s3proxy.identity={creds['access_key_id']}",
                    f"s3proxy.credential={creds['secret_access_key']}",
                    "jclouds.provider=filesystem",
                    f"jclouds.filesystem.basedir={self.dir / 'data'}",
                    "",
                ]
            )
        )

    def command(self) -> list[str]:
        java = shutil.which("java")
        if not java:
            raise ServiceError("java not found: s3proxy needs Java 17+")
        if not (self.lib / ".complete").exists():
            raise ServiceError(f"s3proxy jars missing in {self.lib}; run scripts/setup.sh (it fetches them with mvn)")
        return [
            java,
            f"-Xmx{self.heap}",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            f"-Dlogback.configurationFile={INFRA / 's3proxy' / 'logback.xml'}",
            "-cp",
            str(self.lib / "*"),
            "org.gaul.s3proxy.Main",
            "--properties",
            str(self.dir / "s3proxy.properties"),
        ]

    def _fs(self, **kw):

        c = self.credentials()
        return pafs.S3FileSystem(
            access_key=c["access_key_id"],
            secret_key=c["secret_access_key"],
            endpoint_override=f"127.0.0.1:{self.port}",
            scheme="http",
            region=c["region"],
            connect_timeout=1,
            request_timeout=3,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
            **kw,
        )

    def ready(self) -> bool:
        """A signed request with our keys is answered (a wrong key or another server raises)."""
        if not _port_open(self.port) or not self.credentials_file.exists():
            return False
        try:
            self._fs().get_file_info(S3_BUCKET)
            return True
        except Exception:  # not serving yet
            return False

    def start(self) -> Status:
        st = super().start()

        fs = self._fs(allow_bucket_creation=True)
        if fs.get_file_info(S3_BUCKET).type == pafs.FileType.NotFound:
            fs.create_dir(S3_BUCKET)
        return st


def s3_client_env(root: Path | None = None) -> dict[str, str]:
    """The ``AWS_*`` environment under which pyarrow (``FileSystem.from_uri``), Ray Train and s3fs open
    ``s3://`` URIs on the local s3proxy: endpoint, keys, region, and the checksum settings s3proxy needs
    (without them multipart uploads fail with ``XAmzContentSHA256Mismatch``). Give it to every process
    that touches the store, Ray workers included."""
    c = S3Proxy(root).credentials()
    return {
        "AWS_ENDPOINT_URL": c["endpoint"],
        "AWS_ACCESS_KEY_ID": c["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": c["secret_access_key"],
        "AWS_DEFAULT_REGION": c["region"],
        "AWS_REGION": c["region"],
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
    }


def _cluster_environ() -> dict[str, str]:
    """This process's environment for a Ray node, without the single-machine switch that an embedded
    ``jobs.ray_local.init_local`` in the same process may have set (a node started with it refuses to join)."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}


def ray_client_env() -> dict[str, str]:
    """Environment for a Ray client of the local head: token auth with the state dir's token."""
    token = state_dir() / "ray" / "auth_token"
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}


SERVICES: dict[str, type[Service]] = {
    "kafka": Kafka,
    "redis": Redis,
    "ray": Ray,
    "flink": Flink,
    "expansion": KafkaExpansion,
    "s3": S3Proxy,
}


def get(name: str) -> Service:
    if name.startswith("ray-worker-") and name.rsplit("-", 1)[1].isdigit():
        return RayWorker(int(name.rsplit("-", 1)[1]))
    try:
        return SERVICES[name]()
    except KeyError:
        raise ServiceError(f"unknown service {name!r}; known: {', '.join(SERVICES)}") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("start", "stop", "status", "kill"):
        print(__doc__.strip().splitlines()[-2:][0], file=sys.stderr)
        print("usage: python -m reloop.services {start|stop|status|kill} [kafka|redis|ray ...]", file=sys.stderr)
        return 2
    workers = 0
    if "--workers" in argv:  # `start ray --workers N`: the head plus N more Ray nodes
        i = argv.index("--workers")
        try:
            workers = int(argv[i + 1])
        except (IndexError, ValueError):
            print("--workers needs a number", file=sys.stderr)
            return 2
        del argv[i : i + 2]
    verb, names = argv[0], argv[1:] or list(SERVICES)
    if verb == "start" and workers and "ray" in names:
        names = [*names, *(f"ray-worker-{i}" for i in range(1, workers + 1))]
    code = 0
    for name in names:
        svc = get(name)
        try:
            if verb == "start":
                t0 = time.monotonic()
                st = svc.start()
                print(f"{name}: up at {st.address} (pid {st.pid}, {st.version}) in {time.monotonic() - t0:.1f}s")
            elif verb in ("stop", "kill"):
                getattr(svc, verb)()
                print(f"{name}: stopped")
            else:
                st = svc.status()
                print(f"{name}: {'up' if st.running else 'down'} {st.address} pid={st.pid} {st.version}")
                code |= 0 if st.running else 3
        except ServiceError as e:
            print(f"{name}: {e}", file=sys.stderr)
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
