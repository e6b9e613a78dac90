"""`cifarlab serve`'s connection handling: a real uvicorn server on a free port with the header-deadline protocol
(`cifarlab.serve_protocol`), raw sockets as clients. Idle and trickling connections are closed at the deadline;
requests whose headers arrive in time, slow handlers and keep-alive reuse are not affected."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

uvicorn = pytest.importorskip("uvicorn", reason="cifarlab serve needs uvicorn (pip install 'cifarlab[serve]')")

from cifarlab.serve_protocol import header_deadline_protocol  # noqa: E402

DEADLINE = 0.6


async def app(scope, receive, send):  # a minimal ASGI app: /slow answers after twice the deadline
    assert scope["type"] == "http"
    if scope["path"] == "/slow":
        await asyncio.sleep(2 * DEADLINE)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(params=["h11", "httptools"])
def server(request) -> Iterator[tuple[str, int]]:
    if request.param == "httptools":
        pytest.importorskip("httptools", reason="uvicorn's httptools protocol needs httptools")
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, http=header_deadline_protocol(DEADLINE, base), lifespan="off", log_level="warning", timeout_keep_alive=30
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    yield sock.getsockname()
    srv.should_exit = True
    thread.join(10)
    sock.close()


def closed_after(conn: socket.socket, limit: float = 5.0) -> float:
    """Seconds until the server closed `conn` (reading until EOF), or fail past `limit`."""
    t0 = time.monotonic()
    conn.settimeout(limit)
    while conn.recv(4096):
        pass
    return time.monotonic() - t0


def get(path: str = "/") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


def response(conn: socket.socket) -> bytes:
    """One whole response of `app` (its body is the 2 bytes "ok")."""
    data = b""
    while not (b"\r\n\r\n" in data and data.endswith(b"ok")):
        chunk = conn.recv(4096)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(server):
    with socket.create_connection(server) as conn:
        assert DEADLINE * 0.8 < closed_after(conn) < DEADLINE + 2


def test_trickled_headers_do_not_extend_the_deadline(server):
    with socket.create_connection(server) as conn:
        t0 = time.monotonic()
        conn.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        with pytest.raises(OSError):  # the server closes the connection while we are still trickling
            for i in range(40):
                time.sleep(DEADLINE / 6)
                conn.sendall(f"X-Slow-{i}: 1\r\n".encode())
        assert time.monotonic() - t0 < DEADLINE + 2


def test_requests_in_time_slow_handlers_and_keep_alive_are_untouched(server):
    with socket.create_connection(server) as conn:
        conn.settimeout(10)
        conn.sendall(get("/slow"))  # headers at once, the answer after twice the deadline: still delivered
        assert response(conn).startswith(b"HTTP/1.1 200")
        for _ in range(3):  # the same connection, requests a little apart (each within the re-armed deadline)
            time.sleep(DEADLINE / 2)
            conn.sendall(get())
            assert response(conn).startswith(b"HTTP/1.1 200")
        conn.sendall(b"GET / HTTP/1.1\r\n")  # then a request that never finishes its headers
        assert closed_after(conn) < DEADLINE + 2


def test_the_deadline_must_be_positive():
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive number of seconds"):
            header_deadline_protocol(bad)
