"""The server's life outside the routes: listening, and stopping without cutting streams off.

`listen` accepts connections for the app's runner, closing any connection that has not sent a
request's headers within `header_timeout` seconds (a client that opens sockets and sends
nothing would otherwise hold them for good). `run_until_signal` serves until SIGTERM or SIGINT
(what containers and systemd send), then drains: it stops accepting, answers new requests on
open connections with 503, lets running requests finish for up to `shutdown_timeout` seconds,
then stops the engine, which ends the rest with an error (a stream gets an error event and
`[DONE]`, never a truncated transfer), and returns for the caller to clean up the runner.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

from aiohttp import web

from .app import LOADING, SETTINGS

log = logging.getLogger("eeyore.serve")
END_OF_HEADERS = b"\r\n\r\n"


class HeaderDeadline(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection: closes it if the first request's headers
    have not all arrived within the deadline. Everything else is passed through."""

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self.inner, self.timeout = inner, timeout
        self.seen = b""  # the tail of what arrived so far, enough to find the end of the headers
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.timer = asyncio.get_running_loop().call_later(self.timeout, transport.close)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            self.seen = (self.seen + data)[-(len(data) + 3):]
            if END_OF_HEADERS in self.seen:
                self.timer.cancel()
                self.timer, self.seen = None, b""
        self.inner.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


async def listen(runner: web.AppRunner, host: str, port: int, header_timeout: float) -> asyncio.Server:
    """Accept connections for `runner` (already set up) on host:port."""
    server = runner.server
    return await asyncio.get_running_loop().create_server(
        lambda: HeaderDeadline(server(), header_timeout), host, port, reuse_address=True)


async def run_until_signal(app: web.Application, runner: web.AppRunner, listener: asyncio.Server,
                           shutdown_timeout: float, on_ready: Callable[[], None]) -> None:
    """Serve until SIGTERM/SIGINT, then drain and stop (see the module's docstring)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = asyncio.ensure_future(asyncio.shield(app[LOADING]))
    signalled = asyncio.ensure_future(stop.wait())
    await asyncio.wait([loading, signalled], return_when=asyncio.FIRST_COMPLETED)
    if loading.done():
        loading.result()  # a model that failed to load (or a bad flag) ends the server here
        on_ready()
        await signalled
    await drain(app, listener, shutdown_timeout)


async def drain(app: web.Application, listener: asyncio.Server, shutdown_timeout: float) -> None:
    settings = app[SETTINGS]
    settings.draining = True
    listener.close()  # no new connections
    log.info("stopping: new requests refused; waiting up to %gs for %d running", shutdown_timeout, settings.active)
    if not await _until(lambda: settings.active == 0, shutdown_timeout):
        log.warning("%d requests still running after %gs: ending them with an error", settings.active, shutdown_timeout)
    loading = app[LOADING]
    if loading.done() and loading.exception() is None:
        await asyncio.get_running_loop().run_in_executor(None, loading.result().close)
        await _until(lambda: settings.active == 0, 5.0)  # the handlers write their error events
    log.info("stopped")


async def _until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True
