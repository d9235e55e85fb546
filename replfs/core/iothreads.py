"""A small pool of threads for blocking disk calls, with a cheap hop.

``trio.to_thread.run_sync`` costs about 100 us of the trio thread's time per
call here (a capacity limiter, context copying, thread naming, its thread
cache).  A read that misses the page cache, while other requests wait, needs
only: hand the call to an idle thread, park, be woken with the result.
:func:`run` does just that: a ``queue.SimpleQueue`` of jobs, threads started
on demand up to :data:`MAX_THREADS` (then jobs queue), and the result comes
back through ``TrioToken.run_sync_soon``.

Like ``to_thread`` with ``abandon_on_cancel=False``, a started call is never
abandoned: cancellation waits for it, so buffers and file descriptors stay
valid while a thread uses them.
"""

from __future__ import annotations

import queue
import threading

import outcome
import trio

#: At most this many threads (a queue depth of 16 or so is what pays on a disk).
MAX_THREADS = 16

_jobs: queue.SimpleQueue = queue.SimpleQueue()
_lock = threading.Lock()
_threads = 0  # started
_idle = 0  # waiting for a job
_queued = 0  # put and not yet taken


def _worker() -> None:
    global _idle, _queued
    while True:
        with _lock:
            _idle += 1
        job = _jobs.get()
        with _lock:
            _idle -= 1
            _queued -= 1
        fn, args, token, deliver = job
        result = outcome.capture(fn, *args)
        try:
            token.run_sync_soon(deliver, result)
        except trio.RunFinishedError:  # pragma: no cover - the run ended under us
            pass
        del job, fn, args, token, deliver, result


def _submit(job) -> None:
    """Queue ``job``; start a thread unless an idle one will take it."""
    global _threads, _queued
    with _lock:
        _queued += 1
        spawn = _idle < _queued and _threads < MAX_THREADS
        if spawn:
            _threads += 1
    if spawn:
        threading.Thread(target=_worker, name="replfs-io", daemon=True).start()
    _jobs.put(job)


async def run(fn, *args):
    """``fn(*args)`` in a pool thread; its result or exception, here."""
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result) -> None:
        trio.lowlevel.reschedule(task, result)

    await trio.lowlevel.checkpoint_if_cancelled()
    _submit((fn, args, token, deliver))
    # Not cancellable once queued: the thread will use the caller's buffers.
    # The outcome delivered is unwrapped here: a value, or the exception raised.
    return await trio.lowlevel.wait_task_rescheduled(
        lambda raise_cancel: trio.lowlevel.Abort.FAILED)


def statistics() -> dict:
    return {"threads": _threads, "idle": _idle}
