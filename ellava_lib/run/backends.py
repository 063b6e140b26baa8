"""Where a sweep's jobs run: worker processes on this machine (``local``) or tasks of a Ray cluster (``ray``).

Both executors take the same plan (:func:`ellava_lib.run.sweep.run_sweep` builds it): the *shared* tasks that
several jobs read (level databases, ECoFLaP importances), then the *jobs*, each naming the shared tasks it needs
(:attr:`Task.needs`). Both follow the same rules:

- a job runs after the shared tasks it needs; one whose shared task finally failed fails with that error
  ("needs leveldb/s0-n64, which failed: ..."), without running;
- a failed task is re-run up to ``retries`` times, then reported (:class:`Failure`) at once; it never stops the
  others. The caller writes every failure to ``failed.json`` and raises :class:`SweepFailed` at the end;
- results are reported as each task finishes (the job itself has already written its ``row.json``);
- every task runs at the sweep's ``threads`` torch intra-op threads (:func:`intra_op_threads`), in this process, in
  a worker process or in a Ray task alike: a result depends on the reduction order, so a row must not depend on
  where its job ran.

Ray (an optional extra, ``pip install -e ".[ray]"``, imported only here and only when asked for) runs each task
as a Ray task asking for the resources of :func:`task_resources`; a job's dependencies are the ObjectRefs of its
shared tasks, passed as arguments, so Ray starts it only when they finished. ``retries`` becomes Ray's
``max_retries`` (a dead worker or node: the task is re-run, on another node if need be) with
``retry_exceptions=True`` (an exception: the same count of re-runs). The run folder must be on storage every node
sees: the driver writes a probe file there and every task checks it before working.

Test hook: :func:`test_failure_hook` (``ELLAVA_TEST_FAIL_JOB``) makes a named job raise or kill its process.
"""

from __future__ import annotations

import os
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ellava_lib.core import files

BACKENDS: tuple[str, ...] = ("local", "ray")
#: Environment variables a Ray task gets from the driver when they are set there (the GPT judge's endpoint,
#: model and key; hub access; the test hook): nodes started with ``ray start`` do not share the driver's shell.
FORWARD_ENV: tuple[str, ...] = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ELLAVA_JUDGE_MODEL", "HF_TOKEN",
                                "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "ELLAVA_TEST_FAIL_JOB")
TEST_FAIL_ENV = "ELLAVA_TEST_FAIL_JOB"
PROBE = ".ellava-ray-probe-{token}"  # in the run folder while a Ray sweep runs


@dataclass(frozen=True)
class Task:
    """One unit of work: ``fn(*args)``, named ``name``; ``needs``: the names of the shared tasks it reads."""

    name: str
    fn: Callable[..., Any]
    args: tuple
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Failure:
    """A task that failed after its retries: ``error`` is one line, ``detail`` the traceback."""

    name: str
    error: str
    detail: str = ""

    def line(self) -> str:
        return f"{self.name}: {self.error}"

    def to_dict(self) -> dict[str, str]:
        return {"job": self.name, "error": self.error, "detail": self.detail}


class SweepFailed(RuntimeError):
    """Some jobs of a sweep failed (after their retries); the others finished and are in ``frame``
    (``results.csv``); ``failures`` in ``failed.json``."""

    def __init__(self, failures: Sequence[Failure], frame: Any, path: Path) -> None:
        self.failures = list(failures)
        self.frame = frame
        self.path = path
        lines = "; ".join(f.line() for f in self.failures)
        super().__init__(f"{len(self.failures)} sweep task(s) failed (details in {path}): {lines}")


