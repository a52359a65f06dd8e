"""Servers on 127.0.0.1 for the remote tests: files with HTTP Range support, and the
few Hub endpoints huggingface_hub's HfFileSystem asks (model info, tree,
paths-info, resolve). Each counts the requests it answered and the body bytes it sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

SHA = "0123456789abcdef0123456789abcdef01234567"


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        self.ranges: list[str] = []  # the Range headers received
        self.multi = 0  # multi-range requests answered multipart/byteranges
        self.flooded = 0  # bytes of an over-long answer written (see _Handler._flood)
        self.paths: list[str] = []

    def add(self, path: str, sent: int, range_header: str | None) -> None:
        """One request answered, with ``sent`` bytes of a successful body."""
        with self.lock:
            self.requests += 1
            self.bytes += sent
            self.paths.append(path)
            if range_header:
                self.ranges.append(range_header)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # -- plumbing --------------------------------------------------------

    def _send(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        length: int | None = None,
    ) -> None:
        # counted before anything is sent: the client may be done the moment it has the
        # headers (an error) or the body
        sent = len(body) if self.command != "HEAD" and status < 400 else 0
        self.server.counts.add(self.path, sent, self.headers.get("Range"))
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)  # an error's text is sent, but no client reads it

    def _file(self, path: Path, extra: dict[str, str] | None = None) -> None:
        if not path.is_file():
            self._send(404, b"not found: " + bytes(path.name, "utf-8"))
            return
        size = path.stat().st_size
        headers = {"Accept-Ranges": "bytes", **(extra or {})}
        header = self.headers.get("Range")
        specs = re.findall(r"(\d+)-(\d*)", header or "")
        if len(specs) > 1 and not self.server.ignore_ranges:
            self._ranges(path, size, [(int(a), int(b) + 1 if b else size) for a, b in specs])
            return
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", header or "")
        start, end, status = 0, size, 200
        if m and not self.server.ignore_ranges:
            start = int(m.group(1))
            end = min(int(m.group(2)) + 1 if m.group(2) else size, size)
            if start >= size:
                self._send(416, b"", {"Content-Range": f"bytes */{size}"})
                return
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            status = 206
        if self.server.flood and status == 206 and self.command != "HEAD":
            self._flood(headers, end - start)
            return
        if self.command == "HEAD" or end - start <= 1 << 20:
            data = b""
            if self.command != "HEAD":
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read(end - start)
            self._send(status, data, headers, length=end - start)
            return
        # a large body is streamed, never held whole
        self.server.counts.add(self.path, end - start, header)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start
            while left:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)

    def _ranges(self, path: Path, size: int, ranges: list[tuple[int, int]]) -> None:
        """A multi-range request, answered as ``server.multi`` says: ``"multipart"``
        (206 multipart/byteranges, as nginx and Apache do), ``"first"`` (206 with the
        first range only), ``"whole"`` (200 with the whole file, as nginx with
        ``max_ranges 1``)."""
        mode = self.server.multi
        if mode == "whole":
            self._whole(path, size)
            return
        with open(path, "rb") as f:

            def read(start: int, end: int) -> bytes:
                f.seek(start)
                return f.read(min(end, size) - start)

            if mode == "first":
                start, end = ranges[0]
                end = min(end, size)
                self._send(
                    206, read(start, end), {"Content-Range": f"bytes {start}-{end - 1}/{size}"}
                )
                return
            boundary = "tiecli-test-boundary"
            body = b""
            for start, end in ranges:
                end = min(end, size)
                body += (
                    f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                    f"Content-Range: bytes {start}-{end - 1}/{size}\r\n\r\n"
                ).encode() + read(start, end)
            body += f"\r\n--{boundary}--\r\n".encode()
        self.server.counts.multi += 1
        self._send(206, body, {"Content-Type": f"multipart/byteranges; boundary={boundary}"})

    def _whole(self, path: Path, size: int) -> None:
        """200 with the whole file, streamed; counted as sent when its headers are."""
        self.server.counts.add(self.path, size, self.headers.get("Range"))
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    self.wfile.write(chunk)
        except OSError:
            pass  # the client hung up: it read the headers only

    def _flood(self, headers: dict[str, str], asked: int) -> None:
        """A hostile answer to a range: ``server.flood`` bytes more than asked, declared in
        Content-Length and streamed until the client hangs up; ``counts.flooded`` is what
        the client took (the socket's buffers aside)."""
        total = asked + self.server.flood
        self.server.counts.add(self.path, 0, self.headers.get("Range"))
        self.send_response(206)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(total))
        self.end_headers()
        chunk = b"\0" * (1 << 20)
        try:
            while total > 0:
                self.wfile.write(chunk[: min(total, len(chunk))])
                total -= len(chunk)
                with self.server.counts.lock:
                    self.server.counts.flooded += len(chunk)
        except OSError:
            pass

    def _delay(self) -> None:
        if self.server.delay:
            time.sleep(self.server.delay)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_POST(self) -> None:  # noqa: N802
        self.do_GET()


