"""Make everything the book's chapters read -- backbones, feature stores, training runs -- before a build,
several steps at once.

A chapter makes what it misses itself, one step after another on one core (``hada.book.setup``, then its
runs). ``prepare`` does the same work as a small dependency graph -- a backbone's features wait for its
pretraining, a run waits for the features of its backbones -- on ``jobs`` worker processes, longest chain
first. Every step is one of the pipeline's own cached, deterministic calls, writing where the chapters look
(``data/backbones``, ``data/features``, ``data/runs``), so a build afterwards finds all of it, with the numbers
it would have computed itself. Steps already done cost a cache check; an interrupted run resumes from its
last epoch.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

from hada.errors import HadaError
from hada.io import progress_enabled


@dataclass(frozen=True)
class Step:
    """One call of the pipeline, run in a worker process once the steps named in ``after`` are done."""

    name: str
    call: Callable  # a module-level function (workers are spawned, so it is pickled by name)
    args: tuple = ()
    after: tuple[str, ...] = ()
    cost: float = 1.0  # rough relative cost; only orders the ready steps


@dataclass
class StepLog:
    """What ``run_steps`` did: seconds per finished step, in finishing order, and the wall time."""

    seconds: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0


# ------------------------------------------------------------------------------------------- scheduling
def _priorities(steps: list[Step]) -> dict[str, float]:
    """Each step's cost plus the costliest chain of steps waiting on it (critical path first)."""
    children: dict[str, list[str]] = {s.name: [] for s in steps}
    for s in steps:
        for dep in s.after:
            children[dep].append(s.name)
    cost = {s.name: s.cost for s in steps}
    rank: dict[str, float] = {}

    def visit(name: str) -> float:
        if name not in rank:
            rank[name] = cost[name] + max((visit(c) for c in children[name]), default=0.0)
        return rank[name]

    for s in steps:
        visit(s.name)
    return rank


def _check(steps: list[Step]) -> None:
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise HadaError(f"duplicate step names: {sorted({n for n in names if names.count(n) > 1})}")
    for s in steps:
        missing = [d for d in s.after if d not in names]
        if missing:
            raise HadaError(f"step {s.name!r} waits for unknown steps {missing}")
    done: set[str] = set()
    pending = list(steps)
    while pending:  # a cycle would leave steps that never become ready
        ready = [s for s in pending if set(s.after) <= done]
        if not ready:
            raise HadaError(f"steps wait for each other in a cycle: {[s.name for s in pending]}")
        done.update(s.name for s in ready)
        pending = [s for s in pending if s.name not in done]


def run_steps(steps: list[Step], jobs: int = 2, progress: bool = True, log: Callable[[str], None] = print) -> StepLog:
    """Run ``steps`` on ``jobs`` spawned processes, each step once all of its ``after`` steps have finished.

    Among ready steps the one heading the costliest remaining chain starts first. If a step fails, no new
    step starts, the running ones finish (their results are kept), and a ``HadaError`` names the failure.
    On Ctrl-C the workers stop at once; what finished stays, and the next call carries on from there.
    """
    import multiprocessing as mp

    from tqdm import tqdm  # plain text bars: readable in terminals, notebooks and logs

    _check(steps)
    if jobs < 1:
        raise HadaError(f"jobs must be at least 1, got {jobs}")
    order = {s.name: i for i, s in enumerate(steps)}
    rank = _priorities(steps)
    done: set[str] = set()
    running: dict[Future, tuple[str, float]] = {}
    failures: list[str] = []
    record = StepLog()
    t0 = time.perf_counter()
    hide = not progress_enabled(progress)
    bar = tqdm(total=len(steps), desc="prepare", unit="step", disable=hide, dynamic_ncols=True)
    say = tqdm.write if not hide else log
    workers = min(jobs, max(1, len(steps)))
    threads = max(1, default_jobs() // workers)  # torch threads of a step that does not set its own
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                               initargs=(threads,))
    try:
        while len(done) < len(steps):
            started = {name for name, _ in running.values()}
            ready = sorted((s for s in steps if s.name not in done and s.name not in started
                            and set(s.after) <= done), key=lambda s: (-rank[s.name], order[s.name]))
            while ready and len(running) < jobs and not failures:
                step = ready.pop(0)
                running[pool.submit(step.call, *step.args)] = (step.name, time.perf_counter())
            if not running:
                break  # a failure left the rest waiting on it
            bar.set_postfix_str(", ".join(name for name, _ in running.values()))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                name, start = running.pop(fut)
                try:
                    fut.result()
                except HadaError as exc:
                    failures.append(f"{name}: {exc}")
                    say(f"failed  {name}: {exc}")
                    continue
                except Exception as exc:  # a bug: keep the worker's traceback visible for a report
                    failures.append(f"{name}: {type(exc).__name__}: {exc}")
                    say(f"failed  {name}: {type(exc).__name__}: {exc}")
                    if exc.__cause__ is not None:  # the worker's traceback, as the pool passes it on
                        say(str(exc.__cause__))
                    continue
                seconds = time.perf_counter() - start
                record.seconds[name] = seconds
                done.add(name)
                bar.update(1)
                say(f"done    {name} ({seconds:.0f} s)")
    except KeyboardInterrupt:
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()  # a Ctrl-C in a terminal reaches them anyway; a signal to this process alone not
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        raise
    pool.shutdown(wait=True)
    bar.close()
    record.wall = time.perf_counter() - t0
    if failures:
        skipped = [s.name for s in steps if s.name not in done and all(not f.startswith(s.name + ":")
                                                                        for f in failures)]
        more = f"; not run: {', '.join(skipped)}" if skipped else ""
        raise HadaError(f"{len(failures)} step(s) failed -- {'; '.join(failures)}{more}. "
                        "Finished steps are kept; fix the cause and rerun to continue")
    return record


