"""Where the incremental trainer keeps its checkpoints: a local directory or any pyarrow.fs / fsspec URI.

A checkpoint is a directory ``ckpt-<seq>/`` of whole files, and ``LATEST``
names the newest complete one. On a local disk the directory is staged
under a temporary name and renamed into place, and ``LATEST`` is replaced
atomically (``os.replace``); on an object store every file is one whole-object
write and ``LATEST`` is written last, so a reader never follows it to a
partial checkpoint.

>>> import tempfile
>>> store = CheckpointStore(tempfile.mkdtemp())
>>> store.commit("ckpt-000001", {"state.json": b"{}"})
>>> store.latest(), store.read("ckpt-000001", "state.json")
('ckpt-000001', b'{}')
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.storage import open_filesystem, write_bytes_atomic

LATEST = "LATEST"


class CheckpointStore:
    """Checkpoint directories plus an atomically switched ``LATEST`` pointer under ``uri``."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root, self.local = open_filesystem(uri)
        self.fs.create_dir(self.root, recursive=True)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts) if self.local else posixpath.join(self.root, *parts)

    def read(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def write(self, data: bytes, *parts: str, durable: bool = True) -> None:
        """One small file (pointer, heartbeat): atomic replace on a local disk (fsynced if ``durable``),
        one whole-object write elsewhere."""
        write_bytes_atomic(self.fs, self.path(*parts), data, durable=durable)

    def commit(self, name: str, files: dict[str, bytes]) -> None:
        """Write checkpoint ``name`` whole, then point ``LATEST`` at it."""
        if self.local:
            stage = self.path(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
            os.makedirs(stage)
            for fname, data in files.items():
                with open(os.path.join(stage, fname), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            shutil.rmtree(self.path(name), ignore_errors=True)  # a stale one from before a crash
            os.rename(stage, self.path(name))
        else:
            self.fs.create_dir(self.path(name), recursive=True)
            for fname, data in files.items():
                with self.fs.open_output_stream(self.path(name, fname)) as f:
                    f.write(data)
        self.write(json.dumps({"name": name}).encode(), LATEST)

    def latest(self) -> str | None:
        """The newest complete checkpoint's name, or None."""
        try:
            raw = self.read(LATEST)
        except FileNotFoundError:
            return None
        try:
            return str(json.loads(raw)["name"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.path(LATEST)} is unreadable: {e}") from None

    def gc(self, keep: int) -> None:
        """Delete all but the newest ``keep`` checkpoints (never the one ``LATEST`` names)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        names = sorted(
            i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("ckpt-")
        )
        latest = self.latest()
        for n in names[:-keep]:
            if n != latest:
                self.fs.delete_dir(self.path(n))

    def write_table(self, table: pa.Table, *parts: str) -> None:
        """A Parquet file (the prediction log), written whole."""
        self.fs.create_dir(self.path(*parts[:-1]), recursive=True)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write(sink.getvalue().to_pybytes(), *parts)
