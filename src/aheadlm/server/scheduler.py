"""The scheduler thread between the HTTP handlers (asyncio) and the batch engine.

Handlers submit requests into a bounded queue; one thread admits them into free batch rows and
runs rounds while any row is active. Tokens flow back through per-request asyncio queues. Every
running request gets one row, so rounds are shared fairly; waiting ones are admitted in arrival
order. A handler that goes away (disconnect, timeout, stop string) cancels its request and the
row is freed at the next round.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from ..errors import AheadlmError
from .batching import BatchEngine, Request

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


@dataclass
class Metrics:
    requests: collections.Counter = field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0
    decode_seconds: float = 0.0
    rounds: int = 0
    round_seconds: float = 0.0

    def record(self, req: Request) -> None:
        s = req.stats
        self.prompt_tokens += s.prompt_tokens
        self.cached_prompt_tokens += s.cached_tokens
        self.completion_tokens += max(0, s.completion_tokens)
        self.drafted += s.drafted
        self.accepted += s.accepted
        self.target_forwards += s.target_forwards
        self.decode_seconds += s.decode_s


class Scheduler:
    def __init__(self, engine: BatchEngine, max_queue: int = 64):
        self.engine = engine
        self.max_queue = max_queue
        self.pending: collections.deque[Request] = collections.deque()
        self.lock = threading.Condition()
        self.metrics = Metrics()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="aheadlm-scheduler", daemon=True)
        self.thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self.pending)

    @property
    def running(self) -> int:
        return len(self.engine.active)

    def submit(self, req: Request, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        """Queue a request; returns the asyncio queue its (tokens, finish_reason | error, logprobs)
        arrive on."""
        out: asyncio.Queue = asyncio.Queue()
        user_emit = req.emit

        def emit(tokens, finish, logprobs=None):
            loop.call_soon_threadsafe(out.put_nowait, (tokens, finish, logprobs))
            if user_emit is not None:
                user_emit(tokens, finish, logprobs)
            if finish:
                self.metrics.record(req)

        req.emit = emit
        with self.lock:
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"the server queue is full ({self.max_queue} waiting requests)")
            self.pending.append(req)
            self.lock.notify()
        return out

    def cancel(self, req: Request) -> None:
        with self.lock:
            req.cancelled = True
            if req in self.pending:
                self.pending.remove(req)
            self.lock.notify()

    def shutdown(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        eng = self.engine
        while True:
            with self.lock:
                while not self.stopping and not self.pending and not eng.active:
                    self.lock.wait()
                if self.stopping:
                    return
                # One admission (one prefill) per round keeps the running rows moving.
                admit = None
                while self.pending and eng.has_free_slot():
                    req = self.pending.popleft()
                    if not req.cancelled:
                        admit = req
                        break
            if admit is not None:
                self._guarded(eng.admit, [admit], admit)
            if eng.active:
                t0 = time.perf_counter()
                self._guarded(eng.step, None)
                self.metrics.rounds += 1
                self.metrics.round_seconds += time.perf_counter() - t0

    def _guarded(self, call, rows: list[Request] | None, *args) -> None:
        """Run an engine call; if it fails, fail `rows` (None: the rows still running) and free them.

        A request's own error (AheadlmError) is a 400; anything else is a bug, logged with its
        traceback and answered with a 500, and the scheduler thread goes on serving the others."""
        try:
            call(*args)
        except AheadlmError as e:
            self._fail(rows, f"error:{e}")
        except Exception as e:  # noqa: BLE001 - the thread must outlive any one request
            log.exception("engine failure; failing the requests it touched")
            self._fail(rows, f"internal:{type(e).__name__}: {e}")

    def _fail(self, rows: list[Request] | None, finish: str) -> None:
        for r in list(self.engine.active) if rows is None else rows:
            self.engine.release(r, keep=False)  # its K/V may be half written
            r.emit([], finish)