def _worker_init(threads: int) -> None:
    """Workers share the cores (feature extraction at 2 threads beside a training worker ran at half speed;
    pretraining and training set their own single thread), leave Ctrl-C to the parent, which stops them (one
    message instead of a traceback per worker), hold no process-shared lock a stop would leak, and do not
    repeat a library's deprecation notice."""
    import signal
    import threading
    import warnings

    import torch
    from tqdm import tqdm

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tqdm.set_lock(threading.RLock())  # not tqdm's default process lock: a stopped worker would leak it
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)


# ------------------------------------------------------------------------------------- the book's steps
def _pretrain(name: str) -> None:
    from hada.backbones.pretrain import pretrain

    pretrain([name], workers=1, progress=False, log=lambda msg: None)


def _features(dataset: str, data_root: str, spec: str) -> None:
    from hada.book import FEATURE_SPLITS
    from hada.features.store import ensure_features

    ensure_features(dataset, [spec], list(FEATURE_SPLITS), data_root=data_root, progress=False)


def _train(config: dict, name: str) -> None:
    from hada.config import TrainConfig
    from hada.experiments import run_experiment

    run_experiment(TrainConfig.from_dict(config), name, progress=False)


def book_steps(setting, runs: bool = True) -> list[Step]:
    """The steps behind a ``hada.book.Setting``: pretrain its embedded backbones, extract every backbone's
    features, and (``runs``) train every run the chapters read (``hada.book.book_runs``)."""
    from hada.backbones import EMBEDDED_BACKBONES
    from hada.backbones.spec import resolve_spec
    from hada.book import book_runs

    steps = []
    for spec in setting.backbones:
        after = ()
        if spec not in EMBEDDED_BACKBONES:
            resolve_spec(spec)  # a bad spec or missing weights: one error now, before any step starts
        else:
            steps.append(Step(f"pretrain {spec}", _pretrain, (spec,), cost=8.0))
            after = (f"pretrain {spec}",)
        steps.append(Step(f"features {spec}", _features, (setting.dataset, str(setting.data_root), spec), after,
                          cost=1.0))
    if runs:
        for name, config in book_runs(setting):
            config = config.resolved()
            cost = config.model.layers * len(config.data.backbones) / 2 * (0.2 if config.model.arch == "concat" else 1.0)
            steps.append(Step(f"train {name}", _train, (config.to_dict(), name),
                              tuple(f"features {b}" for b in config.data.backbones), cost=cost))
    return steps


def default_jobs() -> int:
    """One worker per CPU core this process may use (training steps run single-threaded), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def prepare(setting, jobs: int | None = None, runs: bool = True, progress: bool = True,
            log: Callable[[str], None] = print) -> StepLog:
    """Make everything the chapters of ``setting`` read, ``jobs`` steps at once (default: one per core)."""
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise HadaError(f"--jobs must be at least 1, got {jobs}")
    steps = book_steps(setting, runs=runs)
    log(f"{len(steps)} steps for {setting!r} on {jobs} process(es)")
    return run_steps(steps, jobs=jobs, progress=progress, log=log)
