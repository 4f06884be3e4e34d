"""A versioned model registry with an atomically switched current version.

Layout under the registry root (a local directory by default, or any
``pyarrow.fs`` URI such as ``s3://bucket/models``, or any fsspec URI)::

    versions/v000001/model.safetensors   weights (safetensors: never pickled)
    versions/v000001/manifest.json       written LAST: config, feature service,
                                         training range, metrics, and the sha256
                                         and size of every file of the entry
    versions/v000001/manifest.seal       sha256 of the manifest's exact bytes, and
                                         an HMAC-SHA256 of them when a key is set
    CURRENT                              {"version": ..., "previous": ..., ...}

An entry without a readable manifest is partial (a writer crashed) and is
skipped by :meth:`ModelRegistry.versions`; an entry whose files do not match
the sizes and hashes of its manifest is corrupt. Neither can be loaded or
promoted: both raise :class:`CorruptEntryError` naming the file and the
problem. On a local disk an entry is staged in a temporary directory and
renamed into place, and ``CURRENT`` is replaced with ``os.replace``; on an
object store each object is written whole in one request, the manifest after
the weights and the pointer after the manifest, so readers never see a half
entry become current.

The manifest (metrics, feature service, encoder means...) is covered too: its
seal holds its sha256, checked on every read, so an edited manifest is refused
like edited weights. A hash alone catches accidents; against someone who can
write the registry, set ``RELOOP_REGISTRY_HMAC_KEY`` (for writers and readers):
seals then carry an HMAC with that key, readers with the key require and check
it, and a reader without the key refuses signed entries rather than trust them.

>>> import tempfile, torch
>>> reg = ModelRegistry(tempfile.mkdtemp())
>>> e = reg.publish({"w": torch.ones(2)}, model_config={"kind": "lr"}, feature_service="ctr_v1",
...                 metrics={"auc": 0.7}, promote=True)
>>> e.version, reg.current()
('v000001', 'v000001')
>>> entry, weights = reg.load()
>>> entry.feature_service, weights["w"].tolist()
('ctr_v1', [1.0, 1.0])
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import posixpath
import re
import time
import uuid
from collections.abc import Container, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs
from safetensors import SafetensorError
from safetensors.torch import load, save

from online_models.errors import ReloopError
from online_models.models import ModelConfig, build_model
from pipelines.storage import open_filesystem, write_bytes_atomic

FORMAT = "reloop.registry/1"
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
SEAL = "manifest.seal"
HMAC_KEY_ENV = "RELOOP_REGISTRY_HMAC_KEY"


def manifest_seal(manifest: bytes, key: bytes | None) -> bytes:
    """The seal file of a manifest: its sha256 and, with ``key``, an HMAC-SHA256 of it."""
    seal = {"sha256": hashlib.sha256(manifest).hexdigest()}
    if key:
        seal["hmac_sha256"] = hmac.new(key, manifest, hashlib.sha256).hexdigest()
    return json.dumps(seal, sort_keys=True).encode()


def _hmac_key() -> bytes | None:
    value = os.environ.get(HMAC_KEY_ENV)
    return value.encode() if value else None


POINTER = "CURRENT"
VERSION_RE = re.compile(r"^v(\d{6,})$")


class RegistryError(ReloopError, RuntimeError):
    """Base class of registry errors; the message names the registry and the version."""


class VersionNotFound(RegistryError):
    """The version (or a current version) does not exist."""


class CorruptEntryError(RegistryError):
    """An entry that is partial, tampered with or unreadable; it is never loaded or promoted."""


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about one version (the parsed manifest)."""

    version: str
    model_config: dict[str, Any]
    feature_service: str
    training_range: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}


