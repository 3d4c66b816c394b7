"""The SQLite job queue and start-up recovery, without HTTP: claims, recovery rules, deletion, paths."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from wanx.serve.config import DataDir, ServeConfig, is_loopback
from wanx.serve.store import JobStore


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "q.sqlite3")
    yield s
    s.close()


def add(store, n=1, **kw):
    return [store.add(DataDir.new_id(), {"prompt": f"p{i}", "seed": i}, {"prompt": f"p{i}"}, **kw) for i in range(n)]


def test_add_is_committed_and_visible_to_another_connection(store):
    job = add(store)[0]
    other = sqlite3.connect(store.path)  # a second reader: what a restarted server would see
    assert other.execute("SELECT status, params FROM jobs WHERE id = ?", (job.id,)).fetchone() == \
        ("queued", '{"prompt": "p0", "seed": 0}')
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()


def test_claims_are_fifo_and_never_shared(store):
    jobs = add(store, 40)
    got: list[str] = []
    lock = threading.Lock()

    def worker():
        while (job := store.claim()) is not None:
            with lock:
                got.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(j.id for j in jobs) and len(set(got)) == 40
    assert store.claim() is None


def test_queue_limit_counts_waiting_and_running(store):
    add(store, 2)
    store.claim()
    assert add(store, 1, max_active=2) == [None]
    assert add(store, 1, max_active=3)[0] is not None


def test_recovery_requeues_then_fails_as_interrupted(store):
    job = add(store)[0]
    for attempt in (1, 2):
        assert store.claim().attempts == attempt
        assert store.recover(max_attempts=3, finished={}) == {"completed": 0, "requeued": 1, "interrupted": 0}
        assert store.get(job.id).status == "queued"
    store.claim()  # the third run is also cut short
    assert store.recover(max_attempts=3, finished={})["interrupted"] == 1
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.error["code"] == "interrupted" and failed.attempts == 3


def test_recovery_completes_a_job_whose_video_was_published(store):
    job = add(store)[0]
    store.claim()
    counts = store.recover(max_attempts=3, finished={job.id: {"seed": 0, "job_id": job.id}})
    assert counts["completed"] == 1
    done = store.get(job.id)
    assert done.status == "completed" and done.recipe["job_id"] == job.id
    assert [e["kind"] for e in store.events(job.id)] == ["queued", "started", "completed"]


def test_a_clean_shutdown_does_not_count_the_attempt(store):
    job = add(store)[0]
    store.claim()
    store.requeue(job.id)
    assert store.get(job.id).attempts == 0 and store.get(job.id).status == "queued"


def test_deleted_jobs_are_hidden_and_never_claimed(store):
    a, b = add(store, 2)
    assert store.mark_deleted(a.id).status == "queued"
    assert store.mark_deleted(a.id) is None  # twice: already gone
    assert store.get(a.id) is None and store.get(a.id, include_deleted=True).deleted
    assert store.claim().id == b.id and store.claim() is None
    assert [j.id for j in store.page()[0]] == [b.id]
    store.remove(a.id)
    assert store.get(a.id, include_deleted=True) is None


def test_complete_after_a_terminal_state_is_refused(store):
    job = add(store)[0]
    store.claim()
    assert store.fail(job.id, "generation_failed", "nan")
    assert not store.complete(job.id, {}) and store.get(job.id).status == "failed"


def test_data_dir_paths_come_only_from_checked_ids(tmp_path):
    data = DataDir(tmp_path / "d")
    job_id = data.new_id()
    assert data.job_path(job_id, "video") == data.root / "videos" / f"{job_id}.mp4"
    for bad in ("../x", "video_../../etc", "video_" + "0" * 23, "VIDEO_" + "0" * 24, job_id + "/x"):
        with pytest.raises(ValueError):
            data.job_path(bad, "video")


def test_data_dir_cleans_leftovers_and_orphan_uploads(tmp_path):
    data = DataDir(tmp_path / "d")
    kept, orphan = data.new_id(), data.new_id()
    for job_id in (kept, orphan):
        data.job_path(job_id, "uploads").mkdir()
    (data.root / "videos" / f".{kept}.123-abcd.partial.mp4").write_bytes(b"half")
    data.staging().write_bytes(b"upload in flight")
    assert data.clean({kept}) == 3
    assert data.job_path(kept, "uploads").is_dir() and not data.job_path(orphan, "uploads").exists()
    assert list((data.root / "videos").iterdir()) == [] and list((data.root / "tmp").iterdir()) == []


def test_loopback_detection_and_secret_not_in_repr(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")
    assert "hunter2" not in repr(ServeConfig(data=tmp_path, api_key="hunter2"))
