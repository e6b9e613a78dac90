"""The HTTP connection handling under `cifarlab serve`: uvicorn's protocol with a deadline for request headers.

uvicorn waits as long as a client likes for a request's line and headers: a connection that opens and sends
nothing, or trickles a header line every few seconds (slowloris), stays open, and enough of them exhaust the
process's file descriptors while each costs the client almost nothing. uvicorn closes idle connections only
after a response (its keep-alive timeout). `header_deadline_protocol` adds the missing deadline: from the moment a
connection opens, and again after each response, the next request's headers must be complete within the deadline
or the connection is closed. A request whose headers arrived is not affected (its body and handling have the
service's own request timeout). This guards one process; behind a public address a reverse proxy still belongs
in front (connection limits per client, TLS).
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["header_deadline_protocol"]


def _uvicorn_protocol() -> type:
    """The protocol class uvicorn's `http="auto"` picks: httptools' when it is installed, else h11's."""
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def header_deadline_protocol(seconds: float, base: type | None = None) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol (`base`, default: the one uvicorn would pick) that closes a connection
    whose next request has not finished its headers `seconds` after the connection opened or its last response
    was sent. Pass it to uvicorn as `http=`.

    It relies on what both of uvicorn's protocols have in common: `loop`, `transport`, and `cycle` (the current
    request, set when a request's headers have been parsed)."""
    if not seconds > 0:
        raise ValueError(f"the header deadline must be a positive number of seconds, not {seconds!r}")
    parent: Any = base or _uvicorn_protocol()

    class HeaderDeadline(parent):
        header_timeout = seconds

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._deadline: asyncio.TimerHandle | None = None
            self._started = self.cycle  # the request whose headers arrived last (none yet)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(self.header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.cycle is self._started and not self.transport.is_closing():
                self.transport.close()  # no request began: the client is idle or trickling its headers

        def _note_requests(self) -> None:
            if self.cycle is not None and self.cycle is not self._started:
                self._started = self.cycle  # a request's headers are complete: the deadline has been met
                self._disarm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._note_requests()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start a pipelined request already received
            self._note_requests()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the next request's headers get the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    HeaderDeadline.__name__ = HeaderDeadline.__qualname__ = f"HeaderDeadline{parent.__name__}"
    return HeaderDeadline
