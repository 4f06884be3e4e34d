"""How every process of a deployment reaches ``s3://`` (and other object-store) storage URIs.

Every storage URI of reloop (``storage.registry_uri``, ``storage.examples_uri``,
``feature_job.state_uri``, trainer checkpoints, Ray Train's ``storage_path``) is
opened with ``pyarrow.fs.FileSystem.from_uri`` (:func:`pipelines.checkpoint.filesystem`,
:func:`jobs.registry.open_filesystem`, Ray Train itself), so an S3 endpoint is not
a config key of each store: it is the standard AWS environment that pyarrow's
``from_uri``, Ray Train and s3fs all read (``AWS_ENDPOINT_URL`` for MinIO, s3proxy
or another S3-compatible store; keys from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
or the machine's role). Secrets therefore never sit in a config file.

What a driver must do is hand the same environment to the processes it starts on
other machines: :func:`storage_env` is the subset of its own environment that Ray
workers need (``runtime_env={"env_vars": storage_env()}``).

>>> env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "HOME": "/root", "AWS_REGION": "us-east-1"}
>>> sorted(storage_env(env))
['AWS_ENDPOINT_URL', 'AWS_REGION']
>>> is_object_store("s3://reloop/models"), is_object_store("/tmp/x")
(True, False)
"""

from __future__ import annotations

import os
from typing import Mapping

#: the environment variables object-store clients read (pyarrow's S3 via the AWS SDK, s3fs, gcsfs)
STORAGE_ENV_VARS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_EC2_METADATA_DISABLED",
    # S3-compatible servers that do not speak the SDK's newer default checksums need these two
    "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


def storage_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The object-store settings set in ``environ`` (default: this process), to forward to remote workers."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in STORAGE_ENV_VARS if k in environ}


def is_object_store(uri: str) -> bool:
    """True for a URI that is not a local path (``s3://``, ``gs://``, ``memory://``...; ``file://`` is local)."""
    return "://" in uri and not uri.startswith("file://")
