"""Where reloop keeps files: one opener for every URI, one atomic write.

Every store of the system (training examples, feature-job state, Feast offline files, the model
registry, trainer checkpoints, monitor state) opens its URI here: a local path (relative is
fine), any ``pyarrow.fs`` URI (``s3://``, ``gs://``, ``hdfs://``) or any fsspec URI
(``memory://``, ...). Writes that readers must see whole or not at all go through
:func:`write_bytes_atomic`.

>>> import tempfile, os
>>> root = tempfile.mkdtemp()
>>> fs, path, local = open_filesystem(root)
>>> type(fs).__name__, path == os.path.abspath(root), local
('LocalFileSystem', True, True)
>>> write_bytes_atomic(fs, f"{path}/a/b.json", b"{}")
>>> sorted(os.listdir(f"{root}/a"))
['b.json']
>>> fs, _, local = open_filesystem("memory://models")
>>> type(fs).__name__, local
('PyFileSystem', False)

Object stores: an S3 endpoint is not a config key of each store but the standard AWS
environment that pyarrow's ``from_uri``, Ray Train and s3fs all read (``AWS_ENDPOINT_URL``
for MinIO, s3proxy or another S3-compatible store; keys from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` or the machine's role), so secrets never sit in a config file.
A driver hands the same environment to the processes it starts elsewhere:
:func:`storage_env` is the subset of its own environment that Ray workers need
(``runtime_env={"env_vars": storage_env()}``).

>>> env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "HOME": "/root", "AWS_REGION": "us-east-1"}
>>> sorted(storage_env(env))
['AWS_ENDPOINT_URL', 'AWS_REGION']
>>> is_object_store("s3://reloop/models"), is_object_store("/tmp/x")
(True, False)
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from online_models.errors import ReloopError


class StorageError(ReloopError, ValueError):
    """A storage URI that no filesystem here can open."""


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str, bool]:
    """``(filesystem, root path, is_local)`` for a local path, a pyarrow URI or an fsspec URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri), True
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        fs = None
    if fs is not None:
        return fs, path, isinstance(fs, pafs.LocalFileSystem)
    # fsspec covers what pyarrow does not (memory://, and any fsspec plug-in). Imported here on purpose: it is
    # no declared dependency (it ships with the stack: Feast, Ray) and only those URIs need it
    import fsspec

    try:
        ffs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as e:
        raise StorageError(f"{uri}: unsupported filesystem URI: {e}") from e
    return pafs.PyFileSystem(pafs.FSSpecHandler(ffs)), path, False


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes, *, durable: bool = True) -> None:
    """Readers see all of ``data`` at ``path`` or nothing: local disk writes a temporary dot-name
    (skipped by directory readers and globs), fsyncs it if ``durable`` and renames it into place;
    an object store takes one whole-object PUT, which is atomic there."""
    parent = posixpath.dirname(path) if not isinstance(fs, pafs.LocalFileSystem) else os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_parquet_atomic(fs: pafs.FileSystem, path: str, table: pa.Table, *, durable: bool = True) -> None:
    """``table`` as one Parquet file at ``path``, written with :func:`write_bytes_atomic`."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy")
    write_bytes_atomic(fs, path, sink.getvalue().to_pybytes(), durable=durable)


#: the environment variables object-store clients read (pyarrow's S3 via the AWS SDK, s3fs, gcsfs)
STORAGE_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_EC2_METADATA_DISABLED",
    # S3-compatible servers that do not speak the SDK's newer default checksums need these two
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


def storage_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The object-store settings set in ``environ`` (default: this process), to forward to remote workers."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in STORAGE_ENV_VARS if k in environ}


def is_object_store(uri: str) -> bool:
    """True for a URI that is not a local path (``s3://``, ``gs://``, ``memory://``...; ``file://`` is local)."""
    return "://" in uri and not uri.startswith("file://")