Done = Callable[[Task, Any], None]
Failed = Callable[[Task, Failure], None]


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception (of its cause for a Ray task error)."""
    cause = getattr(exc, "cause", None)
    exc = cause if isinstance(cause, BaseException) else exc
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _failure(task: Task, exc: BaseException) -> Failure:
    return Failure(task.name, one_line(exc), "".join(traceback.format_exception(exc)))


def _dependency_failure(task: Task, failed: dict[str, Failure]) -> Failure | None:
    """The failure of a job whose shared task failed (it does not run), or None."""
    for need in task.needs:
        if need in failed:
            return Failure(task.name, f"needs {need}, which failed: {failed[need].error}", failed[need].detail)
    return None


def task_resources(device: str) -> dict[str, float]:
    """What one Ray task asks for: a GPU (and a CPU) on a CUDA tier, else one CPU (where it runs the sweep's
    ``threads`` torch threads, as a local worker process does)."""
    if device.startswith("cuda"):
        return {"num_cpus": 1, "num_gpus": 1}
    return {"num_cpus": 1}


def test_failure_hook(name: str, job_dir: Path) -> None:
    """Tests only: with ``ELLAVA_TEST_FAIL_JOB="<job name>[:raise|exit[:K]]"`` (several: comma-separated) the
    job of that name raises a RuntimeError (``raise``, the default) or ends its process with ``os._exit(1)``
    (``exit``: a crashed worker) on its first ``K`` attempts (default: every attempt), counted in
    ``job_dir/test_failures``. Unset: nothing."""
    for item in os.environ.get(TEST_FAIL_ENV, "").split(","):
        target, _, rest = item.strip().partition(":")
        if target != name:
            continue
        how, _, times = rest.partition(":")
        counter = Path(job_dir) / "test_failures"
        count = int(counter.read_text()) if counter.is_file() else 0
        if times and count >= int(times):
            return
        files.write_text(counter, str(count + 1))
        if how == "exit":
            os._exit(1)
        raise RuntimeError(f"{TEST_FAIL_ENV} makes job {name} fail (attempt {count + 1})")


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Run the body at ``threads`` torch intra-op threads, then restore the count it had; ``threads <= 0``: leave
    the process's count as it is."""
    import torch

    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads > 0:
            torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ local

