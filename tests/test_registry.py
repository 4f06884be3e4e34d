"""The model registry: versions, atomic current pointer, refusal of partial and corrupt entries."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import torch

from jobs.registry import MANIFEST, POINTER, WEIGHTS, CorruptEntryError, ModelRegistry, RegistryError, VersionNotFound


def _publish(reg: ModelRegistry, value: float = 1.0, **kw):
    return reg.publish(
        {"w": torch.full((3,), value), "b": torch.zeros(1)},
        model_config={"kind": "lr", "dim": 3},
        feature_service="ctr_v1",
        training_range={"ts_min": 0, "ts_max": 10},
        metrics={"auc": 0.71},
        **kw,
    )


@pytest.fixture(params=["local", "fsspec-memory"])
def reg(request, tmp_path) -> ModelRegistry:
    if request.param == "local":
        return ModelRegistry(str(tmp_path / "registry"))
    return ModelRegistry(f"memory://reg-{uuid.uuid4().hex[:8]}")


def test_publish_load_promote_rollback(reg):
    assert reg.current() is None
    with pytest.raises(VersionNotFound, match="no current version"):
        reg.load()
    e1 = _publish(reg, 1.0, promote=True)
    e2 = _publish(reg, 2.0)
    assert (e1.version, e2.version) == ("v000001", "v000002")
    assert reg.versions() == ["v000001", "v000002"]
    assert reg.current() == "v000001"  # publishing alone never switches
    reg.promote("v000002", reason="better auc")
    entry, w = reg.load()
    assert entry.version == "v000002" and w["w"].tolist() == [2.0, 2.0, 2.0]
    assert entry.model_config == {"kind": "lr", "dim": 3} and entry.metrics == {"auc": 0.71}
    assert entry.training_range == {"ts_min": 0, "ts_max": 10}
    assert reg.pointer()["previous"] == "v000001"
    assert reg.rollback() == "v000001"
    assert reg.current() == "v000001"


def test_unknown_version_named_in_error(reg):
    _publish(reg)
    with pytest.raises(VersionNotFound, match="v000009.*known: v000001"):
        reg.promote("v000009")
    with pytest.raises(VersionNotFound, match="not a version name"):
        reg.load("../etc")


def _corrupt(reg: ModelRegistry, version: str, name: str, data: bytes | None) -> None:
    path = reg._p("versions", version, name)
    if data is None:
        reg.fs.delete_file(path)
    else:
        reg._write(path, data)


@pytest.mark.parametrize(
    "damage,match",
    [
        ("truncate", "bytes, manifest says"),
        ("flip", "does not match its sha256"),
        ("no-manifest", "partial"),
        ("bad-json", "manifest.json does not match the sha256"),
        ("no-weights", "model.safetensors is missing"),
    ],
)
def test_corrupt_entries_are_refused_and_never_current(reg, damage, match):
    _publish(reg, 1.0, promote=True)
    v2 = _publish(reg, 2.0).version
    blob = reg._read(reg._p("versions", v2, WEIGHTS))
    if damage == "truncate":
        _corrupt(reg, v2, WEIGHTS, blob[:-7])
    elif damage == "flip":
        _corrupt(reg, v2, WEIGHTS, blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    elif damage == "no-manifest":
        _corrupt(reg, v2, MANIFEST, None)
    elif damage == "bad-json":
        _corrupt(reg, v2, MANIFEST, b"{not json")
    elif damage == "no-weights":
        _corrupt(reg, v2, WEIGHTS, None)
    with pytest.raises(CorruptEntryError, match=match):
        reg.promote(v2)
    assert reg.current() == "v000001"
    with pytest.raises(CorruptEntryError):
        reg.load(v2)
    if damage == "no-manifest":
        assert reg.versions() == ["v000001"]  # a partial entry is not listed
        assert _publish(reg).version == "v000003"  # and its number is never reused


def test_weights_that_are_not_safetensors_are_refused(reg):
    v = _publish(reg).version
    fake = b"\x80\x04\x95pickle-bytes-not-safetensors"
    manifest = json.loads(reg._read(reg._p("versions", v, MANIFEST)))
    import hashlib

    manifest["files"][WEIGHTS] = {"sha256": hashlib.sha256(fake).hexdigest(), "bytes": len(fake)}
    _corrupt(reg, v, WEIGHTS, fake)
    _corrupt(reg, v, MANIFEST, json.dumps(manifest).encode())
    from jobs.registry import SEAL, manifest_seal

    _corrupt(reg, v, SEAL, manifest_seal(json.dumps(manifest).encode(), None))  # a consistent forgery
    with pytest.raises(CorruptEntryError, match="not valid safetensors"):
        reg.promote(v)


def test_corrupt_pointer_is_a_clear_error(reg):
    _publish(reg, promote=True)
    reg._write(reg._p(POINTER), b"garbage")
    with pytest.raises(CorruptEntryError, match="CURRENT is unreadable"):
        reg.current()
    reg.promote("v000001")  # promoting repairs it
    assert reg.current() == "v000001"


def test_local_pointer_switch_is_atomic_and_leaves_no_temp_files(tmp_path):
    reg = ModelRegistry(str(tmp_path))
    for i in range(5):
        _publish(reg, float(i), promote=True)
    assert reg.current() == "v000005"
    leftovers = [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    leftovers += [n for n in os.listdir(tmp_path / "versions") if n.startswith(".stage-")]
    assert leftovers == []


def test_publish_requires_feature_service(reg):
    with pytest.raises(RegistryError, match="feature service"):
        reg.publish({"w": torch.ones(1)}, model_config={}, feature_service="")


def test_registry_reads_what_another_process_wrote(tmp_path):
    """Two registry objects on one directory (trainer and server) see each other's promotions."""
    a, b = ModelRegistry(str(tmp_path)), ModelRegistry(str(tmp_path))
    _publish(a, promote=True)
    assert b.current() == "v000001"
    _publish(b, promote=True)
    assert a.current() == "v000002"


