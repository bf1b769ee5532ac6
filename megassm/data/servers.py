"""Local object servers for tests and benchmarks: HTTP with Range requests, and S3 (moto).

Both bind 127.0.0.1 on a free port and stop when their ``with`` block ends.

>>> with http_server(root) as base:        # base = "http://127.0.0.1:PORT"
...     load_manifest(base + "/dataset")
>>> with s3_server() as (endpoint, fs):    # AWS_ENDPOINT_URL etc. set inside the block
...     fs.put(local_dir, "bucket/dataset", recursive=True)
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root: Path
    drops: dict[str, int]  # file name -> how many more GETs of it break off half-way
    lock: threading.Lock
    log: list[tuple[str, str, str | None]]

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _file(self) -> Path | None:
        p = (self.root / self.path.split("?", 1)[0].lstrip("/")).resolve()
        return p if p.is_file() and self.root.resolve() in p.parents else None

    def _head(self, p: Path, start: int, end: int, size: int, partial: bool) -> None:
        self.send_response(206 if partial else 200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802
        p = self._file()
        if p is None:
            self.send_error(404)
            return
        size = p.stat().st_size
        self._head(p, 0, size, size, False)

    def do_GET(self) -> None:  # noqa: N802
        p = self._file()
        rng = self.headers.get("Range")
        with self.lock:
            self.log.append(("GET", self.path, rng))
        if p is None:
            self.send_error(404)
            return
        size = p.stat().st_size
        start, end, partial = 0, size, False
        if rng and (m := _RANGE.match(rng)):
            start, partial = int(m.group(1)), True
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        with self.lock:
            drop = self.drops.get(p.name, 0) > 0
            if drop:
                self.drops[p.name] -= 1
        self._head(p, start, end, size, partial)
        with open(p, "rb") as f:
            f.seek(start)
            n = end - start
            if drop:  # send half, then cut the connection: the client sees a short body
                self.wfile.write(f.read(n // 2))
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(f.read(n))


@contextlib.contextmanager
def http_server(root: str | Path, drops: dict[str, int] | None = None) -> Iterator[Any]:
    """Serve ``root`` over HTTP with Range support; yields the base URL (with ``.log`` of GETs on the server).

    drops: {file name: k} -- the first k GETs of that file send half the body and close the connection.
    """
    handler = type("Handler", (_Handler,), {"root": Path(root), "drops": dict(drops or {}),
                                            "lock": threading.Lock(), "log": []})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield _Base(f"http://127.0.0.1:{srv.server_address[1]}", handler)
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=10)


class _Base(str):
    """The server's base URL; ``.gets`` lists the GET requests it served, ``.handler.drops`` what is left to drop."""

    def __new__(cls, url: str, handler):
        s = super().__new__(cls, url)
        s.handler = handler
        return s

    @property
    def gets(self) -> list[tuple[str, str, str | None]]:
        return list(self.handler.log)


_S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server(bucket: str = "megassm-test") -> Iterator[tuple[str, Any]]:
    """An S3-compatible server (moto) on 127.0.0.1 with ``bucket`` created; yields (endpoint, s3fs filesystem).

    Inside the block the process environment points every S3 client at it (AWS_ENDPOINT_URL and
    dummy credentials), exactly as a user's environment would point at a real endpoint.
    """
    import s3fs
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**_S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(bucket)
        yield endpoint, fs
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
        srv.stop()


def main(argv: list[str] | None = None) -> None:
    """``python -m megassm.data.servers http ROOT`` | ``s3 BUCKET``: print the URL, serve until killed (benchmarks)."""
    import sys
    import time as _time

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("http", "s3"):
        raise SystemExit("usage: python -m megassm.data.servers {http ROOT | s3 BUCKET}")
    ctx = http_server(args[1]) if args[0] == "http" else s3_server(args[1])
    with ctx as got:
        print(got if args[0] == "http" else got[0], flush=True)
        while True:
            _time.sleep(3600)


if __name__ == "__main__":
    main()
