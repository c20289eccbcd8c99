"""The step graph behind the book -- backbones, feature stores, training runs -- and its one runner.

A backbone's features wait for its pretraining, a run waits for the features of its backbones, and a second
stage (a run warm-started from another, ``hada.experiments.TwoStages``) for its first. A chapter's
``hada.book.setup`` runs this graph (without the runs) with one job, in its own process, one step after
another; ``prepare`` (``hada prepare``) runs all of it on ``jobs`` worker processes, longest chain first.
Every step is one of the pipeline's own cached, deterministic calls, writing where the chapters look
(``data/backbones``, ``data/features``, ``data/runs``), so a build afterwards finds all of it, with the numbers
it would have computed itself. Steps already done cost a cache check; an interrupted run resumes from its
last epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
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
    """Run ``steps``, each once all of its ``after`` steps have finished: in this process one after another
    when ``jobs`` is 1 (a chapter's setup), else on ``jobs`` spawned processes (``hada prepare``).

    Among ready steps the one heading the costliest remaining chain starts first. If a step fails, no new
    step starts, the running ones finish (their results are kept), and a ``HadaError`` names the failure.
    On Ctrl-C the workers stop at once; what finished stays, and the next call carries on from there.
    """
    _check(steps)
    if jobs < 1:
        raise HadaError(f"jobs must be at least 1, got {jobs}")
    run = _Run(steps, progress, log)
    try:
        (_serial if jobs == 1 else _parallel)(run, jobs)
    finally:
        run.bar.close()
    run.record.wall = time.perf_counter() - run.t0
    run.raise_failures()
    return run.record


class _Run:
    """The bookkeeping both runners share: what is done, what failed, the progress bar and the log."""

    def __init__(self, steps: list[Step], progress: bool, log: Callable[[str], None]):
        from tqdm import tqdm  # plain text bars: readable in terminals, notebooks and logs

        self.steps = steps
        self.order = {s.name: i for i, s in enumerate(steps)}
        self.rank = _priorities(steps)
        self.done: set[str] = set()
        self.failures: list[str] = []  # "name: error" lines, in finishing order
        self.failed: set[str] = set()
        self.bug: BaseException | None = None  # the first failure that is not a HadaError
        self.record = StepLog()
        self.t0 = time.perf_counter()
        hide = not progress_enabled(progress)
        self.bar = tqdm(total=len(steps), desc="prepare", unit="step", disable=hide, dynamic_ncols=True)
        self.say = tqdm.write if not hide else log

    def ready(self, started: set[str]) -> list[Step]:
        """Steps not started whose ``after`` steps are done, costliest chain first (then in list order)."""
        return sorted((s for s in self.steps if s.name not in self.done and s.name not in started
                       and set(s.after) <= self.done), key=lambda s: (-self.rank[s.name], self.order[s.name]))

    def finished(self, name: str, start: float, outcome: Callable[[], object]) -> None:
        """Record a step that ended: ``outcome()`` returns its value or raises what it raised."""
        try:
            outcome()
        except HadaError as exc:
            self.failures.append(f"{name}: {exc}")
            self.failed.add(name)
            self.say(f"failed  {name}: {exc}")
            return
        except Exception as exc:  # a bug: keep the traceback visible for a report
            self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
            self.failed.add(name)
            self.bug = self.bug or exc
            self.say(f"failed  {name}: {type(exc).__name__}: {exc}")
            self.say(_traceback(exc))
            return
        seconds = time.perf_counter() - start
        self.record.seconds[name] = seconds
        self.done.add(name)
        self.bar.update(1)
        self.say(f"done    {name} ({seconds:.0f} s)")

    def raise_failures(self) -> None:
        if not self.failures:
            return
        skipped = [s.name for s in self.steps if s.name not in self.done and s.name not in self.failed]
        more = f"; not run: {', '.join(skipped)}" if skipped else ""
        raise HadaError(f"{len(self.failures)} step(s) failed -- {'; '.join(self.failures)}{more}. "
                        "Finished steps are kept; fix the cause and rerun to continue") from self.bug


def _traceback(exc: BaseException) -> str:
    """A worker's traceback as the pool passes it on (its ``__cause__``), else this process's own."""
    import traceback

    if exc.__cause__ is not None:
        return str(exc.__cause__)
    return "".join(traceback.format_exception(exc)).rstrip()


def _serial(run: _Run, jobs: int) -> None:
    """One step at a time in this process: no pool, a Ctrl-C stops the running step where it is."""
    while not run.failures:
        ready = run.ready(set())
        if not ready:
            return
        step = ready[0]
        run.bar.set_postfix_str(step.name)
        start = time.perf_counter()
        run.finished(step.name, start, lambda: step.call(*step.args))


def _parallel(run: _Run, jobs: int) -> None:
    """Up to ``jobs`` steps at once on spawned worker processes sharing the cores."""
    import multiprocessing as mp

    workers = min(jobs, max(1, len(run.steps)))
    threads = max(1, cpu_cores() // workers)  # torch threads of a step that does not set its own
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                               initargs=(threads,))
    running: dict[Future, tuple[str, float]] = {}
    try:
        while len(run.done) < len(run.steps):
            ready = run.ready({name for name, _ in running.values()})
            while ready and len(running) < jobs and not run.failures:
                step = ready.pop(0)
                running[pool.submit(step.call, *step.args)] = (step.name, time.perf_counter())
            if not running:
                break  # a failure left the rest waiting on it
            run.bar.set_postfix_str(", ".join(name for name, _ in running.values()))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                name, start = running.pop(fut)
                run.finished(name, start, fut.result)
    except KeyboardInterrupt:
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()  # a Ctrl-C in a terminal reaches them anyway; a signal to this process alone not
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _worker_init(threads: int) -> None:
    """Workers share the cores (feature extraction at 2 threads beside a training worker ran at half speed;
    pretraining and training set their own single thread), leave Ctrl-C to the parent, which stops them (one
    message instead of a traceback per worker), end when the parent ends however it ends, and hold no process-shared
    lock a stop would leak."""
    import signal
    import threading

    import torch
    from tqdm import tqdm

    from hada.workers import end_with_parent

    global _IN_WORKER
    _IN_WORKER = True
    end_with_parent()  # a parent stopped by kill, not Ctrl-C, takes its workers with it
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tqdm.set_lock(threading.RLock())  # not tqdm's default process lock: a stopped worker would leak it


# ------------------------------------------------------------------------------------- the book's steps
#: True in a worker process: steps there draw no progress bars of their own (the parent draws one for all);
#: run in this process (one job, a chapter's setup) they show their bars and what they make, as before.
_IN_WORKER = False


def _pretrain(name: str, device: str = "auto") -> None:
    from hada.backbones.pretrain import pretrain

    log = (lambda msg: None) if _IN_WORKER else (lambda msg: None if "up to date" in msg else print(msg))
    pretrain([name], workers=1, progress=not _IN_WORKER, log=log, device=device)


def _features(dataset: str, data_root: str, spec: str, device: str = "auto", augment: int = 0,
              augment_policy: str = "randaugment") -> None:
    from hada.experiments import FEATURE_SPLITS
    from hada.features.store import ensure_features

    ensure_features(dataset, [spec], list(FEATURE_SPLITS), data_root=data_root, progress=not _IN_WORKER,
                    device=device, augment=augment, augment_policy=augment_policy)


def _train(config: dict, name: str) -> None:
    from hada.runs import run_experiment
    from hada.train import TrainConfig

    run_experiment(TrainConfig.from_dict(config), progress=False if _IN_WORKER else None)


def _train_second_stage(first: dict, first_name: str, second: dict, second_name: str) -> None:
    """The second of two stages (:class:`hada.experiments.TwoStages`): loads the finished first, trains the second
    from it."""
    from hada.experiments import Run, TwoStages
    from hada.train import TrainConfig

    stages = TwoStages(Run(first_name, TrainConfig.from_dict(first)), Run(second_name, TrainConfig.from_dict(second)))
    stages.run(progress=False if _IN_WORKER else None)


def run_cost(config) -> float:
    """A run's rough relative cost (it only orders the ready steps): graph layers and backbones, times how much
    wider the attention is than the miniature's 4 x 32 channels at width 128; concat + linear is cheap."""
    model = config.model
    if model.arch == "concat":
        return 0.2 * len(config.data.backbones) / 2
    channels = model.heads * (model.head_dim or model.width) * model.width
    return model.layers * len(config.data.backbones) / 2 * max(1.0, channels / (4 * 32 * 128) / 2)


def augment_policies(configs) -> dict[str, str]:
    """``{backbone: augmentation policy}`` of every backbone whose augmented views a run of ``configs`` (``(name,
    TrainConfig)`` pairs) reads; one store holds one policy's views, so two policies for a backbone is an error."""
    from hada.features.augment import backbone_policy

    out: dict[str, str] = {}
    for name, config in configs:
        for b in config.data.augmented_backbones:
            policy = backbone_policy(config.data.augment_policy, config.data.backbones.index(b))
            if out.setdefault(b, policy) != policy:
                raise HadaError(f"runs need {b}'s augmented views made with two policies ({out[b]} and "
                                f"{policy}, run {name}); a store holds one")
    return out


def book_steps(setting, runs: bool = True) -> list[Step]:
    """The steps behind a ``hada.experiments.Setting``: pretrain its embedded backbones, extract the features of
    every backbone a run reads (pretraining snapshots such as ``tiny-vit@1`` included, with augmented views
    where a run uses them), and (``runs``) train every run the chapters read (``hada.experiments.plan``)."""
    from hada.backbones import EMBEDDED_BACKBONES
    from hada.backbones.spec import resolve_spec, split_snapshot
    from hada.experiments import AUGMENT_VIEWS, plan

    book = plan(setting)  # resolved once, on the chapter's exact device; each step is handed its run's config as is
    configs, seconds = book.training(), book.lavis_graph
    specs = list(dict.fromkeys([*setting.backbones, *(b for _, c in configs for b in c.data.backbones)]))
    augmented = augment_policies(configs + [stages.second for stages in seconds])
    steps = []
    for name in dict.fromkeys(split_snapshot(spec)[0] for spec in specs):
        if name in EMBEDDED_BACKBONES:
            steps.append(Step(f"pretrain {name}", _pretrain, (name, setting.device), cost=8.0))
        else:
            resolve_spec(name)  # a bad spec or missing weights: one error now, before any step starts
    pretrained = {s.name for s in steps}
    for spec in specs:
        after = tuple(p for p in (f"pretrain {split_snapshot(spec)[0]}",) if p in pretrained)
        views = (AUGMENT_VIEWS, augmented[spec]) if spec in augmented else (0,)
        steps.append(Step(f"features {spec}", _features, (setting.dataset, str(setting.data_root), spec,
                                                          setting.device, *views), after, cost=1.0))
    if runs:
        for name, config in configs:
            steps.append(Step(f"train {name}", _train, (config.to_dict(), name),
                              tuple(f"features {b}" for b in config.data.backbones), cost=run_cost(config)))
        for stages in seconds:  # after its first stage, whose folder it starts from
            (first_name, first), (name, config) = stages.first, stages.second
            steps.append(Step(f"train {name}", _train_second_stage,
                              (first.to_dict(), first_name, config.to_dict(), name),
                              (f"train {first_name}",), cost=run_cost(config)))
    return steps


def store_bytes_needed(setting) -> int:
    """Upper bound of the bytes of every feature store the book reads for ``setting``: each backbone's train, val
    and test split (text padded to the context length) and the augmented views of the runs that use them."""
    from hada.backbones.spec import split_snapshot
    from hada.experiments import AUGMENT_VIEWS, plan
    from hada.features.store import store_shapes

    configs = [config for _, config in plan(setting).training()]
    specs = list(dict.fromkeys([*setting.backbones, *(b for c in configs for b in c.data.backbones)]))
    augmented = {b for c in configs if c.data.augment_p > 0 for b in c.data.backbones}
    total = 0
    for spec in specs:
        s = store_shapes(split_snapshot(spec)[0] if "@" in spec else spec)
        (t, d), e = s["image_tokens"], s["embed_dim"]
        image, caption = t * d * 2 + e * 2 + 8, s["context_length"] * s["text_dim"] * 2 + e * 2 + 3 * 8
        for split in ("train", "val", "test"):
            counts = setting.counts.get(split, {"images": 0, "captions": 0})
            total += counts["images"] * image + counts["captions"] * caption
        if spec in augmented:
            total += AUGMENT_VIEWS * setting.counts.get("train", {"images": 0})["images"] * (t * d + e) * 2
    return total


def disk_line(setting) -> str:
    """The line ``hada prepare`` prints before it starts: the disk the feature stores need and what is free."""
    from hada.io import free_bytes, human_bytes
    from hada.paths import features_dir

    where = features_dir()
    return (f"disk: the feature stores need at most {human_bytes(store_bytes_needed(setting))} in {where} "
            f"({human_bytes(free_bytes(where))} free; stores already there count in both)")


#: The memory one ``hada prepare`` worker may take at its peak: its largest step (a training run or a feature
#: extraction of the embedded default) was measured at 10 GB. ``default_jobs`` starts no more workers than the
#: free memory holds at this much each, so a machine with many cores and little memory (a hosted CI runner: 4
#: cores, 16 GB) is not driven into swap or the OOM killer.
WORKER_MEMORY = 10 * 10**9


def cpu_cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _read_int(path: Path) -> int | None:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def available_memory(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes of memory new processes may still take: the kernel's ``MemAvailable``, lowered to what the cgroup
    (a container's limit, cgroup v2) leaves; None where neither can be read (not Linux)."""
    free = None
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    limit, used = _read_int(Path(cgroup) / "memory.max"), _read_int(Path(cgroup) / "memory.current")
    if limit is not None and used is not None:
        left = max(0, limit - used)
        free = left if free is None else min(free, left)
    return free


def default_jobs(cores: int | None = None, memory: int | None = None) -> int:
    """Workers of ``hada prepare``: one per CPU core this process may use (training steps run single-threaded),
    at most 8, and no more than the available memory holds at :data:`WORKER_MEMORY` each; always at least one.
    ``cores`` and ``memory`` (bytes) default to this machine's :func:`cpu_cores` and :func:`available_memory`."""
    cores = cpu_cores() if cores is None else cores
    memory = available_memory() if memory is None else memory
    jobs = max(1, min(8, cores))
    if memory is not None:
        jobs = min(jobs, max(1, memory // WORKER_MEMORY))
    return jobs


def jobs_reason(jobs: int, cores: int | None = None, memory: int | None = None) -> str:
    """Why ``default_jobs`` chose ``jobs``: the cores, or the memory where it holds fewer workers."""
    cores = cpu_cores() if cores is None else cores
    memory = available_memory() if memory is None else memory
    if memory is not None and jobs < min(8, cores) and jobs <= max(1, memory // WORKER_MEMORY):
        return (f"{cores} cores, but {memory / 10**9:.1f} GB of memory available holds "
                f"{max(1, memory // WORKER_MEMORY)} worker(s) at {WORKER_MEMORY / 10**9:.0f} GB each")
    return f"{cores} cores"


def prepare(setting, jobs: int | None = None, runs: bool = True, progress: bool = True,
            log: Callable[[str], None] = print, book_build: Path | None = None) -> StepLog:
    """Make everything the chapters of ``setting`` read, ``jobs`` steps at once (default: :func:`default_jobs`,
    one per core as far as the free memory holds them), and
    clear the book's cached notebooks if the code changed since they ran (:func:`refresh_notebook_cache` on
    ``book_build``, default: the repository's ``_build`` folder when the repository holds the book)."""
    chosen = jobs is None
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise HadaError(f"--jobs must be at least 1, got {jobs}")
    steps = book_steps(setting, runs=runs)
    log(f"{len(steps)} steps for {setting!r} on {jobs} process(es)" + (f" ({jobs_reason(jobs)})" if chosen else ""))
    log(disk_line(setting))
    record = run_steps(steps, jobs=jobs, progress=progress, log=log)
    write_prepare_record(record, jobs)
    book_build = book_build if book_build is not None else _book_build()
    if book_build is not None and refresh_notebook_cache(book_build):
        log(f"the code changed since the book's notebooks ran: cleared their cache in {book_build}")
    return record


# ------------------------------------------------------------------------------------ how long it took
#: Under the data folder: how long the last ``hada prepare`` that made something took, on how many processes and
#: cores (the book's landing page shows it, through ``book/_ext/hada_record.py``).
PREPARE_RECORD = "prepare-record.json"
#: A step that finishes faster than this found its result cached; a prepare whose steps all did is not recorded,
#: so a second ``make book`` keeps the time of the one that made the data.
CACHED_STEP_SECONDS = 5.0


def write_prepare_record(record: StepLog, jobs: int, path: Path | None = None) -> bool:
    """Record the wall time of a ``hada prepare`` that made something (some step ran longer than
    :data:`CACHED_STEP_SECONDS`) in ``data/prepare-record.json``; returns whether it wrote."""
    import datetime

    from hada.io import write_json
    from hada.paths import data_dir

    if not record.seconds or max(record.seconds.values()) < CACHED_STEP_SECONDS:
        return False
    path = path if path is not None else data_dir() / PREPARE_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"wall_seconds": round(record.wall, 1), "step_seconds": round(sum(record.seconds.values()), 1),
                      "steps": len(record.seconds), "jobs": jobs, "cores": os.cpu_count(),
                      "date": datetime.date.today().isoformat()})
    return True


def read_prepare_record(path: Path | None = None) -> dict | None:
    """The record :func:`write_prepare_record` left, or None."""
    from hada.paths import data_dir

    path = path if path is not None else data_dir() / PREPARE_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def prepare_phrase(record: dict | None) -> str:
    """The record as a clause of the landing page's sentence "On the machine that built this site, ..."."""
    if not record:
        return ("no `hada prepare` was recorded: the chapters made their data, backbones and training runs "
                "themselves while they ran")
    minutes = record["wall_seconds"] / 60
    took = f"{minutes:.0f} minutes" if minutes >= 2 else f"{record['wall_seconds']:.0f} seconds"
    cores = f"{record['cores']} CPU core{'s' if record['cores'] != 1 else ''}" if record.get("cores") else "its CPU"
    return (f"`hada prepare` made them in {took} of wall time on {record['jobs']} process"
            f"{'es' if record['jobs'] != 1 else ''} ({cores}, {record['date']}); executing the chapters on top "
            "of that is the rest of the build")


# ------------------------------------------------------------------------------------ the notebook cache
#: Beside jupyter-book's notebook cache: the digest of the code the cached notebooks ran with.
DIGEST_RECORD = "hada-code-digest.json"


def _book_build() -> Path | None:
    """Where ``jupyter-book build book/`` writes: ``_build`` beside the ``_config.yml`` it finds above ``book/``."""
    from hada.paths import project_root

    root = project_root()
    return root / "_build" if (root / "_config.yml").exists() and (root / "book").is_dir() else None


def refresh_notebook_cache(build_dir: Path, digest: str | None = None) -> bool:
    """Clear the executed notebooks jupyter-book keeps in ``build_dir`` when the code digest (every module of
    ``hada``, comments and docstrings aside) differs from the one recorded beside them; True if it cleared.

    jupyter-book's cache (``execute_notebooks: cache``) keys a notebook on its code cells only, so a change in
    ``hada`` alone would show the old outputs. Every chapter imports ``hada``, so all cached notebooks go, and
    with them Sphinx's doctrees (it re-reads only pages whose source changed, and would keep the old outputs).
    """
    from hada.runs import package_digest
    from hada.io import write_json

    build_dir = Path(build_dir)
    digest = package_digest() if digest is None else digest
    record, cache = build_dir / DIGEST_RECORD, build_dir / ".jupyter_cache"
    recorded = json.loads(record.read_text()).get("code_digest") if record.exists() else None
    stale = cache.exists() and recorded != digest
    if stale:
        shutil.rmtree(cache)
        shutil.rmtree(build_dir / ".doctrees", ignore_errors=True)
    if stale or recorded != digest:
        build_dir.mkdir(parents=True, exist_ok=True)
        write_json(record, {"code_digest": digest})
    return stale
