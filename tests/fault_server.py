"""A small threaded HTTP file server on 127.0.0.1 for tests, which can misbehave on request.

    with FaultServer(folder) as server:          # serves folder/<name> at server.url + "/<name>"
        server.faults["train-000001.tar"] = ["drop"]         # the next request for it: drop mid-body
        server.faults["train-000002.tar"] = ["404"] * 99     # the next 99 requests: 404
        ...
        server.requests                          # [(name, Range header or None, query string)]

Faults, each used up by one request: "drop" sends the headers (full Content-Length) and the body
up to the middle of the file, then closes the connection (so a client that resumes with a Range
request after the middle gets nothing more while the fault lasts); "stall" sends the body up to
the middle, then goes silent for `stall_s` seconds before closing; "404" answers Not Found; "500"
answers Internal Server Error. It honours `Range: bytes=N-` (206), unless `honour_range` is false
(then it sends the whole file, 200, as some servers do). With `auth = (user, password)`, a request
without that Basic authorization gets 401. It is bounded: at most `max_requests` requests are
served (the rest get 503), and it shuts itself down after `lifetime_s` seconds whatever the test does.
"""

import threading
from base64 import b64encode
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class FaultServer:
    def __init__(self, folder, prefix="/shards", max_requests=2000, lifetime_s=300.0, stall_s=3.0):
        self.folder, self.prefix, self.stall_s = Path(folder), prefix, stall_s
        self.max_requests, self.faults, self.requests, self.honour_range = max_requests, {}, [], True
        self.auth = None
        self._lock, self._stopping = threading.Lock(), threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}{prefix}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True

    def __enter__(self):
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        if not self._stopping.is_set():
            self._stopping.set()
            self._timer.cancel()
            self._server.shutdown()
            self._server.server_close()

    def requested(self, name) -> list:
        """The Range headers of the requests for `name`, in order (None: from the start)."""
        return [rng for n, rng, _ in self.requests if n == name]

    def next_fault(self, name):
        with self._lock:
            queue = self.faults.get(name) or []
            return queue.pop(0) if queue else None

    def record(self, entry) -> bool:
        with self._lock:
            self.requests.append(entry)
            return len(self.requests) <= self.max_requests


def _handler(server: FaultServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the test reads server.requests
            pass

        def do_GET(self):
            parts = urlsplit(self.path)
            name = unquote(parts.path[len(server.prefix) + 1:])
            if not server.record((name, self.headers.get("Range"), parts.query)):
                return self._status(503)
            if server.auth and self.headers.get("Authorization") != "Basic " + b64encode(":".join(server.auth).encode()).decode():
                return self._status(401)
            fault = server.next_fault(name)
            path = server.folder / name
            if fault in ("404", "500") or not parts.path.startswith(server.prefix + "/") or not path.is_file():
                return self._status(int(fault) if fault == "500" else 404)
            data, start = path.read_bytes(), _range_start(self.headers.get("Range")) if server.honour_range else 0
            try:
                self._send(data, start, fault)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up on this connection: it was the point of the fault

        def _send(self, data, start, fault):
            body = data[start:]
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Connection", "close")
            self.end_headers()
            if fault in ("drop", "stall"):
                self.wfile.write(body[:max(0, len(data) // 2 - start)])
                self.wfile.flush()
                if fault == "stall":
                    server._stopping.wait(server.stall_s)  # silent, but never past the server's own end
                self.close_connection = True
                return
            self.wfile.write(body)

        def _status(self, code):
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()

    return Handler


def _range_start(header) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    return int(header[len("bytes="):].split("-")[0] or 0)
