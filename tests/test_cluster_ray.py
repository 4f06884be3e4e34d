"""A two-node Ray cluster on one machine (``reloop up ray --workers 1``) with storage on s3proxy.

- the retrain's ``TorchTrainer`` with 2 workers placed STRICT_SPREAD runs on the 2 node ids the head lists,
  reading examples from and checkpointing (Ray Train ``storage_path``) to ``s3://``;
- the incremental trainer actor, asked for the worker node's custom resource, runs on that node and
  checkpoints to the bucket (nothing assumes a shared local disk);
- SIGKILL of the worker node (its pid's process group) during a retrain: the retrain fails with a clear
  error, the served (current) version stays, no candidate version is published, whole or partial.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pytest

from reloop import services

pytestmark = pytest.mark.integration

N_EXAMPLES = 12_000


@pytest.fixture(scope="module")
def cluster():
    """s3proxy and a Ray head + 1 worker node (started here if they were not), a driver connected to them."""
    from pipelines.storage import storage_env

    own = [s for s in (services.S3Proxy(), services.Ray(), services.RayWorker(1)) if s.pid() is None]
    services.S3Proxy().start()
    services.start_ray(workers=1)
    saved = dict(os.environ)
    # before Ray is imported: it reads its auth settings once, when its core library loads
    os.environ.update({**services.s3_client_env(), **services.ray_client_env()})
    import ray

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(
        address=services.RAY_ADDRESS,
        log_to_driver=False,
        runtime_env={"env_vars": {**storage_env(), "PYTHONPATH": root}},
    )
    yield services
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)
    for s in reversed(own):
        s.stop()


def alive_nodes() -> dict[str, str]:
    """node id -> which of our nodes it is ("head" / "worker_1"), for the live nodes of the cluster."""
    out = {}
    for n in services.ray_nodes():
        if not n["alive"]:
            continue
        if services.RAY_HEAD_RESOURCE in n["resources"]:
            out[n["node_id"]] = "head"
        elif services.ray_worker_resource(1) in n["resources"]:
            out[n["node_id"]] = "worker_1"
    return out


@pytest.fixture(scope="module")
def data(cluster):
    """Examples in the bucket, and a served v000001 in an s3:// registry."""
    from jobs.registry import ModelRegistry
    from online_models.encoding import EncoderConfig
    from online_models.models import ModelConfig, build_model
    from pipelines.aggregates import USER_FEATURES
    from pipelines.storage import open_filesystem, write_parquet_atomic

    root = f"s3://{services.S3_BUCKET}/tests/{uuid.uuid4().hex[:10]}"
    rng = np.random.default_rng(0)
    users = rng.integers(0, 200, N_EXAMPLES)
    t = pa.table(
        {
            "event_id": [f"e{i}" for i in range(N_EXAMPLES)],
            "ts": np.arange(N_EXAMPLES) * 1000,
            "user_id": [f"u{u}" for u in users],
            "item_id": [f"i{x}" for x in rng.integers(0, 300, N_EXAMPLES)],
            "label": (rng.random(N_EXAMPLES) < 0.3 + 0.4 * (users % 2)).astype("int8"),
            USER_FEATURES[0]: rng.random(N_EXAMPLES),
        }
    )
    fs, path, _ = open_filesystem(root + "/examples")
    for k, lo in enumerate(range(0, N_EXAMPLES, 3000)):
        write_parquet_atomic(fs, f"{path}/run-{k}/part-0.parquet", t.slice(lo, 3000))
    reg = ModelRegistry(root + "/registry")
    enc = EncoderConfig(numeric_fields=(USER_FEATURES[0],), hash_buckets=1009)
    mc = ModelConfig(
        kind="lr",
        num_categorical=2,
        hash_buckets=1009,
        num_numeric=1,
        categorical_fields=enc.categorical_fields,
        numeric_fields=enc.numeric_fields,
    )
    reg.publish(
        build_model(mc).state_dict(),
        model_config=mc.to_dict(),
        feature_service="ctr_lr",
        extra={"encoder": enc.to_dict()},
        promote=True,
    )
    return root


