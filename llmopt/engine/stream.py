"""Serving the engine to asyncio code: a background thread owns the engine's core and steps it while
there is work; each request's deltas reach its own async stream through its event loop.

Commands (new requests, aborts) are queued to the thread and applied at the next step boundary,
so the core is only ever touched by one thread. A failing step ends the requests it was running
with finish_reason 'error' (the exception reaches their streams) and the loop goes on serving.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import TYPE_CHECKING, Any

from llmopt.errors import LLMOptError

if TYPE_CHECKING:
    from llmopt.engine.engine import Delta, Engine, Request


class EngineStepError(LLMOptError):
    """The engine failed while running this request."""


class BackgroundLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="llmopt-engine", daemon=True)
        self.thread.start()

    def in_engine_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def submit(self, request: Request) -> None:
        self.commands.put(("add", request))
        self.wake.set()

    def abort(self, request_id: str) -> bool:
        self.commands.put(("abort", request_id))
        self.wake.set()
        return True

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=30)

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, payload = self.commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.engine.add(payload)
            elif kind == "abort":
                self.engine.abort(payload)

    def _run(self) -> None:
        engine = self.engine
        while not self.stopping:
            self._apply_commands()
            if not engine.has_work():
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            try:
                engine.step()
            except Exception as exc:  # keep serving: fail only the requests of this step
                for request in [*engine.running, *engine.waiting]:
                    request.error = exc
                    engine._finish(request, "error")
        self._apply_commands()
        for request in [*engine.running, *engine.waiting]:
            engine._finish(request, "abort")


class RequestStream:
    """The async iterator ``Engine.submit`` returns; iterate it for ``Delta``s. Leaving the loop
    early (or ``await stream.aclose()``) aborts the request and frees its slot."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.request: Request | None = None
        self.done = False

    @property
    def request_id(self) -> str:
        assert self.request is not None
        return self.request.id

    def deliver(self, delta: Delta) -> None:
        """Called on the engine thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Delta:
        if self.done:
            raise StopAsyncIteration
        try:
            delta = await self.queue.get()
        except asyncio.CancelledError:
            await self.aclose()
            raise
        if delta.finished:
            self.done = True
            if delta.finish_reason == "error":
                error = self.request.error if self.request else None
                raise EngineStepError(f"The engine failed while generating: {error}") from error
        return delta

    async def aclose(self) -> None:
        if not self.done and self.request is not None:
            self.done = True
            self.engine.abort(self.request.id)
