"""Small network clients the driver runs inside pods: a TCP probe, an HTTP/1.1 GET for
readiness and sanity checks, and the idle-connection holder for the memory-per-connection
run."""

import socket
import ssl
import time

from topo import in_netns


def can_connect(netns, host, port, timeout=0.5):
    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            return False

    return in_netns(netns, probe)


def _read_response(sock):
    """Reads one HTTP/1.1 response with a Content-Length body; returns (status, headers,
    body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("connection closed before the response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise OSError(f"bad status line {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("connection closed inside the response body")
        body += chunk
    return int(parts[1]), headers, body


def http_get(netns, host, port, path="/", timeout=5.0):
    """One keep-alive-less GET from inside `netns`; (status, headers, body)."""
    return http_request(netns, host, port, "GET", path, timeout)


def http_request(netns, host, port, method, path="/", timeout=5.0):
    """One keep-alive-less request without a body from inside `netns`; (status, headers,
    body)."""

    def send():
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                         f"Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
            return _read_response(sock)

    return in_netns(netns, send)


def open_idle_connections(netns, host, port, count, timeout=10.0):
    """Opens `count` keep-alive connections from `netns`, sends one GET on each and reads its
    response (so every proxy on the path has fully set the connection up), then leaves them
    open. Returns the sockets (close them to end the run) and how long it took."""

    def open_all():
        sockets = []
        request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        start = time.monotonic()
        try:
            for _ in range(count):
                sock = socket.create_connection((host, port), timeout=timeout)
                sockets.append(sock)
                sock.sendall(request)
                status, _, _ = _read_response(sock)
                if status != 200:
                    raise OSError(f"connection {len(sockets)}: status {status}")
        except BaseException:
            close_all(sockets)
            raise
        return sockets, time.monotonic() - start

    return in_netns(netns, open_all)


def close_all(sockets):
    for sock in sockets:
        try:
            sock.close()
        except OSError:
            pass


def tls_get(netns, host, port, server_name, ca, cert=None, timeout=5.0):
    """GET / over TLS from inside `netns`, verifying the server against `ca`, presenting the
    client certificate `cert` = (crt, key) when given. Returns (TLS version, HTTP status);
    raises ssl.SSLError / OSError when the server refuses."""

    def get():
        context = ssl.create_default_context(cafile=ca)
        if cert is not None:
            context.load_cert_chain(*cert)
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=server_name) as sock:
                sock.sendall(f"GET / HTTP/1.1\r\nHost: {server_name}\r\n"
                             f"Connection: close\r\n\r\n".encode())
                status, _, _ = _read_response(sock)
                return sock.version(), status

    return in_netns(netns, get)
