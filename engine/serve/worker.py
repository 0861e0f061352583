"""The engine thread: the one thread that touches the LLMEngine (which is not thread-safe).

HTTP handlers run on the asyncio loop. They hand requests and aborts to the engine thread through a
thread-safe queue (`submit`, `release`); the thread applies them between steps, calls `step()`
while any request is unfinished and blocks on the queue when there is none (no busy loop). After
each round it hands everything that happened -- accepted or refused requests, each request's DELTA
output, the engine's stats -- back to the loop in one `call_soon_threadsafe`, where each event goes
to its request's asyncio.Queue.

Under tensor parallelism (torchrun, --tensor-parallel-size N) this runs on rank 0, which also serves
HTTP; every round it broadcasts the commands it is about to apply (Submit / Abort / Stop, images
included) to the other ranks, which apply the same commands and step in lockstep (`follow`). When
idle it broadcasts an empty round every HEARTBEAT_S, so the followers' collective never times out.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import EngineError
from ..llm_engine import LLMEngine
from ..sampling import RequestOutputKind, SamplingParams
from ..sequence import RequestOutput
from .metrics import ServeMetrics
from .protocol import ServeError

logger = logging.getLogger("engine.serve")
HEARTBEAT_S = 30.0


@dataclass
class Submit:
    request_id: str
    prompt: Any
    sampling: dict  # SamplingParams fields; max_tokens None: what the context has room for
    arrival_time: float


@dataclass
class Abort:
    request_id: str


@dataclass
class Stop:
    pass


@dataclass
class Accepted:
    """The engine took the request (its prompt fits); outputs follow."""


@dataclass
class Failed:
    status: int
    message: str


class CommandBroadcast:
    """Rank 0's commands of a round, sent to every rank of the tensor-parallel group (a gloo group of its
    own, so it works whatever backend the model's collectives use)."""

    def __init__(self, tp_size: int):
        import torch.distributed as dist

        from ..distributed import timeout

        self.dist = dist
        self.group = dist.new_group(list(range(tp_size)), backend="gloo", timeout=timeout())

    def share(self, commands: list | None) -> list:
        box = [commands]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class EngineWorker:
    def __init__(self, engine: LLMEngine, max_waiting: int | None = None, metrics: ServeMetrics | None = None,
                 broadcast: CommandBroadcast | None = None):  # fmt: skip
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.broadcast = broadcast
        self.stats = engine.stats()  # as of the last round the loop has seen
        self.error: str | None = None  # why the engine thread died, if it did
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}  # loop side: requests with a client waiting
        self._unacked: set[str] = set()  # loop side: submitted, not yet accepted or refused
        self._active: set[str] = set()  # engine thread: requests in the engine
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- the loop's side -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_queued(self) -> int:
        """Requests handed to the engine thread that it has not taken yet."""
        return len(self._unacked)

    def check_admission(self) -> None:
        """ServeError unless a new request can be taken now (503 with Retry-After when the waiting queue
        is full, or while shutting down; 500 when the engine died)."""
        if self.error is not None:
            raise ServeError(self.error, status=500)
        if self._stopping:
            raise ServeError("the server is shutting down", status=503)
        waiting = self.stats.num_waiting + self.num_queued
        if self.max_waiting is not None and waiting >= self.max_waiting:
            raise ServeError(f"the server is busy: {waiting} requests are waiting (--max-waiting {self.max_waiting});"
                             " retry later", status=503, headers={"Retry-After": "1"})  # fmt: skip

    def submit(self, request_id: str, prompt, sampling: dict) -> asyncio.Queue:
        """Hand a request to the engine thread; its events (Accepted or Failed, then RequestOutputs
        until one is finished) arrive on the returned queue."""
        self.check_admission()
        events: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = events
        self._unacked.add(request_id)
        self._commands.put(Submit(request_id, prompt, sampling, time.perf_counter()))
        return events

    def release(self, request_id: str) -> None:
        """The client is done with a request: abort it if it has not finished (its KV blocks are freed
        on the engine thread's next round)."""
        if self._streams.pop(request_id, None) is not None:
            self._commands.put(Abort(request_id))

    async def stop(self) -> None:
        """Stop taking requests, abort what is left, end the engine thread (after the server drained)."""
        self._stopping = True
        if self._thread is not None:
            self._commands.put(Stop())
            await asyncio.to_thread(self._thread.join)

    def _dispatch(self, events: list[tuple[str, Any]], stats) -> None:
        """On the loop: one round's events to their requests' queues."""
        self.stats = stats
        for request_id, event in events:
            if not isinstance(event, RequestOutput):
                self._unacked.discard(request_id)
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            stream.put_nowait(event)
            if isinstance(event, Failed) or (isinstance(event, RequestOutput) and event.finished):
                del self._streams[request_id]
        if self.error is not None:  # the engine thread is gone: nothing else will answer these
            for stream in self._streams.values():
                stream.put_nowait(Failed(500, self.error))
            self._streams.clear()
            self._unacked.clear()

    # ---- the engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                commands = self._take(block=not self.engine.has_unfinished_requests())
                if self.broadcast is not None:
                    self.broadcast.share(commands)
                events: list[tuple[str, Any]] = []
                running = self.apply(commands, events)
                if running and self.engine.has_unfinished_requests():
                    outputs = self.step()
                    if self.metrics is not None:
                        self.metrics.observe(outputs)
                    events += [(out.request_id, out) for out in outputs]
                self._publish(events)
                if not running:
                    self._fail_all(Failed(503, "the server shut down before this request finished"))
                    return
        except Exception as e:  # a bug, not a request: every request fails, /health says so
            logger.exception("engine.serve: the engine thread failed")
            self.error = f"the engine failed: {type(e).__name__}: {e}"
            self._fail_all(Failed(500, self.error))

    def _take(self, block: bool) -> list:
        """The commands waiting now; when `block`, at least one (or none after HEARTBEAT_S under tensor
        parallelism, so the other ranks hear from rank 0)."""
        commands = []
        if block:
            try:
                commands.append(self._commands.get(timeout=HEARTBEAT_S if self.broadcast else None))
            except queue.Empty:
                return commands
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def apply(self, commands: list, events: list) -> bool:
        """Apply one round's commands to the engine (every rank does the same); False once told to stop."""
        engine = self.engine
        for command in commands:
            if isinstance(command, Stop):  # nothing is submitted after it (stop() refuses new requests first)
                return False
            if isinstance(command, Abort):
                if command.request_id in self._active:
                    engine.abort_request(command.request_id)
                    self._active.discard(command.request_id)
                    if self.metrics is not None:
                        self.metrics.finished(command.request_id, "abort")
                continue
            try:
                params = self._params(command)
                engine.add_request(command.request_id, command.prompt, params, arrival_time=command.arrival_time)
            except EngineError as e:
                events.append((command.request_id, Failed(400, str(e))))
                continue
            self._active.add(command.request_id)
            events.append((command.request_id, Accepted()))
        return True

    def _params(self, command: Submit) -> SamplingParams:
        """The request's SamplingParams (DELTA outputs); without max_tokens, as many tokens as the context
        and the KV cache leave room for after the prompt (vLLM's default)."""
        sampling = dict(command.sampling)
        if sampling["max_tokens"] is None:
            c = self.engine.config
            n = len(self.engine.prompt_token_ids(command.prompt))
            room = min(c.max_model_len, c.num_blocks * c.block_size) - n
            if room < 1:
                raise EngineError(f"the prompt is {n} tokens: no room left for an answer within max_model_len "
                                  f"{c.max_model_len}")  # fmt: skip
            sampling["max_tokens"] = room
        return SamplingParams(**sampling, output_kind=RequestOutputKind.DELTA)

    def step(self) -> list[RequestOutput]:
        outputs = self.engine.step()
        for out in outputs:
            if out.finished:
                self._active.discard(out.request_id)
        return outputs

    def _publish(self, events: list) -> None:
        """One round's events and the engine's stats to the loop (every round: aborts change the stats)."""
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._dispatch, events, self.engine.stats())
        except RuntimeError:  # the loop has closed: nobody is waiting
            pass

    def _fail_all(self, failure: Failed) -> None:
        """End every request still in the engine, and every request never taken, with `failure`."""
        events = [(rid, failure) for rid in self._active]
        if self._active:
            self.engine.abort_request(list(self._active))
            self._active.clear()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, Submit):
                events.append((command.request_id, failure))
        self._publish(events)


def follow(engine: LLMEngine, broadcast: CommandBroadcast) -> None:
    """Ranks > 0 under tensor parallelism: apply rank 0's commands and step with it, until it stops.
    SIGTERM and SIGINT are ignored here (torchrun and a terminal send them to every rank): rank 0
    drains its requests and then tells the followers to stop, which they could not hear if dead."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    worker = EngineWorker(engine)
    while worker.apply(broadcast.share(None), []):
        if engine.has_unfinished_requests():
            worker.step()
