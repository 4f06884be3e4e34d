"""Dataset readers: MovieLens from the installed wheel, CSV/Parquet files, clear errors."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reloop.datasets import DatasetError, load_dataset


def test_movielens_100k_from_the_installed_wheel():
    t = load_dataset("movielens-100k")
    assert t.num_rows == 100_000
    assert t.column_names[:5] == ["event_id", "ts", "user_id", "item_id", "label"]
    ts = t["ts"].to_numpy()
    assert (ts[1:] >= ts[:-1]).all(), "sorted by event time"
    assert len(set(t["user_id"].to_pylist())) == 943 and len(set(t["item_id"].to_pylist())) == 1682
    # 1997-09 .. 1998-04, in epoch ms
    assert 874_700_000_000 < ts[0] < ts[-1] < 893_300_000_000
    assert 0.5 < sum(t["label"].to_pylist()) / t.num_rows < 0.6  # rating >= 4 is ~55%
    assert len(set(t["event_id"].to_pylist())) == t.num_rows


def test_limit_keeps_the_first_events_in_time():
    t = load_dataset("movielens-100k", limit=10)
    full = load_dataset("movielens-100k")
    assert t.num_rows == 10 and t["event_id"].to_pylist() == full["event_id"].to_pylist()[:10]


def test_parquet_with_context_and_event_ids(tmp_path):
    p = tmp_path / "e.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": [1, 2],
                "item_id": [7, 8],
                "timestamp": [5, 3],
                "label": [1, 0],
                "event_id": ["x", "y"],
                "hour": [3, 4],
            }
        ),
        p,
    )
    t = load_dataset(str(p))
    assert t["event_id"].to_pylist() == ["y", "x"]
    assert t["user_id"].to_pylist() == ["2", "1"] and t["hour"].to_pylist() == [4, 3]


@pytest.mark.parametrize(
    "content,message",
    [
        ("user_id,item_id,label\n1,2,1\n", r"missing column\(s\) timestamp"),
        ("user_id,item_id,timestamp,label\n", "no rows"),
        ("user_id,item_id,timestamp,label\n1,2,abc,1\n", "timestamp"),
        ("user_id,item_id,timestamp,label\n1,2,10,3\n", "only 0 and 1"),
        ("user_id,item_id,timestamp,label\n1,2,-10,1\n", "negative"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path, content, message):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(p))


def test_missing_file_names_the_path():
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset("/nonexistent/events.csv")