def _init_worker(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


class _Pool:
    """A spawn process pool made on first use and made again after a worker process died."""

    def __init__(self, workers: int, threads: int) -> None:
        self.workers, self.threads = workers, threads
        self._pool: ProcessPoolExecutor | None = None

    def get(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing as mp

            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.threads,))
        return self._pool

    def discard(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _round(tasks: Sequence[Task], pool: _Pool | None,
           threads: int = 0) -> Iterator[tuple[Task, Any, BaseException | None]]:
    """Run ``tasks`` once (in this process at ``threads`` intra-op threads when ``pool`` is None; a pool's workers
    have theirs), yielding ``(task, result, error)`` as each ends."""
    if pool is None:
        for task in tasks:
            try:
                with intra_op_threads(threads):
                    result = task.fn(*task.args)
            except Exception as e:  # reported; the others go on
                yield task, None, e
            else:
                yield task, result, None
        return
    executor = pool.get()
    futures = {executor.submit(task.fn, *task.args): task for task in tasks}
    for fut in as_completed(futures):
        exc = fut.exception()
        yield futures[fut], None if exc else fut.result(), exc


def _with_retries(tasks: Sequence[Task], pool: _Pool | None, retries: int, done: Done,
                  failed: Failed, threads: int = 0) -> dict[str, Failure]:
    """Run ``tasks``, then up to ``retries`` more rounds of those that raised (a crashed worker process breaks
    the pool: every task of that round then counts as failed once and the pool is made again)."""
    pending = list(tasks)
    final: dict[str, Failure] = {}
    for attempt in range(retries + 1):
        errors: dict[str, BaseException] = {}
        for task, result, exc in _round(pending, pool, threads):
            if exc is None:
                done(task, result)
            else:
                errors[task.name] = exc
        if pool is not None and any(isinstance(e, BrokenProcessPool) for e in errors.values()):
            pool.discard()
        pending = [t for t in pending if t.name in errors]
        if attempt == retries:
            for task in pending:
                final[task.name] = _failure(task, errors[task.name])
                failed(task, final[task.name])
    return final


def run_local(shared: Sequence[Task], jobs: Sequence[Task], done: Done, failed: Failed, workers: int = 1,
              threads: int = 1, retries: int = 0) -> dict[str, Failure]:
    """The shared tasks, then the jobs, in ``workers`` spawned processes (``threads`` torch threads each), or
    in this process (at ``threads`` torch threads, restored after each task) when ``workers <= 1`` or a single job
    is left; ``threads <= 0``: each process's own count. Returns the failures by task name."""
    pool = None if workers <= 1 or len(jobs) <= 1 else _Pool(workers, threads)
    try:
        failures = _with_retries(shared, pool, retries, lambda task, result: None, failed, threads)
        runnable = []
        for job in jobs:
            blocked = _dependency_failure(job, failures)
            if blocked is None:
                runnable.append(job)
            else:
                failures[job.name] = blocked
                failed(job, blocked)
        failures.update(_with_retries(runnable, pool, retries, done, failed, threads))
    finally:
        if pool is not None:
            pool.discard()
    return failures


# -------------------------------------------------------------------------------------------------- ray

def import_ray():
    """The ``ray`` module, or a ``ValueError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError('the Ray backend needs Ray: pip install "ellava[ray]" (or pip install ray)') from None
    return ray


def _ray_call(fn: Callable[..., Any], args: tuple, threads: int, probe: tuple[str, str], *needs: Any) -> Any:
    """The body of every Ray task: check the run folder is the driver's (shared storage), set the torch
    threads, run ``fn(*args)``. ``needs``: the results of the shared tasks it waited for (unused)."""
    import socket

    import torch

    path, token = probe
    if not (Path(path).is_file() and Path(path).read_text() == token):
        raise RuntimeError(f"the run folder {Path(path).parent} is not the driver's on node {socket.gethostname()}: "
                           "put it on storage every node of the cluster sees")
    if threads > 0:
        torch.set_num_threads(threads)
    return fn(*args)


def _forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}


def connect_ray(address: str | None, workers: int) -> bool:
    """Connect to the Ray cluster at ``address`` (``auto``: the one this node belongs to), or start a local Ray
    of ``workers`` CPUs (and this machine's GPUs), unless this process is connected already. True when this
    call connected: the caller then disconnects (``ray.shutdown()``). A ``ValueError`` (one line) when it cannot."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    try:
        if address is not None:
            ray.init(address=address, log_to_driver=False)
        else:
            # "local": always a new local instance, never a cluster left in /tmp/ray/ray_current_cluster
            ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address!r}" if address is not None else "a local Ray"
        raise ValueError(f"cannot start or join {where}: {one_line(e)}") from None
    return True


def run_ray(shared: Sequence[Task], jobs: Sequence[Task], done: Done, failed: Failed, shared_dir: Path,
            workers: int = 1, threads: int = 1, retries: int = 0, address: str | None = None,
            device: str = "cpu") -> dict[str, Failure]:
    """Every task as a Ray task (resources :func:`task_resources`), each job depending on its shared tasks'
    ObjectRefs; ``shared_dir``: the run folder, which every node must see. Without ``address`` a local Ray with
    ``workers`` CPUs is started and shut down at the end (a session this process already holds is used as is).
    Returns the failures by task name."""
    ray = import_ray()
    token = uuid.uuid4().hex
    probe = Path(shared_dir) / PROBE.format(token=token)
    files.write_text(probe, token)  # also: the driver can write the run folder
    started = connect_ray(address, workers)
    try:
        options: dict[str, Any] = {**task_resources(device), "max_retries": retries,
                                   "retry_exceptions": True}
        env = _forwarded_env()
        if env:
            options["runtime_env"] = {"env_vars": env}
        remote = ray.remote(**options)(_ray_call)
        refs: dict[str, Any] = {}
        pending: dict[Any, Task] = {}
        for task in (*shared, *jobs):
            deps = [refs[n] for n in task.needs if n in refs]
            refs[task.name] = remote.options(name=task.name).remote(task.fn, task.args, threads,
                                                                    (str(probe), token), *deps)
            pending[refs[task.name]] = task
        names = {t.name for t in shared}
        failures: dict[str, Failure] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as e:  # reported; the others go on
                failures[task.name] = _ray_failure(ray, task, e, refs)
                failed(task, failures[task.name])
                continue
            if task.name not in names:
                done(task, result)
        return failures
    finally:
        if started:
            ray.shutdown()
        probe.unlink(missing_ok=True)


def _ray_failure(ray, task: Task, exc: BaseException, refs: dict[str, Any]) -> Failure:
    """A failed Ray task's :class:`Failure`; a job whose shared task failed names it."""
    for need in task.needs:
        try:
            ray.get(refs[need])
        except Exception as e:  # that shared task's failure
            return Failure(task.name, f"needs {need}, which failed: {one_line(e)}", str(e))
    return Failure(task.name, one_line(exc), str(exc))
