"""The config file is one schema composed from the layers' sections; each layer reads its own."""

import pytest

from features.windows import WINDOWS_MS, feature_service_name, feature_set_version
from jobs.config import load_jobs_config
from online_models.errors import ConfigError, ReloopError
from online_models.settings import SERVING_MEMORY
from pipelines.config import load_pipeline_config
from reloop.config import ReloopConfig, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_each_layer_reads_its_sections_of_the_same_file(tmp_path):
    p = write(tmp_path, "kafka: {partitions: 2}\ndrift: {policy: {min_evidence: 3}}\nmemory: {key: hidden}\n")
    assert load_pipeline_config(p).kafka.partitions == 2  # the stream layer ignores drift/memory
    jobs = load_jobs_config(p)
    assert jobs.kafka.partitions == 2 and jobs.drift.policy.min_evidence == 3 and jobs.memory.key == "hidden"
    assert load_config(p).memory.settings()["key"] == "hidden"


def test_the_top_rejects_a_section_no_layer_declares_and_names_file_and_field(tmp_path):
    p = write(tmp_path, "kafak: {partitions: 2}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: kafak: unknown key"):
        load_config(p)
    bad = write(tmp_path, "memory: {key: whatever}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: memory\.key"):
        load_config(bad)


def test_trainer_and_gate_sections_set_the_run_and_the_flags_override_them(tmp_path):
    from reloop.run import LoopRun, RunOptions

    p = write(
        tmp_path,
        "model: {kind: lr, hidden_sizes: [16], embedding_l2: 0.001}\n"
        "trainer: {batch_size: 64, refresh_every: 500}\ngate: {level: 0.8}\n",
    )
    cfg = load_config(p)
    run = LoopRun(cfg, RunOptions(refresh_every=2000, state_root=str(tmp_path / "runs"), run_id="t"))
    o = run.opts
    assert (o.model, o.train_batch, o.refresh_every, o.gate_level, o.gate_events) == ("lr", 64, 2000, 0.8, 1000)
    tc = run._trainer_config()
    assert (tc.model_kind, tc.batch_size, tc.optimizer, tc.lr) == ("lr", 64, "adagrad", 0.1)
    assert (tc.architecture["hidden_sizes"], tc.architecture["embedding_l2"]) == ([16], 0.001)
    for bad, where in (
        ("model: {kind: xgboost}\n", r"model\.kind"),
        ("model: {hidden_sizes: [64, 0]}\n", r"model\.hidden_sizes"),
        ("model: {dropout: 1.0}\n", r"model\.dropout"),
        ("trainer: {model: dcnv2}\n", r"trainer\.model"),  # the kind moved to model.kind
        ("gate: {level: 1.5}\n", r"gate\.level"),
        ("trainer: {batch_size: 0}\n", r"trainer\.batch_size"),
    ):
        with pytest.raises(ConfigError, match=where):
            load_config(write(tmp_path, bad))


def test_memory_defaults_are_the_validated_serving_memory():
    assert ReloopConfig().memory.settings() == SERVING_MEMORY


def test_every_error_is_a_reloop_error():
    assert issubclass(ConfigError, ReloopError)


def test_feature_service_version_follows_the_windows():
    assert feature_service_name("dcnv2") == "ctr_dcnv2_v1"
    with pytest.raises(ValueError, match="no feature-set version"):
        feature_set_version((*WINDOWS_MS, ("30d", 30 * 86_400_000)))


def test_one_architecture_for_the_trainer_the_retrain_and_the_evaluation():
    from online_models.encoding import EncoderConfig
    from online_models.models import build_model, model_config_for
    from reloop.evaluate import EvaluationConfig

    section = ReloopConfig().model
    ev = EvaluationConfig()
    assert section.architecture() == {
        "embedding_dim": ev.embedding_dim,
        "hidden_sizes": list(ev.hidden_sizes),
        "cross_layers": 2,
        "dropout": ev.dropout,
        "embedding_l2": ev.embedding_l2,
    }
    assert section.hash_buckets == ev.hash_buckets
    enc = EncoderConfig(numeric_fields=("user_ctr_1d",), bag_fields=("item_genres",), hash_buckets=101)
    mc = model_config_for("dcnv2", enc, {"hidden_sizes": [16], "embedding_dim": 4})
    assert (mc.num_categorical, mc.num_bags, mc.num_numeric, mc.hash_buckets) == (2, 1, 1, 101)
    assert build_model(mc).hidden_dim == 16
    with pytest.raises(ReloopError, match="unknown model architecture field"):
        model_config_for("dcnv2", enc, {"hidden": [16]})
