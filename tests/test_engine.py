"""The stage engine: caching, resume after a kill, downstream-only recompute, corruption."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.engine import CorruptShardError, StageError
from pipeline.engine.store import MANIFEST
from toystages import N_SHARDS, ROWS, Numbers, Scaled, Total, toy_engine

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _reset_calls():
    for cls in (Numbers, Scaled, Total):
        cls.calls.clear()


def _contents(engine, stage):
    return [t.to_pylist() for t in engine.read(stage)]


def test_same_fingerprint_does_no_work(tmp_path):
    eng = toy_engine(tmp_path)
    first = eng.run()
    assert [s.state for s in first] == ["done"] * 3 and all(s.computed for s in first)
    assert eng.read_table("total")["value"].to_pylist() == [2 * sum(range(N_SHARDS * ROWS))]
    Numbers.calls.clear(); Scaled.calls.clear(); Total.calls.clear()
    second = toy_engine(tmp_path).run()
    assert not any(s.computed for s in second)
    assert Numbers.calls == Scaled.calls == Total.calls == []
    manifest = json.loads((Path(first[0].path) / MANIFEST).read_text())
    assert manifest["rows"] == N_SHARDS * ROWS and len(manifest["shards"]) == N_SHARDS
    assert {"config", "libraries", "seconds", "started_at", "finished_at"} <= set(manifest)


def test_status_states_and_json_keys(tmp_path):
    eng = toy_engine(tmp_path)
    assert [s.state for s in eng.status_all()] == ["missing"] * 3
    eng.ensure("scaled")  # computes numbers first
    states = {s.stage: s.state for s in eng.status_all()}
    assert states == {"numbers": "done", "scaled": "done", "total": "missing"}
    d = eng.status("numbers").as_dict()
    assert {"stage", "state", "fingerprint", "rows", "path", "seconds"} <= set(d)
    assert d["rows"] == N_SHARDS * ROWS


def test_config_change_recomputes_only_downstream(tmp_path):
    eng = toy_engine(tmp_path, factor=2)
    before = {s.stage: s.fingerprint for s in eng.run()}
    Numbers.calls.clear()
    eng3 = toy_engine(tmp_path, factor=3)
    after = {s.stage: (s.fingerprint, s.computed) for s in eng3.run()}
    assert after["numbers"] == (before["numbers"], False) and Numbers.calls == []
    assert after["scaled"][0] != before["scaled"] and after["scaled"][1]
    assert after["total"][0] != before["total"] and after["total"][1]
    assert eng3.read_table("total")["value"].to_pylist() == [3 * sum(range(N_SHARDS * ROWS))]
    # the old config's outputs are still there and still valid: switching back does no work
    assert not any(s.computed for s in toy_engine(tmp_path, factor=2).run())


def test_force_recomputes_one_stage(tmp_path):
    eng = toy_engine(tmp_path)
    eng.run()
    Numbers.calls.clear(); Scaled.calls.clear()
    st = eng.ensure("scaled", force=True)
    assert st.computed and Scaled.calls == [0] and Numbers.calls == []


def _run_killed(root: Path, kill_after_shards: int) -> None:
    env = dict(os.environ, TOY_SLEEP="0.4", PYTHONPATH=f"{TESTS.parent}:{TESTS}")
    proc = subprocess.Popen([sys.executable, str(TESTS / "toystages.py"), str(root)], env=env,
                            stderr=subprocess.PIPE, text=True)
    seen = 0
    for line in proc.stderr:
        if line.startswith("computing shard"):
            seen += 1
            if seen > kill_after_shards:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_killed_run_resumes_and_equals_clean_run(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    _run_killed(killed, kill_after_shards=3)
    eng = toy_engine(killed)
    assert eng.status("numbers").state == "partial"
    unit_dir = Path(eng.status("numbers").path)
    assert not (unit_dir / MANIFEST).exists()
    done_before = sorted(p.name for p in unit_dir.glob("part-*.parquet"))
    assert 1 <= len(done_before) < N_SHARDS
    assert not any(p.name.endswith(".parquet") and not p.name.startswith("part-") for p in unit_dir.iterdir())
    eng.ensure("numbers")
    assert sorted(Numbers.calls) == [i for i in range(N_SHARDS) if f"part-{i:05d}.parquet" not in done_before]
    ref = toy_engine(clean)
    ref.ensure("numbers")
    a = json.loads((unit_dir / MANIFEST).read_text())
    b = json.loads((Path(ref.status("numbers").path) / MANIFEST).read_text())
    assert a["shards"] == b["shards"] and a["content"] == b["content"]
    assert _contents(eng, "numbers") == _contents(ref, "numbers")


def test_corrupt_shard_is_named_and_recomputed(tmp_path, caplog):
    eng = toy_engine(tmp_path)
    eng.run()
    unit_dir = Path(eng.status("numbers").path)
    shard = unit_dir / "part-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    # reading it directly names the shard
    with pytest.raises(CorruptShardError, match="part-00002.parquet"):
        list(eng.read("numbers"))
    Numbers.calls.clear()
    with caplog.at_level("WARNING", logger="lvd"):
        st = eng.ensure("numbers")
    assert "part-00002.parquet" in caplog.text
    assert st.computed and Numbers.calls == [2]
    assert pq.read_table(shard)["value"].to_pylist() == list(range(2 * ROWS, 3 * ROWS))


def test_corrupt_upstream_found_while_reading_is_recomputed(tmp_path):
    eng = toy_engine(tmp_path, verify="size")  # size check misses a same-size bit flip...
    eng.ensure("numbers")
    shard = Path(eng.status("numbers").path) / "part-00004.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    Numbers.calls.clear()
    eng.ensure("total")  # ...but the checksum on read catches it, and numbers shard 4 is recomputed
    assert Numbers.calls == [4]
    assert eng.read_table("total")["value"].to_pylist() == [2 * sum(range(N_SHARDS * ROWS))]


def test_reading_a_missing_stage_says_what_to_do(tmp_path):
    with pytest.raises(StageError, match="lvd stage numbers"):
        list(toy_engine(tmp_path).read("numbers"))


def test_concurrent_runs_compute_a_unit_once(tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv("TOY_SLEEP", "0.1")
    results = []
    threads = [threading.Thread(target=lambda: results.append(toy_engine(tmp_path).ensure("numbers"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(Numbers.calls) == list(range(N_SHARDS))  # each shard once, not twice
    assert sorted(r.computed for r in results) == [False, True]


def test_artifact_lost_after_the_last_shard_is_recomputed(tmp_path):
    """A run killed between a stage's last shard and its artifact (written after it) resumes into a
    complete unit: the engine recomputes the last shard, so the stage's compute runs again."""
    eng = toy_engine(tmp_path)
    done = {s.stage: s for s in eng.run()}
    unit = Path(done["total"].path)
    expected = (unit / "total.txt").read_text()
    (unit / MANIFEST).unlink()
    (unit / "total.txt").unlink()
    Total.calls.clear()
    again = {s.stage: s for s in toy_engine(tmp_path).run()}
    assert Total.calls == [0] and again["total"].computed
    assert (unit / "total.txt").read_text() == expected
    assert "total.txt" in json.loads((unit / MANIFEST).read_text())["artifacts"]
