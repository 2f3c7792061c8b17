"""One worker thread for the CPU side of each prompt, so the engines go on meanwhile.

After a prompt's engine passes, what remains is CPU work: MOS scoring of both sides' audio,
judging the traces and writing the prompt's result files. On a GPU run the device would sit idle
through it; handed to this worker, it overlaps the next prompt's passes (torch, onnxruntime and
file writes release the GIL). Work runs strictly in submission order on one thread, so results
are written in the order the serial loop wrote them. The first failure of a job is raised in the
caller's thread at the next ``submit`` or at ``drain``, which always waits for every job: a
failing run still writes every result that was finished.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class PromptWorker:
    """A FIFO of jobs on one background thread (see the module docstring)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parity-prompt")
        self._pending: list[Future] = []

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Queue ``fn(*args, **kwargs)``; first raise the failure of any job already finished."""
        self._raise_finished()
        future = self._pool.submit(fn, *args, **kwargs)
        self._pending.append(future)
        return future

    def _raise_finished(self) -> None:
        while self._pending and self._pending[0].done():
            self._pending.pop(0).result()

    def drain(self) -> None:
        """Wait for every queued job, then raise the first failure among them (if any)."""
        failure: BaseException | None = None
        while self._pending:
            future = self._pending.pop(0)
            try:
                future.result()
            except BaseException as e:  # noqa: BLE001 - kept and re-raised after the rest finished
                failure = failure or e
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Drain, then stop the thread."""
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)
