"""Dashboard table helpers: row-range reads touch only the row groups they need; id look-ups."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.dashboard.tables import RowReader, find_sorted, id_array, write_parquet


def _ids(n: int) -> list[str]:
    return [f"{i:064x}" for i in range(n)]


def test_row_reader_reads_a_page_from_one_or_two_row_groups(tmp_path) -> None:
    n = 100_000  # a 100k-image run's members index
    table = pa.table({"image_id": _ids(n), "cluster": pa.array(np.arange(n) // 1000, pa.int32())})
    write_parquet(table, tmp_path / "members.parquet", row_group_size=4096)
    reader = RowReader(tmp_path / "members.parquet")
    assert reader.num_rows == n
    assert reader.groups(50_000, 50_048) == [12]           # 50,000 // 4096
    assert reader.groups(4090, 4100) == [0, 1]             # a page across a boundary: two groups
    page = reader.rows(50_000, 50_048)
    assert page["image_id"].to_pylist() == _ids(n)[50_000:50_048]
    assert reader.rows(4090, 4100)["image_id"].to_pylist() == _ids(n)[4090:4100]
    assert reader.rows(n - 3, n + 40, columns=["cluster"]).column("cluster").to_pylist() == [99, 99, 99]
    assert reader.rows(n, n + 10).num_rows == 0 and reader.rows(5, 5, columns=["image_id"]).num_rows == 0


def test_sorted_id_lookup() -> None:
    ids = np.sort(id_array(_ids(10)[::-1]))
    assert find_sorted(ids, _ids(10)[3]) == 3
    assert find_sorted(ids, "f" * 64) is None and find_sorted(ids, "0" * 63 + "a") is None
    assert id_array([]).shape == (0,)