class FileHandler(_Handler):
    """Serves ``server.root`` as static files, with byte ranges (one, or several in one
    request: see :meth:`_Handler._ranges`)."""

    def do_GET(self) -> None:  # noqa: N802
        self._delay()
        if self.server.refuse:
            self._send(503, b"unavailable <secret server text>")
            return
        if self.server.status:
            self._send(self.server.status, b"<secret server text>")
            return
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        self._file(self.server.root / rel)


class HubHandler(_Handler):
    """The Hub endpoints HfFileSystem uses, for repositories under ``server.root``
    (``root/owner/name/...``), at one revision ``main`` whose commit is :data:`SHA`."""

    def do_GET(self) -> None:  # noqa: N802
        self._delay()
        url = urlsplit(self.path)
        path = unquote(url.path)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            return self._repo_info(m.group(1), m.group(2))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m:
            return self._tree(m.group(1), m.group(2), m.group(3) or "")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/paths-info/([^/]+)", path)
        if m:
            return self._paths_info(m.group(1), m.group(2))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.*)", path)
        if m:
            if not self._known(m.group(1), m.group(2)):
                return None
            return self._file(
                self.server.root / m.group(1) / m.group(3),
                {"X-Repo-Commit": SHA, "ETag": '"etag"'},
            )
        self._send(404, b"{}", {"Content-Type": "application/json"})
        return None

    def _known(self, repo: str, revision: str | None) -> bool:
        if not (self.server.root / repo).is_dir():
            self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return False
        if revision not in (None, "main", SHA):
            self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            return False
        return True

    def _json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._send(
            status,
            json.dumps(doc).encode(),
            {"Content-Type": "application/json", **(headers or {})},
        )

    def _entry(self, repo: str, rel: str) -> dict[str, Any]:
        p = self.server.root / repo / rel
        if p.is_dir():
            return {"type": "directory", "path": rel, "oid": SHA, "size": 0}
        data = p.read_bytes()
        return {
            "type": "file",
            "path": rel,
            "size": len(data),
            "oid": hashlib.sha1(data).hexdigest(),
            "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130},
        }

    def _repo_info(self, repo: str, revision: str | None) -> None:
        if not self._known(repo, revision):
            return
        base = self.server.root / repo
        siblings = [
            {"rfilename": str(p.relative_to(base))} for p in sorted(base.rglob("*")) if p.is_file()
        ]
        self._json(
            200, {"id": repo, "modelId": repo, "sha": SHA, "siblings": siblings, "private": False}
        )

    def _tree(self, repo: str, revision: str, rel: str) -> None:
        if not self._known(repo, revision):
            return
        folder = self.server.root / repo / rel
        if not folder.is_dir():
            self._json(404, {"error": "not found"}, {"X-Error-Code": "EntryNotFound"})
            return
        base = self.server.root / repo
        out = [self._entry(repo, str(p.relative_to(base))) for p in sorted(folder.iterdir())]
        self._json(200, out)

    def _paths_info(self, repo: str, revision: str) -> None:
        if not self._known(repo, revision):
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        from urllib.parse import parse_qs

        try:
            paths = json.loads(body).get("paths", [])
        except ValueError:
            paths = parse_qs(body).get("paths", [])
        out = [self._entry(repo, p) for p in paths if (self.server.root / repo / p).exists()]
        self._json(200, out)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up early (a timeout test) is no error of the server


@contextmanager
def serve(
    root: Path,
    hub: bool = False,
    *,
    refuse: bool = False,
    delay: float = 0.0,
    ignore_ranges: bool = False,
    multi: str = "multipart",
    flood: int = 0,
    status: int = 0,
) -> Iterator[tuple[str, Counts]]:
    """A server on 127.0.0.1 for ``root``: its base URL and its counts."""
    server = _Server(("127.0.0.1", 0), HubHandler if hub else FileHandler)
    server.root = root  # type: ignore[attr-defined]
    server.counts = Counts()  # type: ignore[attr-defined]
    server.refuse = refuse  # type: ignore[attr-defined]
    server.delay = delay  # type: ignore[attr-defined]
    server.ignore_ranges = ignore_ranges  # type: ignore[attr-defined]
    server.multi = multi  # type: ignore[attr-defined]
    server.flood = flood  # type: ignore[attr-defined]
    server.status = status  # type: ignore[attr-defined]  # every answer, when set
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.counts  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
