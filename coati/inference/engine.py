"""A request queue in front of `Generator`: one background thread batches waiting requests into `generate`.

Async callers (the server) submit token-id prompts and await a `Completion`, or iterate text pieces of a
streaming request. The worker takes the oldest waiting request, adds up to `max_batch_size - 1` more with
the same sampling settings (`SamplingParams.batch_key`), and runs one left-padded `generate`; streaming
requests share batches too and get their text pieces as the batch produces them. A batch runs to its
end before the next one starts (static batching: simple, and enough for a single-GPU server).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol, Sequence, TypeVar

from coati.inference.generation import Completion, Generator, Row, SamplingParams


@dataclass
class _Request:
    """One caller's request, shared by both engines: `complete()` waits on `future`, `stream()` reads `queue`."""

    prompt: Sequence[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future | None = None  # complete()
    queue: asyncio.Queue | None = None  # stream()
    cancel: threading.Event = field(default_factory=threading.Event)
    row: Row | None = None  # the vLLM engine's per-request tracker state

    @property
    def stream(self) -> bool:
        return self.queue is not None

    def reply(self, item: Any) -> None:
        """Hands a text piece, the `Completion` or an error to the caller; text pieces only reach streams."""
        if self.queue is not None:
            _post(self.loop, self.queue.put_nowait, item)
        elif not isinstance(item, str):
            _post(self.loop, _resolve, self.future, item)


def _post(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Hand a result to the caller's event loop; a loop already closed (server shut down) has no reader."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _resolve(fut: asyncio.Future, value) -> None:
    if fut.done():
        return
    if isinstance(value, BaseException):
        fut.set_exception(value)
    else:
        fut.set_result(value)


@dataclass
class EngineStats:
    """Counters the server's /health reports. `active` is every request submitted and not yet finished
    (queued or generating): 0 means the engine holds no per-request state. `cancelled` counts requests
    whose caller left before the end; their rows stopped at the next step (or never ran)."""

    requests: int = 0
    batches: int = 0
    max_batch: int = 0
    queued: int = 0
    active: int = 0
    cancelled: int = 0
    completion_tokens: int = 0  # generated in all, cancelled rows' partial answers included


class ServingEngine(Protocol):
    """What the server needs from an engine: `BatchingEngine` (HF generate) or `VLLMServingEngine` (vLLM)."""

    stats: EngineStats

    @property
    def tokenizer(self): ...

    @property
    def max_model_len(self) -> int | None: ...

    def start(self) -> "ServingEngine": ...

    def stop(self) -> None: ...

    async def complete(self, prompt: Sequence[int], params: SamplingParams) -> Completion: ...

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[str | Completion]: ...


_E = TypeVar("_E", bound="EngineBase")


class EngineBase:
    """The part both engines share: the worker thread, the waiting queue (`_pending`) under one condition,
    the stopped flag, `stats`, and the async `complete` / `stream` front. A subclass supplies `_step`, one
    turn of its worker, and takes requests off `_pending` there."""

    _thread_name = "coati-engine"

    def __init__(self) -> None:
        self._pending: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.stats = EngineStats()

    def start(self: _E) -> _E:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._thread_name, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _submit(self, req: _Request) -> None:
        with self._cond:
            if self._stopped:
                raise RuntimeError("engine is stopped")
            self._pending.append(req)
            self.stats.queued = len(self._pending)
            self.stats.active += 1
            self._cond.notify()

    async def complete(self, prompt: Sequence[int], params: SamplingParams) -> Completion:
        loop = asyncio.get_running_loop()
        req = _Request(prompt, params, loop, future=loop.create_future())
        self._submit(req)
        try:
            return await req.future
        finally:
            req.cancel.set()  # no-op after completion; drops the request if the caller was cancelled

    async def stream(self, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[str | Completion]:
        """Yields text pieces, then the final `Completion`."""
        loop = asyncio.get_running_loop()
        req = _Request(prompt, params, loop, queue=asyncio.Queue())
        self._submit(req)
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Completion):
                    return
        finally:
            req.cancel.set()

    # worker thread
    def _finished(self, n: int, cancelled: int, tokens: int) -> None:
        """Counts `n` requests done; `active` drops under the lock `_submit` raises it in."""
        with self._cond:
            self.stats.active -= n
            self.stats.cancelled += cancelled
            self.stats.completion_tokens += tokens

    def _loop(self) -> None:
        """`_step` runs in its own frame, so that no request outlives its turn in a local variable while
        the worker waits for the next one. An error in a turn goes to the callers it strands (a dead worker
        would leave them waiting forever), and the worker lives on."""
        while True:
            try:
                if not self._step():
                    return
            except Exception as err:  # noqa: BLE001 - handed to the callers
                with self._cond:
                    self._fail_all(err)

    def _step(self) -> bool:
        """One turn of the worker; False once the engine stops."""
        raise NotImplementedError

    def _await_work(self, holding: bool = False) -> bool:
        """Under `_cond` (the caller holds it): waits for a request unless the worker is `holding` some; once the
        engine stops, hands every request it holds an error and returns False."""
        while not self._pending and not holding and not self._stopped:
            self._cond.wait()
        if self._stopped:
            self._fail_all(RuntimeError("engine is stopped"))
            return False
        return True

    def _fail_all(self, err: BaseException) -> None:
        """Hands `err` to every request the engine holds (here: the waiting ones); called under `_cond`."""
        while self._pending:
            self._finished(1, 0, 0)
            self._pending.popleft().reply(err)
        self.stats.queued = 0


class BatchingEngine(EngineBase):
    """Owns the generation thread. `start()` before use, `stop()` to end the thread. The server needs only
    this interface (`tokenizer`, `max_model_len`, `stats`, `start`, `stop`, `complete`, `stream`), which
    `coati.inference.vllm_engine.VLLMServingEngine` shares through `EngineBase`."""

    def __init__(self, generator: Generator, max_batch_size: int = 8, batch_wait_s: float = 0.005):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        super().__init__()
        self.generator, self.max_batch_size, self.batch_wait_s = generator, max_batch_size, batch_wait_s

    @property
    def tokenizer(self):
        return self.generator.tokenizer

    @property
    def max_model_len(self) -> int | None:
        return self.generator.max_model_len

    # worker thread
    def _next_batch(self) -> list[_Request] | None:
        with self._cond:
            if not self._await_work():
                return None
        if self.batch_wait_s > 0 and self.max_batch_size > 1:
            time.sleep(self.batch_wait_s)  # let requests sent at the same moment join this batch
        with self._cond:
            first = self._pending.popleft()
            batch, keep, key = [first], deque(), first.params.batch_key()
            while self._pending:
                r = self._pending.popleft()
                if len(batch) < self.max_batch_size and r.params.batch_key() == key:
                    batch.append(r)
                else:
                    keep.append(r)
            self._pending = keep
            self.stats.queued = len(keep)
        return batch

    def _step(self) -> bool:
        """Runs the next batch; False once the engine stops."""
        batch = self._next_batch()
        if batch is None:
            return False
        left = [r for r in batch if r.cancel.is_set()]  # callers gone while their request waited
        if left:
            self._finished(len(left), len(left), 0)
        batch = [r for r in batch if not r.cancel.is_set()]
        if batch:
            self._run(batch)
        return True

    def _run(self, batch: list[_Request]) -> None:
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.max_batch = max(self.stats.max_batch, len(batch))
        callbacks = [r.reply if r.stream else None for r in batch]
        try:
            outs = self.generator.generate([r.prompt for r in batch], [r.params for r in batch],
                                           [r.cancel for r in batch], callbacks)
        except Exception as err:  # every waiting caller gets the error; the worker lives on
            outs = [err] * len(batch)
        done = [o for o in outs if isinstance(o, Completion)]
        self._finished(len(batch), sum(o.finish_reason == "cancelled" for o in done),
                       sum(o.completion_tokens for o in done))
        for r, out in zip(batch, outs):
            r.reply(out)
