"""``wanx batch``: many videos from a .jsonl file, in-process and on a local Ray cluster (demo model)."""

from __future__ import annotations

import contextlib
import json
import signal

import pytest

from wanx.batch import read_jobs, run_batch
from wanx.media import read_mp4

FAST = {"frame_num": 5, "sample_steps": 2}


def _write_jobs(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (rather than hang) a test that runs too long; cleanup in ``finally`` blocks still runs."""
    def expire(signum, frame):
        raise TimeoutError(f"test ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_bad_lines_become_failed_jobs_before_any_model_loads(tmp_path):
    jobs = read_jobs(_write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "ok", "prompt": "a red circle", **FAST},
        {"id": "ok", "prompt": "the same id again"},
        {"prompt": "x", "colour": "red"},
        "not json",
        {"id": "../escape", "prompt": "x"},
        {"id": "big", "prompt": "x", "size": "33*33"},
        "",
    ]))
    assert [j.id for j in jobs] == ["ok", "ok", "job-00003", "job-00004", "job-00005", "big"]
    assert jobs[0].error is None and jobs[0].request.frame_num == 5
    assert "used by an earlier line" in jobs[1].error
    assert "unknown key(s) colour" in jobs[2].error
    assert "line 4 is not JSON" in jobs[3].error
    assert "must be letters, digits" in jobs[4].error
    assert jobs[5].error.startswith("InputError: ") and "size" in jobs[5].error


def test_in_process_batch_writes_each_video_records_failures_and_resumes(tmp_path):
    jobs = _write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "a", "prompt": "a red circle moving left", "seed": 1, **FAST},
        {"id": "bad", "prompt": "x", "frame_num": 6},
        {"id": "b", "prompt": "a blue square", "base_seed": 2, **FAST},
    ])
    out = tmp_path / "out"
    report = run_batch(jobs, out, device="cpu", progress=False)
    assert report.done == ["a", "b"] and list(report.failed) == ["bad"]
    for job_id, seed in (("a", 1), ("b", 2)):
        frames, _, recipe = read_mp4(out / f"{job_id}.mp4")
        assert frames.shape[0] == 5 and recipe["seed"] == seed
        side = json.loads((out / f"{job_id}.json").read_text())
        assert side["status"] == "done" and side["recipe"]["seed"] == seed
    error = json.loads((out / "bad.error.json").read_text())
    assert error["status"] == "failed" and "frame_num" in error["error"]
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.mp4", "b.json", "b.mp4", "bad.error.json"]

    again = run_batch(jobs, out, device="cpu", progress=False)
    assert again.skipped == ["a", "b"] and again.done == [] and list(again.failed) == ["bad"]


def test_ray_batch_loads_once_per_actor_retries_a_killed_worker_and_resumes(tmp_path):
    ray = pytest.importorskip("ray")
    jobs = _write_jobs(tmp_path / "jobs.jsonl", [
        {"id": f"v{i}", "prompt": "a red circle moving left", "seed": i, **FAST} for i in range(4)])
    out = tmp_path / "out"
    killed = []

    def kill_once(job_id, attempt, actor):
        if job_id == "v1" and attempt == 1:
            ray.kill(actor)  # the worker dies under its job
            killed.append(job_id)

    with time_limit(400):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            report = run_batch(jobs, out, ray_address="auto", workers=2, progress=False, on_dispatch=kill_once)
            again = run_batch(jobs, out, ray_address="auto", workers=2, progress=False)
        finally:
            ray.shutdown()
    assert killed == ["v1"] and report.retried == ["v1"]
    assert sorted(report.done) == ["v0", "v1", "v2", "v3"] and not report.failed
    sides = [json.loads((out / f"v{i}.json").read_text()) for i in range(4)]
    assert all(s["worker"]["pipelines_loaded"] == 1 for s in sides)  # each actor loaded the model once
    assert len({s["worker"]["pid"] for s in sides}) >= 2  # the jobs were spread over actors
    for i in range(4):
        frames, _, recipe = read_mp4(out / f"v{i}.mp4")
        assert frames.shape[0] == 5 and recipe["seed"] == i
    assert again.skipped == ["v0", "v1", "v2", "v3"] and again.done == []


def test_the_batch_command_runs_from_its_flags_and_exits_1_on_failures(tmp_path, capsys):
    import argparse

    from wanx.batch.cli import add_batch_flags, cmd_batch

    parser = argparse.ArgumentParser()
    add_batch_flags(parser)
    jobs = _write_jobs(tmp_path / "jobs.jsonl", [{"id": "one", "prompt": "a red circle", **FAST},
                                                 {"id": "two", "prompt": "x", "sample_solver": "nope"}])
    args = parser.parse_args([str(jobs), "--out", str(tmp_path / "out"), "--device", "cpu", "--threads", "1"])
    assert args.ray is None
    assert cmd_batch(args) == 1
    captured = capsys.readouterr()
    assert "1 done, 0 skipped (already done), 1 failed" in captured.out
    assert "two: InputError" in captured.err and (tmp_path / "out" / "one.mp4").is_file()
    assert parser.parse_args([str(jobs), "--out", "o", "--ray"]).ray == "local"
    assert parser.parse_args([str(jobs), "--out", "o", "--ray", "auto"]).ray == "auto"
