"""Decode the records of Kafka record batches (message format v2) into NumPy/Arrow columns, vectorised.

kafka-python turns every record into a ``ConsumerRecord`` through several
layers of Python calls (~10 µs a record, most of a feature job's read time).
The fetch response already holds the records as bytes, laid out by the v2
format (``Record`` in Kafka's ``DefaultRecord.java``)::

    length: varint | attributes: int8 | timestampDelta: varlong | offsetDelta: varint
    keyLength: varint | key | valueLength: varint | value | headers

Only the chain of ``length`` prefixes is sequential (a short Python loop);
every field after it is read for all records at once with NumPy, and keys and
values become Arrow binary arrays without one Python ``bytes`` per record.
Batch framing and decompression stay kafka-python's
(:class:`kafka.record.MemoryRecords`, ``DefaultRecordBatch``); control
batches (transaction markers) carry no data and are skipped. Headers are not
decoded (the event contract does not use them); a record's ``length`` covers
them, so they are stepped over.

>>> from kafka.record import MemoryRecordsBuilder
>>> b = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 20, offset=7)
>>> for i, v in enumerate([b'{"a": 1}', b'', None]):
...     _ = b.append(timestamp=1000 + i, key=b'k%d' % i if i else None, value=v, headers=[])
>>> b.close()
>>> cols = decode_records(b.buffer())
>>> cols.offsets.tolist(), cols.keys.to_pylist(), cols.values.to_pylist()
([7, 8, 9], [None, b'k1', b'k2'], [b'{"a": 1}', b'', None])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from kafka.errors import CorruptRecordError
from kafka.record import MemoryRecords

_MAX_VARINT = 10  # a varlong takes at most 10 bytes


@dataclass(frozen=True)
class RecordColumns:
    """Offsets, keys and values of decoded records (``next_offset``: where the next fetch starts)."""

    offsets: np.ndarray  # int64
    keys: pa.BinaryArray
    values: pa.BinaryArray
    next_offset: int

    def __len__(self) -> int:
        return len(self.offsets)

    def slice(self, lo: int, hi: int) -> RecordColumns:
        """Records ``[lo, hi)`` by position (``next_offset`` is kept)."""
        return RecordColumns(self.offsets[lo:hi], self.keys[lo:hi], self.values[lo:hi], self.next_offset)


def decode_records(records: bytes | memoryview | None, fetch_offset: int = 0) -> RecordColumns:
    """The data records of a fetch response's ``records`` bytes with offset ``>= fetch_offset``.

    A truncated last batch (the broker cuts a response at the byte limit) is ignored; ``next_offset``
    is the offset after the last complete batch, so the next fetch continues from there.
    """
    sections, starts, bases = [], [], []
    size = 0
    next_offset = fetch_offset
    mr = MemoryRecords(bytes(records or b""))
    while (batch := mr.next_batch()) is not None:
        next_offset = max(next_offset, batch.next_offset)
        if batch.magic != 2:
            raise CorruptRecordError(
                f"record batch at offset {batch.base_offset} has message format "
                f"v{batch.magic}; only v2 (Kafka >= 0.11) is supported"
            )
        if batch.is_control_batch or batch.next_offset <= fetch_offset or batch.records_count == 0:
            continue
        batch._maybe_uncompress()  # kafka-python's codecs; afterwards _buffer[_pos:] holds the records
        section = bytes(memoryview(batch._buffer)[batch._pos :])
        starts.append(_record_starts(section, batch.records_count, batch.base_offset) + size)
        bases.append(np.full(batch.records_count, batch.base_offset, np.int64))
        size += len(section)
        sections.append(section)
    if not sections:
        empty = pa.array([], pa.binary())
        return RecordColumns(np.empty(0, np.int64), empty, empty, next_offset)
    buf = np.frombuffer(b"".join(sections), np.uint8)
    offsets, keys, values = _decode_fields(buf, np.concatenate(starts), np.concatenate(bases))
    if offsets[0] < fetch_offset:  # the first batch began before the fetch position
        first = int(np.searchsorted(offsets, fetch_offset))
        offsets, keys, values = offsets[first:], keys[first:], values[first:]
    return RecordColumns(offsets, keys, values, next_offset)


def _decode_fields(
    buf: np.ndarray, starts: np.ndarray, bases: np.ndarray
) -> tuple[np.ndarray, pa.BinaryArray, pa.BinaryArray]:
    """Every record's fields at once, given where each record starts in ``buf``.

    The starts come from the same length prefixes (:func:`_record_starts`), so each record's body ends
    where the next begins; what is left to check is that its fields stay inside it.
    """
    pos = starts.copy()
    length, size = _varints(buf, pos)
    pos += size
    body_end = pos + length
    pos += 1  # attributes
    _, size = _varints(buf, pos)  # timestampDelta: not needed, the event carries its own ts
    pos += size
    offset_delta, size = _varints(buf, pos)
    pos += size
    keys, pos = _bytes_field(buf, pos)
    values, pos = _bytes_field(buf, pos)
    if (pos > body_end).any():
        raise CorruptRecordError("record fields overrun their lengths in a record batch")
    return bases + offset_delta, keys, values


def _record_starts(section: bytes, n: int, base_offset: int) -> np.ndarray:
    """Byte position of each of the ``n`` records: the one sequential step (a chain of length varints)."""
    starts = np.empty(n, np.int64)
    pos, end = 0, len(section)
    for i in range(n):
        if pos >= end:
            raise CorruptRecordError(f"record batch at offset {base_offset} ends after {i} of {n} records")
        starts[i] = pos
        b = section[pos]
        shift, raw, p = 0, 0, pos
        while b & 0x80:
            raw |= (b & 0x7F) << shift
            shift += 7
            p += 1
            b = section[p]
        raw |= b << shift
        pos = p + 1 + ((raw >> 1) ^ -(raw & 1))
    if pos != end:
        raise CorruptRecordError(f"record batch at offset {base_offset}: {end - pos} bytes after its {n} records")
    return starts


def _varints(buf: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zig-zag varints starting at each position: (values, byte sizes), for all positions at once."""
    idx = pos[:, None] + np.arange(_MAX_VARINT)
    np.minimum(idx, len(buf) - 1, out=idx)
    raw = buf[idx].astype(np.uint64)
    cont = (raw & 0x80) != 0
    size = np.argmin(cont, axis=1) + 1  # first byte without the continuation bit
    if cont[np.arange(len(pos)), size - 1].any():
        raise CorruptRecordError("a varint runs past 10 bytes")
    used = np.arange(_MAX_VARINT) < size[:, None]
    payload = np.where(used, raw & 0x7F, 0) << (np.arange(_MAX_VARINT, dtype=np.uint64) * 7)
    u = np.bitwise_or.reduce(payload, axis=1)
    return ((u >> 1).astype(np.int64) ^ -(u & 1).astype(np.int64)), size