def test_prune_keeps_newest_and_current_and_previous(reg):
    from jobs.registry import prune

    for i in range(6):
        _publish(reg, float(i))
    reg.promote("v000002")
    reg.promote("v000001")
    assert prune(reg, keep=2) == ["v000003", "v000004"]
    assert reg.versions() == ["v000001", "v000002", "v000005", "v000006"]
    assert _publish(reg).version == "v000007"  # numbers are never reused


# ------------------------------------------------------------------ issue 18: the manifest is covered


@pytest.mark.parametrize("edit", ["metrics", "feature_service", "encoder means"])
def test_an_edited_manifest_is_refused(reg, edit):
    v = _publish(reg).version
    path = reg._p("versions", v, MANIFEST)
    m = json.loads(reg._read(path))
    if edit == "metrics":
        m["metrics"] = {"auc": 0.99}
    elif edit == "feature_service":
        m["feature_service"] = "attacker_fs"
    else:
        m.setdefault("extra", {})["encoder"] = {"means": {"user_ctr_7d": 1e6}}
    reg._write(path, json.dumps(m, indent=2, sort_keys=True).encode())
    with pytest.raises(CorruptEntryError, match="does not match the sha256"):
        reg.promote(v)
    with pytest.raises(CorruptEntryError):
        reg.load(v)


def test_hmac_seal_with_a_key_from_the_environment(reg, monkeypatch):
    from jobs.registry import HMAC_KEY_ENV, SEAL, manifest_seal

    monkeypatch.setenv(HMAC_KEY_ENV, "k3y")
    v = _publish(reg).version
    reg.promote(v)
    assert reg.load(v)[0].version == v
    # a forger who edits the manifest and recomputes its sha256 has no key
    path = reg._p("versions", v, MANIFEST)
    m = json.loads(reg._read(path))
    m["metrics"] = {"auc": 0.99}
    forged = json.dumps(m).encode()
    reg._write(path, forged)
    reg._write(reg._p("versions", v, SEAL), manifest_seal(forged, None))
    with pytest.raises(CorruptEntryError, match="no HMAC"):
        reg.load(v)
    reg._write(reg._p("versions", v, SEAL), manifest_seal(forged, b"wrong-key"))
    with pytest.raises(CorruptEntryError, match="does not verify"):
        reg.load(v)
    monkeypatch.delenv(HMAC_KEY_ENV)
    with pytest.raises(CorruptEntryError, match="HMAC-signed"):
        reg.load(v)


def test_versions_skips_the_names_a_poller_has_seen(reg):
    a, b, c = (_publish(reg, float(i)).version for i in range(3))
    assert reg.versions(skip={a, b}) == [c] and reg.versions(skip=set()) == [a, b, c]