class ModelRegistry:
    """Versioned model entries plus an atomically switched ``CURRENT`` pointer.

    ``uri``: a local directory (default of the config: ``.state/registry``), or any
    ``pyarrow.fs`` / fsspec URI. Loading never unpickles: weights are safetensors.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root, self.local = open_filesystem(uri)
        self.fs.create_dir(self._p("versions"), recursive=True)

    def __repr__(self) -> str:
        return f"ModelRegistry({self.uri!r})"

    # ---- paths and raw I/O -------------------------------------------------------------------
    def _p(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if not self.local else os.path.join(self.root, *parts)

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def _write(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def _write_atomic(self, path: str, data: bytes) -> None:
        write_bytes_atomic(self.fs, path, data)

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    # ---- versions --------------------------------------------------------------------------------
    def _numbers(self) -> list[int]:
        infos = self.fs.get_file_info(pafs.FileSelector(self._p("versions"), allow_not_found=True))
        out = []
        for info in infos:
            m = VERSION_RE.match(info.base_name)
            if m and info.type == pafs.FileType.Directory:
                out.append(int(m.group(1)))
        return sorted(out)

    def versions(self, include_partial: bool = False, skip: Container[str] = ()) -> list[str]:
        """Version names in publication order; partial entries (no manifest) are left out.

        ``skip``: names the caller has already seen, left out without a look at their manifest (a poller that
        asks often would otherwise pay one file-info request per version ever published, each time).
        """
        names = [v for v in (f"v{n:06d}" for n in self._numbers()) if v not in skip]
        if include_partial:
            return names
        return [v for v in names if self._exists(self._p("versions", v, MANIFEST))]

    def publish(
        self,
        state_dict: Mapping[str, Any],
        *,
        model_config: Mapping[str, Any],
        feature_service: str,
        training_range: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        extra: Mapping[str, Any] | None = None,
        promote: bool = False,
    ) -> ModelEntry:
        """Write a new version (weights, then manifest) and optionally make it current."""

        if not feature_service:
            raise RegistryError(f"{self.uri}: publish needs a feature service name")
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        blob = save(tensors)
        files = {WEIGHTS: {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}}
        for _attempt in range(20):
            nums = self._numbers()
            version = f"v{(nums[-1] + 1 if nums else 1):06d}"
            entry = ModelEntry(
                version=version,
                model_config=_jsonable(model_config),
                feature_service=feature_service,
                training_range=_jsonable(training_range or {}),
                metrics={k: float(v) for k, v in (metrics or {}).items()},
                extra=_jsonable(extra or {}),
                created_at=time.time(),
                files=files,
            )
            manifest = json.dumps(entry.to_dict(), indent=2, sort_keys=True).encode()
            seal = manifest_seal(manifest, _hmac_key())
            if self.local:
                # stage the whole entry, then rename the directory into place: atomic, and a
                # concurrent writer that took the same number makes the rename fail -> next number
                stage = self._p("versions", f".stage-{uuid.uuid4().hex[:8]}")
                os.makedirs(stage)
                for name, data in ((WEIGHTS, blob), (SEAL, seal), (MANIFEST, manifest)):
                    with open(os.path.join(stage, name), "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                try:
                    os.rename(stage, self._p("versions", version))
                except OSError:
                    for name in (WEIGHTS, SEAL, MANIFEST):
                        os.unlink(os.path.join(stage, name))
                    os.rmdir(stage)
                    continue
            else:
                d = self._p("versions", version)
                self.fs.create_dir(d, recursive=True)
                self._write(posixpath.join(d, WEIGHTS), blob)
                self._write(posixpath.join(d, SEAL), seal)
                self._write(posixpath.join(d, MANIFEST), manifest)  # last: marks the entry complete
            if promote:
                self.promote(version)
            return entry
        raise RegistryError(f"{self.uri}: could not allocate a version number (too many concurrent writers)")

    def entry(self, version: str) -> ModelEntry:
        """The parsed manifest of a version; raises if it is missing, partial or malformed."""
        if not VERSION_RE.match(version or ""):
            raise VersionNotFound(f"{self.uri}: {version!r} is not a version name (expected like v000001)")
        d = self._p("versions", version)
        if not self._exists(d):
            raise VersionNotFound(f"{self.uri}: no version {version}; known: {', '.join(self.versions()) or 'none'}")
        path = self._p("versions", version, MANIFEST)
        try:
            data = self._read(path)
            self._check_seal(version, data)
            raw = json.loads(data)
        except FileNotFoundError:
            raise CorruptEntryError(
                f"{self.uri}: version {version} is partial: {MANIFEST} is missing (its writer did not finish)"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptEntryError(f"{self.uri}: version {version}: {MANIFEST} is not valid JSON: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise CorruptEntryError(
                f"{self.uri}: version {version}: {MANIFEST} has format "
                f"{raw.get('format') if isinstance(raw, dict) else None!r}, expected {FORMAT!r}"
            )
        raw.pop("format")
        try:
            entry = ModelEntry(**raw)
        except TypeError as e:
            raise CorruptEntryError(f"{self.uri}: version {version}: {MANIFEST} fields are wrong: {e}") from None
        if entry.version != version:
            raise CorruptEntryError(f"{self.uri}: version {version}: manifest says it is {entry.version}")
        if WEIGHTS not in entry.files:
            raise CorruptEntryError(f"{self.uri}: version {version}: manifest lists no {WEIGHTS}")
        return entry

    def _check_seal(self, version: str, manifest: bytes) -> None:
        """The manifest's bytes match its seal (sha256, and the HMAC when a key is set or the seal has one)."""
        try:
            seal = json.loads(self._read(self._p("versions", version, SEAL)))
        except FileNotFoundError:
            raise CorruptEntryError(
                f"{self.uri}: version {version}: {SEAL} is missing; the manifest cannot be "
                f"verified (published before seals, or tampered with)"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptEntryError(f"{self.uri}: version {version}: {SEAL} is not valid JSON: {e}") from None
        if not isinstance(seal, dict) or not hmac.compare_digest(
            str(seal.get("sha256", "")), hashlib.sha256(manifest).hexdigest()
        ):
            raise CorruptEntryError(
                f"{self.uri}: version {version}: {MANIFEST} does not match the sha256 in {SEAL} (edited or corrupt)"
            )
        key = _hmac_key()
        mac = seal.get("hmac_sha256")
        if key is None and mac is not None:
            raise CorruptEntryError(
                f"{self.uri}: version {version} is HMAC-signed but ${HMAC_KEY_ENV} is not set "
                f"here: refusing to load it unverified"
            )
        if key is not None:
            if mac is None:
                raise CorruptEntryError(
                    f"{self.uri}: version {version}: {SEAL} has no HMAC but ${HMAC_KEY_ENV} is "
                    f"set: an unsigned entry is refused"
                )
            if not hmac.compare_digest(str(mac), hmac.new(key, manifest, hashlib.sha256).hexdigest()):
                raise CorruptEntryError(
                    f"{self.uri}: version {version}: the manifest's HMAC does not verify "
                    f"(tampered with, or another key)"
                )

    def load(self, version: str | None = None) -> tuple[ModelEntry, dict[str, Any]]:
        """``(entry, state dict)`` of a version (default: current), after checking sizes and hashes."""

        version = version or self._require_current()
        entry = self.entry(version)
        blobs = {}
        for name, meta in entry.files.items():
            try:
                data = self._read(self._p("versions", version, name))
            except FileNotFoundError:
                raise CorruptEntryError(f"{self.uri}: version {version}: {name} is missing") from None
            if len(data) != meta.get("bytes"):
                raise CorruptEntryError(
                    f"{self.uri}: version {version}: {name} has {len(data)} bytes, "
                    f"manifest says {meta.get('bytes')} (truncated or replaced)"
                )
            if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
                raise CorruptEntryError(
                    f"{self.uri}: version {version}: {name} does not match its sha256 "
                    f"in the manifest (corrupt or tampered with)"
                )
            blobs[name] = data
        try:
            weights = load(blobs[WEIGHTS])
        except (SafetensorError, ValueError) as e:
            raise CorruptEntryError(f"{self.uri}: version {version}: {WEIGHTS} is not valid safetensors: {e}") from e
        return entry, weights

    def verify(self, version: str) -> ModelEntry:
        """Check an entry end to end (manifest, sizes, hashes, safetensors header); returns the entry."""
        return self.load(version)[0]

    # ---- the current pointer ---------------------------------------------------------------------
    def pointer(self) -> dict[str, Any] | None:
        """The raw ``CURRENT`` record (version, previous, promoted_at), or None before any promotion."""
        try:
            data = self._read(self._p(POINTER))
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(data)
            if not isinstance(rec, dict) or not VERSION_RE.match(str(rec.get("version"))):
                raise ValueError(f"no valid version in {rec!r}")
        except ValueError as e:
            raise CorruptEntryError(
                f"{self.uri}: {POINTER} is unreadable ({e}); promote a version to repair it"
            ) from None
        return rec

    def current(self) -> str | None:
        """The current version name, or None if nothing was promoted yet."""
        rec = self.pointer()
        return rec["version"] if rec else None

    def _require_current(self) -> str:
        v = self.current()
        if v is None:
            raise VersionNotFound(f"{self.uri}: no current version yet (publish and promote one first)")
        return v

    def promote(self, version: str, reason: str = "") -> ModelEntry:
        """Make ``version`` current after verifying it end to end; a bad entry raises and changes nothing."""
        entry = self.verify(version)
        try:
            prev = self.pointer()
        except CorruptEntryError:
            prev = None  # promoting repairs a damaged pointer
        rec = {
            "version": version,
            "previous": prev["version"] if prev else None,
            "promoted_at": time.time(),
            "reason": reason,
        }
        self._write_atomic(self._p(POINTER), json.dumps(rec, sort_keys=True).encode())
        return entry

    def rollback(self, reason: str = "rollback") -> str:
        """Make the previously current version current again; returns it."""
        rec = self.pointer()
        if not rec or not rec.get("previous"):
            raise VersionNotFound(f"{self.uri}: nothing to roll back to (no previous current version)")
        self.promote(rec["previous"], reason=reason)
        return rec["previous"]


def prune(registry: ModelRegistry, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions, never the current or previous one; returns the deleted."""
    if keep < 1:  # the newest version always stays, so its number is never handed out again
        raise RegistryError(f"keep must be >= 1, got {keep}")
    rec = registry.pointer() or {}
    protected = {rec.get("version"), rec.get("previous")}
    names = registry.versions(include_partial=True)
    doomed = [v for v in names[: max(0, len(names) - keep)] if v not in protected]
    for v in doomed:
        registry.fs.delete_dir(registry._p("versions", v))
    return doomed


def load_model(registry: ModelRegistry, version: str | None = None):
    """``(entry, model)``: rebuild the torch model of a version from its config and weights (eval mode)."""

    entry, weights = registry.load(version)
    model = build_model(ModelConfig.from_dict(entry.model_config))
    model.load_state_dict(weights)
    model.eval()
    return entry, model


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so a manifest can never hold something JSON cannot restore."""
    return json.loads(json.dumps(obj, default=_default))


def _default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable in a registry manifest: {type(o).__name__}")
