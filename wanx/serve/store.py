"""The job queue: one SQLite file (WAL, fsync on commit), so an accepted job survives ``kill -9``.

A job is a row; every state change is one committed statement. ``add`` returns only after the
commit, so the HTTP reply that follows it promises something already on disk. ``claim`` moves the
oldest queued job to in_progress in a single ``UPDATE ... RETURNING``, so two workers never take the
same job. ``recover`` runs at start-up: jobs a dead server left in_progress go back to the queue
(or fail as "interrupted" after ``max_attempts`` runs). Deletion is soft first (``deleted = 1``
hides the job at once and stops a running one), then the files and the row go.

Thread-safe: one connection, one lock (SQLite serialises writers anyway; the lock keeps a
statement and its ``RETURNING`` read together).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1
ACTIVE = ("queued", "in_progress")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- submission order (the queue order and list cursor)
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'in_progress', 'completed', 'failed')),
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,     -- runs started (a crash mid-run counts)
    deleted INTEGER NOT NULL DEFAULT 0,
    progress INTEGER NOT NULL DEFAULT 0,
    params TEXT NOT NULL,                    -- JSON: the resolver's arguments, seed fixed
    summary TEXT NOT NULL,                   -- JSON: the resolved settings shown while it waits
    recipe TEXT,                             -- JSON: the finished video's recipe
    error TEXT,                              -- JSON: {code, message, param}
    extend TEXT                              -- JSON: the prompt extension's record
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, deleted, seq);
CREATE TABLE IF NOT EXISTS events (          -- an append-only history: what the crash test counts
    job_id TEXT NOT NULL, kind TEXT NOT NULL, attempt INTEGER NOT NULL, at REAL NOT NULL, detail TEXT
);
"""


@dataclass(frozen=True)
class Job:
    """One row of the queue, JSON columns decoded."""

    seq: int
    id: str
    status: str
    created_at: float
    started_at: float | None
    completed_at: float | None
    attempts: int
    deleted: bool
    progress: int
    params: dict[str, Any]
    summary: dict[str, Any]
    recipe: dict[str, Any] | None
    error: dict[str, Any] | None
    extend: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        d = dict(row)
        for key in ("params", "summary", "recipe", "error", "extend"):
            d[key] = json.loads(d[key]) if d[key] is not None else None
        d["deleted"] = bool(d["deleted"])
        return cls(**d)