def retrain_config(root: str, **kw):
    from jobs.retrain import RetrainConfig

    return RetrainConfig(
        **{
            "examples_uri": root + "/examples",
            "registry_uri": root + "/registry",
            "storage_path": root + "/ray_train",
            "model_kind": "lr",
            "window_days": None,
            "num_workers": 2,
            "placement_strategy": "STRICT_SPREAD",
            "epochs": 1,
            "hash_buckets": 1009,
            **kw,
        }
    )


def test_cluster_has_two_nodes_with_their_own_resources(cluster):
    import ray

    nodes = alive_nodes()
    assert sorted(nodes.values()) == ["head", "worker_1"]
    total = ray.cluster_resources()
    assert total[services.RAY_HEAD_RESOURCE] == total[services.ray_worker_resource(1)] == services.NODE_RESOURCE_UNITS


def test_retrain_runs_two_workers_on_two_nodes_with_s3_storage(cluster, data):
    from jobs.registry import ModelRegistry
    from jobs.retrain import run_retrain

    res = run_retrain(retrain_config(data))
    nodes = alive_nodes()
    assert len(res["worker_nodes"]) == 2 and set(res["worker_nodes"]) == set(nodes), (res, nodes)
    reg = ModelRegistry(data + "/registry")
    assert reg.current() == "v000001"  # a candidate, not promoted
    assert reg.entry(res["version"]).extra["worker_nodes"] == res["worker_nodes"]
    assert res["checkpoint"].startswith(f"{services.S3_BUCKET}/")  # Ray Train's checkpoint is in the bucket
    on_disk = services.S3Proxy().dir / "data" / res["checkpoint"]
    assert (on_disk / "start-0.model.safetensors").is_file()


def test_incremental_trainer_actor_runs_on_the_worker_node(cluster, data):
    import ray

    from jobs.checkpoints import CheckpointStore
    from jobs.trainer import IncrementalTrainer, TrainerConfig

    cfg = TrainerConfig(
        examples_uri=data + "/examples",
        checkpoint_dir=data + "/trainer",
        model_kind="lr",
        hash_buckets=1009,
        checkpoint_every=3000,
        idle_exit=0.0,
    )
    Actor = ray.remote(num_cpus=1, max_concurrency=2, resources={services.ray_worker_resource(1): 1})(
        IncrementalTrainer
    )
    actor = Actor.remote(cfg)
    node = ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=120)
    assert alive_nodes()[node] == "worker_1"
    final = ray.get(actor.run.remote(), timeout=300)
    assert final["learned"] == N_EXAMPLES
    assert CheckpointStore(data + "/trainer").latest() is not None
    ray.kill(actor)


def test_killing_the_worker_node_during_a_retrain_keeps_the_served_model(cluster, data):
    from ray.util.state import list_actors

    from jobs.registry import ModelRegistry
    from jobs.retrain import run_retrain

    reg = ModelRegistry(data + "/registry")
    before_current, before = reg.current(), reg.versions(include_partial=True)
    outcome: dict[str, object] = {}

    def retrain() -> None:
        try:
            outcome["result"] = run_retrain(retrain_config(data, epochs=2000))
        except Exception as e:  # noqa: BLE001 - the failure is what we check
            outcome["error"] = e

    th = threading.Thread(target=retrain, daemon=True)
    th.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # both Train workers up: the fit is under way
        alive = list_actors(address=services.RAY_DASHBOARD, filters=[("state", "=", "ALIVE")], limit=1000)
        workers = [a for a in alive if "TrainWorker" in (a.class_name or "")]
        if len(workers) >= 2:
            break
        time.sleep(1)
    else:
        pytest.fail("the retrain's workers never started")
    time.sleep(40)  # past the workers' start-up (15-25 s on 2 busy cores): into the training epochs
    worker = services.RayWorker(1)
    killed_pid = worker.pid()
    worker.kill()
    th.join(timeout=300)
    try:
        assert not th.is_alive(), "the retrain hung after its node was killed"
        assert "error" in outcome, f"the retrain succeeded without its second node: {outcome}"
        err = outcome["error"]
        print(f"killed worker node pid {killed_pid}; retrain failed with {type(err).__name__}: {err}"[:600])
        after = ModelRegistry(data + "/registry")
        assert after.current() == before_current  # the served model stays
        assert after.versions(include_partial=True) == before  # nothing published, not even a partial entry
        after.load()  # and it still loads whole
    finally:
        services.RayWorker(1).start()  # the cluster back to two nodes for whatever runs next
