"""A small process pool with a hard deadline per task.

concurrent.futures.ProcessPoolExecutor cannot stop a task that is already running, and a worker
that dies takes the whole executor down (BrokenProcessPool). Reward verification needs the
opposite: a hung task is killed when its deadline passes, a crashed worker costs only its own
task, and the pool replaces the worker and carries on. So each worker here owns a private pipe,
runs one task at a time, and the parent watches every pipe, every process sentinel and every
deadline from a single loop.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger(__name__)

_STOP = None  # sent to a worker to make it exit its loop


@dataclass(frozen=True)
class TaskOutcome:
    """What happened to one task: status "ok" (value holds the result), "error" (the function
    raised; message holds the exception), "timeout" (the deadline passed and the worker was killed)
    or "crashed" (the worker died mid-task, e.g. os._exit or a signal)."""

    status: str
    value: Any = None
    message: str = ""


class PoolStartupError(RuntimeError):
    """Workers cannot start (their initializer fails or they die before reporting ready)."""


def _worker_main(conn, initializer: Optional[Callable[[], None]]) -> None:
    # Ctrl-C reaches the whole process group; the parent decides how to shut workers down, and a
    # KeyboardInterrupt here would only turn into a confusing traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if initializer is not None:
            initializer()
    except BaseException as exc:  # report, then exit: the parent turns this into PoolStartupError
        conn.send(("init_error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # parent gone
            return
        if message is _STOP:
            return
        task_id, fn, args = message
        try:
            reply = (task_id, "ok", fn(*args))
        except BaseException as exc:  # a task's failure must not end the worker
            reply = (task_id, "error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except Exception as exc:  # e.g. an unpicklable result
            conn.send((task_id, "error", f"could not send the result back: {type(exc).__name__}: {exc}"))


class _Worker:
    def __init__(self, context, initializer) -> None:
        self.conn, child_conn = context.Pipe(duplex=True)
        # daemon: the interpreter kills leftover workers at exit even if close() was never called.
        self.process = context.Process(target=_worker_main, args=(child_conn, initializer), daemon=True)
        self.process.start()
        child_conn.close()
        self.started_at = time.monotonic()
        self.ready = False
        self.task_index: Optional[int] = None
        self.deadline = 0.0

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)  # reaps it: no zombie left behind
        self.conn.close()


class DeadlinePool:
    """Runs fn(*args) for many argument tuples in `num_workers` processes, each task with a hard
    deadline. Workers are started lazily and replaced after a timeout or a crash.

    fn, args and the initializer cross process boundaries by pickling, so fn must be a module-level
    function. The context must be "spawn" or "forkserver": forking a trainer that holds threads and
    torch state can deadlock the child.
    """

    def __init__(
        self,
        num_workers: int,
        *,
        context: str = "spawn",
        initializer: Optional[Callable[[], None]] = None,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if context not in ("spawn", "forkserver"):
            raise ValueError(f"context must be 'spawn' or 'forkserver' (not 'fork': the trainer has threads), got {context!r}")
        if startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s}")
        self.num_workers = num_workers
        self._context = multiprocessing.get_context(context)
        self._initializer = initializer
        self._startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()  # one map() at a time; workers are not shared between calls
        self._closed = False
        self.replacements = 0  # workers started to replace killed/crashed ones (for logs and tests)
        self._last_death = "none"  # how the latest worker died, for start-up error messages
        self._startup_failures = 0  # workers in a row that died or hung before reporting ready

    def worker_pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    def _start_worker(self) -> _Worker:
        return _Worker(self._context, self._initializer)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._start_worker()
        self.replacements += 1

    def start(self) -> None:
        """Start every worker now and wait until all report ready (imports done), so that the first
        map() call is not slowed by start-up. Optional: map() starts workers lazily."""
        with self._lock:
            self._check_open()
            self._guarded(self._start_locked)

    def map(self, fn: Callable, arg_tuples: Sequence[tuple], timeout_s: float) -> list[TaskOutcome]:
        """One TaskOutcome per argument tuple, in order. Returns within about
        ceil(len / num_workers) * timeout_s plus worker start-up time, whatever the tasks do; a
        task's deadline starts when a ready worker receives it."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        with self._lock:
            self._check_open()
            if not arg_tuples:
                return []
            return self._guarded(self._map_locked, fn, list(arg_tuples), timeout_s)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("DeadlinePool is closed")

    def _guarded(self, method, *args):
        try:
            return method(*args)
        except BaseException:
            # Workers may still hold tasks of this call; a later call must not see them busy.
            for worker in self._workers:
                worker.kill()
            self._workers.clear()
            raise

    def _start_locked(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(self._start_worker())
        self._startup_failures = 0
        while not all(worker.ready for worker in self._workers):
            self._process_events(outcomes=[], timeout_s=0.0)

    def _map_locked(self, fn, arg_tuples: list[tuple], timeout_s: float) -> list[TaskOutcome]:
        outcomes: list[Optional[TaskOutcome]] = [None] * len(arg_tuples)
        pending = deque(range(len(arg_tuples)))
        while len(self._workers) < min(self.num_workers, len(arg_tuples)):
            self._workers.append(self._start_worker())
        self._startup_failures = 0
        while pending or any(w.task_index is not None for w in self._workers):
            for worker in list(self._workers):
                if worker.ready and worker.task_index is None and pending:
                    index = pending.popleft()
                    try:
                        worker.conn.send((index, fn, arg_tuples[index]))
                    except (BrokenPipeError, EOFError, OSError):
                        pending.appendleft(index)  # never reached the worker: run it elsewhere
                        self._replace(worker)
                        continue
                    except Exception as exc:  # the task itself cannot be pickled
                        outcomes[index] = TaskOutcome("error", message=f"could not send the task: {type(exc).__name__}: {exc}")
                        continue
                    worker.task_index = index
                    worker.deadline = time.monotonic() + timeout_s
            self._process_events(outcomes, timeout_s)
        return outcomes  # type: ignore[return-value]

    def _process_events(self, outcomes: list, timeout_s: float) -> None:
        """Wait for the next message, worker death or deadline, and handle whatever happened."""
        waitables = {}
        for worker in self._workers:
            waitables[worker.conn] = worker
            waitables[worker.process.sentinel] = worker
        deadlines = [w.deadline for w in self._workers if w.task_index is not None]
        deadlines += [w.started_at + self._startup_timeout_s for w in self._workers if not w.ready]
        wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        ready = multiprocessing.connection.wait(list(waitables), timeout=wait_s)

        handled: set[int] = set()
        for handle in ready:
            worker = waitables[handle]
            if id(worker) in handled or worker not in self._workers:
                continue
            handled.add(id(worker))
            message = None
            pipe_closed = False
            if worker.conn.poll():
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    pipe_closed = True  # a worker that cannot talk is as good as dead
            if message is None:
                if worker.process.is_alive() and not pipe_closed:
                    continue  # spurious wake-up
                if not worker.ready:
                    self._startup_failures += 1
                self._handle_death(worker, outcomes)
                continue
            kind = message[0]
            if kind == "ready":
                worker.ready = True
                self._startup_failures = 0
            elif kind == "init_error":
                raise PoolStartupError(f"reward worker initializer failed: {message[1]}")
            else:
                task_id, status, payload = message
                if task_id == worker.task_index:
                    outcomes[task_id] = TaskOutcome(status, value=payload) if status == "ok" else TaskOutcome(status, message=payload)
                    worker.task_index = None

        now = time.monotonic()
        for worker in list(self._workers):
            if worker.task_index is not None and now >= worker.deadline:
                index = worker.task_index
                outcomes[index] = TaskOutcome("timeout", message=f"no result within {timeout_s:g} s; worker killed")
                logger.warning("reward task %d timed out after %.3g s; replacing worker pid %s", index, timeout_s, worker.process.pid)
                self._replace(worker)
            elif not worker.ready and now >= worker.started_at + self._startup_timeout_s:
                self._last_death = f"not ready within {self._startup_timeout_s:g} s"
                self._startup_failures += 1
                self._replace(worker)
        if self._startup_failures >= 3 * self.num_workers:
            raise PoolStartupError(
                f"reward workers keep dying or hanging before they are ready ({self._startup_failures} in a row, "
                f"startup timeout {self._startup_timeout_s:g} s; the last one: {self._last_death}). "
                f"With the 'spawn' context the main module must guard its entry point with "
                f"`if __name__ == '__main__':`."
            )

    def _handle_death(self, worker: _Worker, outcomes: list) -> None:
        worker.kill()  # reaps it; kills it first if it only closed its pipe
        exitcode = worker.process.exitcode
        how = f"killed by signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
        self._last_death = how
        if worker.task_index is not None:
            outcomes[worker.task_index] = TaskOutcome("crashed", message=f"worker died mid-task ({how})")
            logger.warning("reward worker pid %s died mid-task (%s); replacing it", worker.process.pid, how)
            worker.task_index = None
        self._replace(worker)

    def close(self) -> None:
        """Stop every worker (politely, then SIGKILL) and reap it; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for worker in self._workers:
                try:
                    worker.conn.send(_STOP)
                except (BrokenPipeError, EOFError, OSError):
                    pass
            deadline = time.monotonic() + 2.0
            for worker in self._workers:
                worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
                worker.kill()
            self._workers.clear()
