"""Running the simulator: in a background thread (tests, demo, benchmarks) or
in the foreground until SIGINT/SIGTERM (the ``orchestrator simulator`` command)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from aiohttp import web

from orchestrator.simulator.accounts import SimulatorAccount
from orchestrator.simulator.app import create_app
from orchestrator.simulator.config import Fault, SimulatorConfig
from orchestrator.simulator.state import SimulatorState

logger = logging.getLogger("orchestrator.simulator")

#: Listen backlog: benchmarks open hundreds of connections at once.
BACKLOG = 2048


def _make_runner(app: web.Application, shutdown_timeout: float) -> web.AppRunner:
    # access_log=None: the simulator's middleware logs one line per request
    # (method, path, status, latency) and never a header or body.
    return web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout
    )


class SimulatorServer:
    """The simulator on its own event loop in a background thread.

    >>> with SimulatorServer(SimulatorConfig(latency_seconds=0.1)) as sim:
    ...     sim.base_url  # "http://127.0.0.1:PORT"

    Every method below is thread-safe and acts on the live state.
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        shutdown_timeout: float = 0.25,
    ) -> None:
        self.state = SimulatorState(config)
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._shutdown_timeout = shutdown_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> SimulatorServer:
        """Start serving; returns once the port is bound (raises if it cannot be)."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        ready = threading.Event()
        errors: list[BaseException] = []
        thread = threading.Thread(
            target=self._thread_main, args=(ready, errors), name="deepbrain-simulator", daemon=True
        )
        self._thread = thread
        thread.start()
        ready.wait()
        if errors:
            thread.join()
            self._thread = None
            raise errors[0]
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving; in-flight requests get ``shutdown_timeout`` seconds, then are cancelled."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closed in between
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("simulator thread did not stop in time")
        self._thread = None
        self._port = None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _thread_main(self, ready: threading.Event, errors: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready, errors))
        except BaseException as exc:  # start-up errors reach start() through `errors`
            if not ready.is_set():
                errors.append(exc)
            else:
                logger.exception("simulator stopped with an error")
        finally:
            ready.set()
            try:
                _cancel_remaining(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    async def _serve(self, ready: threading.Event, errors: list[BaseException]) -> None:
        self._stop_event = asyncio.Event()
        runner = _make_runner(create_app(state=self.state), self._shutdown_timeout)
        await runner.setup()
        try:
            site = web.TCPSite(
                runner, self.host, self._requested_port, backlog=BACKLOG, reuse_address=True
            )
            await site.start()
            self._port = int(runner.addresses[0][1])
            ready.set()
            await self._stop_event.wait()
        finally:
            await runner.cleanup()

    # -- addresses ---------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("simulator is not running")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT``, the value for ``ORCHESTRATOR_DEEPBRAIN_BASE_URL``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # -- state access (thread-safe) ---------------------------------------------------

    @property
    def config(self) -> SimulatorConfig:
        return self.state.config

    def sessions(
        self, status: str | None = None, account: str | None = None
    ) -> list[dict[str, Any]]:
        """Snapshot of every session ever created, of ``account`` when given (same as
        ``GET /_sim/sessions?account=NAME``); each names its ``account``."""
        return self.state.sessions(status, account)

    def accounts(self) -> list[SimulatorAccount]:
        """The accounts served (same as ``GET /_sim/accounts``)."""
        return self.state.accounts()

    def configure_account(self, name: str, **knobs: Any) -> SimulatorAccount:
        """Change one account at runtime, e.g. ``server_errors=True`` then ``False``
        (same as ``POST /_sim/accounts/NAME/config``)."""
        return self.state.configure_account(name, **knobs)

    def configure(self, **knobs: Any) -> SimulatorConfig:
        """Change knobs at runtime (same as ``POST /_sim/config``)."""
        return self.state.configure(**knobs)

    def push_fault(self, fault: Mapping[str, Any] | Fault) -> Fault:
        """Queue a scripted fault (same as ``POST /_sim/faults``)."""
        return self.state.push_fault(fault)

    def stats(self) -> dict[str, Any]:
        """Call counts per endpoint and status (same as ``GET /_sim/stats``)."""
        return self.state.stats()

    def reset(self, *, restore_config: bool = False) -> None:
        """Clear sessions, faults and stats (same as ``POST /_sim/reset``)."""
        self.state.reset(restore_config=restore_config)

    def revoke_tokens(self, account: str | None = None) -> None:
        """Invalidate every session token issued so far (of ``account`` alone when given)."""
        self.state.revoke_tokens(account)

    def end_session(self, session_id: str, reason: str = "ERROR") -> str:
        """End a session vendor-side; returns "ok", "unknown" or "ended"."""
        return self.state.end_session(session_id, reason, ended_by="admin")


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def run(
    config: SimulatorConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8800,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the simulator in the foreground until SIGINT or SIGTERM.

    ``on_ready`` is called with the base URL once the port is bound (useful
    with ``port=0``).
    """
    asyncio.run(_serve_forever(config or SimulatorConfig(), host, port, on_ready))


async def _serve_forever(
    config: SimulatorConfig,
    host: str,
    port: int,
    on_ready: Callable[[str], None] | None,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    runner = _make_runner(create_app(config), shutdown_timeout=2.0)
    await runner.setup()
    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        site = web.TCPSite(runner, host, port, backlog=BACKLOG, reuse_address=True)
        await site.start()
        bound = int(runner.addresses[0][1])
        shown = f"[{host}]" if ":" in host else host
        base_url = f"http://{shown}:{bound}"
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        logger.info("DeepBrain simulator listening on %s", base_url)
        if on_ready is not None:
            on_ready(base_url)
        await stop.wait()
        logger.info("DeepBrain simulator shutting down")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
