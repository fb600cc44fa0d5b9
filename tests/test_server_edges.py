"""``prefix-attn serve`` at its edges: bursts of clients, other HTTP methods, request fields
that ask for what is not served."""
import http.client
import json
import socket
import threading

import pytest

from prefix_attn import serve_http
from prefix_attn.cli import build_parser
from test_server import call, started

pytestmark = pytest.mark.hf


def test_a_burst_of_clients_waits_in_the_listen_backlog():
    """20 clients connecting at once while the accept loop is behind (here: not yet running)
    all get their answer; a backlog of 5 (socketserver's) left connections hanging or reset."""
    server = serve_http.Server(build_parser().parse_args(["serve", "--port", "0", "--quiet"]))
    socks = []
    try:
        for _ in range(20):
            s = socket.create_connection(server.address, timeout=3)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            assert all(s.recv(100).startswith(b"HTTP/1.0 200") for s in socks)
        finally:
            server.shutdown()
            thread.join()
    finally:
        for s in socks:
            s.close()
        server.close()
