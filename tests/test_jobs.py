"""`hada prepare`'s worker count: one per core, no more than the free memory holds (a worker peaks at 10 GB)."""

from __future__ import annotations

import pytest

from hada import pipeline
from hada.pipeline import WORKER_MEMORY, available_memory, default_jobs

GB = 10**9


@pytest.mark.parametrize("cores, memory, jobs", [
    (4, 64 * GB, 4),     # memory for all: one per core
    (4, 16 * GB, 1),     # a hosted runner: 4 cores, 16 GB -> one worker of 10 GB
    (4, 25 * GB, 2),
    (16, 200 * GB, 8),   # never more than 8
    (4, 3 * GB, 1),      # always at least one
])
def test_default_jobs_from_cores_and_memory(cores, memory, jobs):
    assert default_jobs(cores=cores, memory=memory) == jobs


def test_default_jobs_without_a_memory_reading_is_the_cores(monkeypatch):
    """Where no memory can be read (not Linux), the cores decide. (``memory=None`` means "read this machine", so
    the case is mocked: passed as None, it depended on the memory free while the test ran.)"""
    monkeypatch.setattr(pipeline, "available_memory", lambda: None)
    assert default_jobs(cores=2) == 2


def test_default_jobs_reads_this_machine(monkeypatch):
    monkeypatch.setattr(pipeline, "cpu_cores", lambda: 4)
    monkeypatch.setattr(pipeline, "available_memory", lambda: 2 * WORKER_MEMORY + GB)
    assert default_jobs() == 2
    assert "holds 2 worker(s)" in pipeline.jobs_reason(2)
    monkeypatch.setattr(pipeline, "available_memory", lambda: 100 * WORKER_MEMORY)
    assert default_jobs() == 4 and pipeline.jobs_reason(4) == "4 cores"


def test_available_memory_is_memavailable_lowered_to_the_cgroups_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert available_memory(meminfo, cgroup) == 20000000 * 1024            # no cgroup files
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("3000000000\n")
    assert available_memory(meminfo, cgroup) == 20000000 * 1024            # no limit
    (cgroup / "memory.max").write_text("12000000000\n")
    assert available_memory(meminfo, cgroup) == 9 * GB                     # the container's limit less its use
    assert available_memory(tmp_path / "none", cgroup) == 9 * GB
    assert available_memory(tmp_path / "none", tmp_path / "none") is None


def test_prepare_says_why_it_chose_its_workers(monkeypatch):
    monkeypatch.setattr(pipeline, "cpu_cores", lambda: 4)
    monkeypatch.setattr(pipeline, "available_memory", lambda: 14 * GB)
    lines = []
    monkeypatch.setattr(pipeline, "book_steps", lambda setting, runs=True: [])
    monkeypatch.setattr(pipeline, "disk_line", lambda setting: "disk")
    seen = {}
    monkeypatch.setattr(pipeline, "run_steps", lambda steps, jobs, progress, log: seen.setdefault("jobs", jobs))
    monkeypatch.setattr(pipeline, "write_prepare_record", lambda record, jobs: False)
    monkeypatch.setattr(pipeline, "_book_build", lambda: None)       # the repository's _build stays untouched
    pipeline.prepare("setting", log=lines.append, book_build=None)
    assert seen["jobs"] == 1
    assert lines[0].endswith("on 1 process(es) (4 cores, but 14.0 GB of memory available holds 1 worker(s) at "
                             "10 GB each)"), lines
