"""A real RFC 5425 syslog-over-TLS receiver for the tests: a self-signed certificate made with ``openssl``, a TLS
listener on a free port taking any number of connections, the octet-counted messages it received."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from pathlib import Path


def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost`` and its key (PEM files in ``tmp_path``)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


class SyslogListener:
    """A real RFC 5425 receiver on a free port: TLS, octet-counted messages, any number of connections."""

    def __init__(self, tmp_path: Path) -> None:
        self.cert, key = certificate(tmp_path)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(self.cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.messages: list[str] = []
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(30)
            self.connections += 1
            data = bytearray()
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    while chunk := tls.recv(65536):
                        data.extend(chunk)
            except (ssl.SSLError, OSError):
                continue
            rest = bytes(data)
            while rest:
                length, _, rest = rest.partition(b" ")
                self.messages.append(rest[:int(length)].decode())
                rest = rest[int(length):]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()