class JobStore:
    """The queue in ``path`` (created if missing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        # isolation_level=None: autocommit, every statement below is its own committed transaction.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # WAL + FULL: a commit is on disk when it returns
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(f"{self.path} has queue schema {version}; this wanx reads {SCHEMA_VERSION}")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _run(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def event(self, job_id: str, kind: str, attempt: int, detail: str | None = None) -> None:
        self._run("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (job_id, kind, attempt, time.time(), detail))

    # ----------------------------------------------------------------------------------- submit

    def add(self, job_id: str, params: dict, summary: dict, *, max_active: int | None = None) -> Job | None:
        """Queue a job; committed when this returns. None when ``max_active`` jobs already wait or run."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the count and the insert see the same queue
            try:
                active = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'in_progress') "
                                          "AND deleted = 0").fetchone()[0]
                if max_active is not None and active >= max_active:
                    self._db.execute("ROLLBACK")
                    return None
                row = self._db.execute("INSERT INTO jobs (id, status, created_at, params, summary) "
                                       "VALUES (?, 'queued', ?, ?, ?) RETURNING *",
                                       (job_id, now, json.dumps(params), json.dumps(summary))).fetchone()
                self._db.execute("INSERT INTO events VALUES (?, 'queued', 0, ?, NULL)", (job_id, now))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return Job.from_row(row)

    # ------------------------------------------------------------------------------------- run

    def claim(self) -> Job | None:
        """The oldest queued job, now in_progress (its attempt counted), or None."""
        row = self._one("UPDATE jobs SET status = 'in_progress', attempts = attempts + 1, started_at = ?, "
                        "progress = 0 WHERE seq = (SELECT seq FROM jobs WHERE status = 'queued' AND deleted = 0 "
                        "ORDER BY seq LIMIT 1) RETURNING *", (time.time(),))
        if row is None:
            return None
        job = Job.from_row(row)
        self.event(job.id, "started", job.attempts)
        return job

    def complete(self, job_id: str, recipe: dict) -> bool:
        """in_progress -> completed; False if the job is no longer running (deleted meanwhile)."""
        done = self._run("UPDATE jobs SET status = 'completed', progress = 100, completed_at = ?, recipe = ? "
                         "WHERE id = ? AND status = 'in_progress'", (time.time(), json.dumps(recipe), job_id))
        if done:
            self.event(job_id, "completed", self.get(job_id, include_deleted=True).attempts)
        return bool(done)

    def fail(self, job_id: str, code: str, message: str, param: str | None = None) -> bool:
        error = {"code": code, "message": message, "param": param}
        done = self._run("UPDATE jobs SET status = 'failed', completed_at = ?, error = ? "
                         "WHERE id = ? AND status IN ('queued', 'in_progress')",
                         (time.time(), json.dumps(error), job_id))
        if done:
            self.event(job_id, "failed", self.get(job_id, include_deleted=True).attempts, code)
        return bool(done)

    def requeue(self, job_id: str, *, count_attempt: bool = False) -> bool:
        """in_progress -> queued (a clean shutdown does not count the attempt)."""
        change = "" if count_attempt else ", attempts = MAX(attempts - 1, 0)"
        return bool(self._run(f"UPDATE jobs SET status = 'queued', progress = 0{change} "
                              f"WHERE id = ? AND status = 'in_progress'", (job_id,)))

    def set_progress(self, job_id: str, progress: int) -> None:
        self._run("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'in_progress'", (int(progress), job_id))

    def set_extend(self, job_id: str, record: dict) -> None:
        self._run("UPDATE jobs SET extend = ? WHERE id = ?", (json.dumps(record), job_id))

    def recover(self, max_attempts: int, finished: dict[str, dict]) -> dict[str, int]:
        """At start-up: in_progress jobs a dead server left behind -> completed (``finished`` maps the
        ids whose video was published to its recipe), queued again, or failed as interrupted after
        ``max_attempts`` runs."""
        counts = {"completed": 0, "requeued": 0, "interrupted": 0}
        for job in self.jobs_in("in_progress"):
            if job.id in finished:
                counts["completed"] += self.complete(job.id, finished[job.id])
            elif job.attempts >= max_attempts:
                counts["interrupted"] += self.fail(job.id, "interrupted", f"the server stopped during each of "
                                                                          f"{job.attempts} runs of this job")
            else:
                counts["requeued"] += self.requeue(job.id, count_attempt=True)
                self.event(job.id, "requeued", job.attempts)
        return counts

    # ----------------------------------------------------------------------------------- read

    def get(self, job_id: str, *, include_deleted: bool = False) -> Job | None:
        row = self._one("SELECT * FROM jobs WHERE id = ?" + ("" if include_deleted else " AND deleted = 0"),
                        (job_id,))
        return Job.from_row(row) if row is not None else None

    def jobs_in(self, status: str) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq", (status,)).fetchall()
        return [Job.from_row(r) for r in rows]

    def page(self, *, after: str | None = None, limit: int = 20, order: str = "desc") -> tuple[list[Job], bool]:
        """A page of live jobs after the cursor ``after`` (a job id), and whether more follow."""
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        where, args = "deleted = 0", []
        if after is not None:
            where += f" AND seq {op} COALESCE((SELECT seq FROM jobs WHERE id = ?), -1)"
            args.append(after)
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY seq {direction} LIMIT ?",
                                    (*args, limit + 1)).fetchall()
        return [Job.from_row(r) for r in rows[:limit]], len(rows) > limit

    def position(self, job: Job) -> int:
        """How many live jobs run or wait ahead of a queued ``job``."""
        row = self._one("SELECT COUNT(*) FROM jobs WHERE deleted = 0 AND (status = 'in_progress' OR "
                        "(status = 'queued' AND seq < ?))", (job.seq,))
        return int(row[0])

    def recent_run_seconds(self, n: int = 10) -> float | None:
        """Mean wall time of the last ``n`` completed jobs (for poll-after hints)."""
        row = self._one("SELECT AVG(completed_at - started_at) FROM (SELECT completed_at, started_at FROM jobs "
                        "WHERE status = 'completed' AND started_at IS NOT NULL ORDER BY seq DESC LIMIT ?)", (n,))
        return float(row[0]) if row and row[0] is not None else None

    def events(self, job_id: str | None = None) -> list[dict]:
        with self._lock:
            sql, args = ("SELECT * FROM events", ()) if job_id is None else \
                ("SELECT * FROM events WHERE job_id = ?", (job_id,))
            return [dict(zip(("job_id", "kind", "attempt", "at", "detail"), r)) for r in self._db.execute(sql, args)]

    # ---------------------------------------------------------------------------------- delete

    def mark_deleted(self, job_id: str) -> Job | None:
        """Hide a job at once (committed); returns it as it was, or None if unknown or already gone."""
        row = self._one("UPDATE jobs SET deleted = 1 WHERE id = ? AND deleted = 0 RETURNING *", (job_id,))
        if row is not None:
            self.event(job_id, "deleted", row["attempts"])
        return Job.from_row(row) if row is not None else None

    def remove(self, job_id: str) -> None:
        """Drop a deleted job's row (its files are gone first)."""
        self._run("DELETE FROM jobs WHERE id = ? AND deleted = 1", (job_id,))

    def deleted_ids(self) -> Iterator[str]:
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE deleted = 1").fetchall()
        return iter([r[0] for r in rows])

    def all_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT id FROM jobs")}