def _bytes_field(buf: np.ndarray, pos: np.ndarray) -> tuple[pa.BinaryArray, np.ndarray]:
    """A length-prefixed byte field at each position (length -1 = null) -> Arrow array, positions after."""
    length, size = _varints(buf, pos)
    start = pos + size
    valid = length >= 0
    n_bytes = np.where(valid, length, 0)
    ends = start + n_bytes
    if len(ends) and ends.max() > len(buf):
        raise CorruptRecordError("a key or value runs past the end of its record batch")
    # gather the field's bytes into one contiguous buffer: mark [start, end) ranges, keep marked bytes
    marks = np.zeros(len(buf) + 1, np.int8)
    nz = n_bytes > 0
    marks[start[nz]] = 1
    marks[ends[nz]] -= 1
    data = buf[np.cumsum(marks[:-1], dtype=np.int8).view(bool)] if nz.any() else np.empty(0, np.uint8)
    value_offsets = np.zeros(len(pos) + 1, np.int64)
    np.cumsum(n_bytes, out=value_offsets[1:])
    validity = None if valid.all() else pa.array(valid).buffers()[1]
    arr = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(),
        len(pos),
        [validity, pa.py_buffer(value_offsets), pa.py_buffer(data)],
        null_count=int((~valid).sum()),
    )
    return arr.cast(pa.binary()), ends
