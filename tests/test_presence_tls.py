"""The worker's announcement over https (on Fly, RELAY_CALLBACK_URL is the relay's https URL):
an answer read is an announcement taken, whether the relay (or a proxy in front of it) closes
with TLS's close_notify, drops the connection without it, or keeps it open."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fakes.servers import make_certificate
from vm import presence
from vm.presence import Announcer

pytestmark = pytest.mark.anyio
ANSWER = (
    b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{"ok":true}'
)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1: cert.pem and key.pem."""
    return make_certificate(tmp_path_factory.mktemp("tls"))


@contextmanager
def tls_server(mode: str, folder: Path) -> Iterator[tuple[int, list[bytes]]]:
    """A relay that answers 200 over TLS, then closes as `mode` says; yields its port and the
    requests it got. Everything it opened is closed when the block ends."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    got: list[bytes] = []
    held: list[ssl.SSLSocket] = []
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.05)

        def serve() -> None:
            while not stop.is_set():
                try:
                    raw, _ = listener.accept()
                except TimeoutError:
                    continue
                conn = ctx.wrap_socket(raw, server_side=True)
                data = b""
                while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                    data += conn.recv(65536)
                got.append(data)
                conn.sendall(ANSWER)
                if mode == "no_close_notify":
                    conn.close()  # SSLSocket.close(): TCP FIN without the TLS closing handshake
                elif mode == "close_notify":
                    try:
                        conn.unwrap().close()  # sends close_notify; the worker need not answer it
                    except (ssl.SSLError, OSError):
                        conn.close()
                else:
                    held.append(conn)  # a keep-alive proxy holding the connection open

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            yield listener.getsockname()[1], got
        finally:
            stop.set()
            thread.join()
            for conn in held:
                conn.close()


@pytest.mark.parametrize("mode", ["close_notify", "no_close_notify", "linger"])
async def test_an_https_announcement_the_relay_took_counts_as_taken(
    mode: str, certificate: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate / "cert.pem"))
    presence._tls_context.cache_clear()  # made again, trusting the test's certificate
    with tls_server(mode, certificate) as (port, got):
        started = time.monotonic()
        ok = await Announcer(f"https://127.0.0.1:{port}", "tok").up()
        took = time.monotonic() - started
        presence._tls_context.cache_clear()
    assert ok and len(got) == 1 and took < 1.0, f"{mode}: up()={ok} after {len(got)} requests in {took:.2f}s"
