"""The review server: the queue, a page per case with its slices drawn on request, and the verdicts.

Python's own ``http.server`` on threads, nothing to install. It listens on 127.0.0.1 unless told
otherwise: the pages show patients' scans. A form posted from a page of another origin is refused.

Routes:

- ``GET /``: the queue, with the verdicts as they are now;
- ``GET /case/<case>``: the case's three views (a slider each), its layers and its verdict form;
- ``GET /slice/<case>/<view>/<index>.png?layers=mask,reference,uncertainty``: one slice;
- ``GET /picture/<case>.png``: the overview picture of the build;
- ``GET /verdicts.csv``: every verdict recorded;
- ``POST /case/<case>/verdict`` (``verdict``, ``note``, ``reviewer``): records it, then shows the
  next case of the queue that has no verdict (or an outdated one), else the queue.

The scans of the last few cases opened stay in memory (``cache_cases``).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from medseg.config import ReviewConfig
from medseg.errors import ConfigError, MedsegError
from medseg.review import page, render, verdicts
from medseg.stages.review import (
    PICTURES,
    load_entry,
    load_queue,
    mask_digest,
    states,
    summarize,
)

log = logging.getLogger(__name__)

MAX_FORM_BYTES = 64 * 1024


class ReviewApp:
    """What the server shows: a built review folder, its queue and its verdicts."""

    def __init__(self, review_dir: Path, config: ReviewConfig | None = None, *, reviewer: str = "",
                 cache_cases: int = 2) -> None:
        self.dir = Path(review_dir)
        self.config = config or ReviewConfig()
        self.reviewer = reviewer
        self.queue = load_queue(self.dir)
        self.by_id = {e["case_id"]: e for e in self.queue}
        self.order = [e["case_id"] for e in self.queue]
        self._cache: OrderedDict[str, render.CaseImages] = OrderedDict()
        self._cache_cases = max(1, cache_cases)
        self._lock = threading.Lock()

    def images(self, case_id: str) -> render.CaseImages:
        with self._lock:
            if case_id in self._cache:
                self._cache.move_to_end(case_id)
                return self._cache[case_id]
            images = load_entry(self.by_id[case_id], self.config)
            self._cache[case_id] = images
            while len(self._cache) > self._cache_cases:
                self._cache.popitem(last=False)
            return images

    def states(self) -> tuple[dict[str, str], dict[str, verdicts.Verdict]]:
        current = verdicts.current(self.dir)
        return states(self.queue, current), current

    def next_open(self, after: str) -> str | None:
        """The first case after ``after`` in the queue (then from the top) to review: shown, and
        without a verdict on its present mask."""
        state_of, _ = self.states()
        start = self.order.index(after) + 1 if after in self.order else 0
        for case_id in self.order[start:] + self.order[:start]:
            if case_id != after and state_of[case_id] in ("open", "outdated") and not self.by_id[case_id].get("problem"):
                return case_id
        return None

    def index(self) -> str:
        state_of, current = self.states()
        return page.index_page(self.queue, state_of, current, summarize(self.queue, current), served=True)

    def case(self, case_id: str) -> str:
        entry = self.by_id[case_id]
        state_of, current = self.states()
        position = self.order.index(case_id)
        problem = entry.get("problem")
        slices = {}
        if not problem:
            try:
                images = self.images(case_id)
                slices = {view: images.slices(view) for view in render.VIEWS}
            except MedsegError as err:
                problem = f"cannot be shown: {err}"
        return page.case_page(
            {**entry, "problem": problem}, state_of[case_id], current.get(case_id), position=position + 1,
            total=len(self.order), previous=self.order[position - 1] if position > 0 else None,
            following=self.order[position + 1] if position + 1 < len(self.order) else None,
            slices=slices, reviewer=self.reviewer,
        )

    def slice_png(self, case_id: str, view: str, index: int, layers: list[str]) -> bytes:
        picture = render.render(self.images(case_id), view, index, layers=layers, alpha=self.config.alpha,
                                size=self.config.slice_size)
        return render.png(picture)

    def record(self, case_id: str, form: Mapping[str, str]) -> verdicts.Verdict:
        entry = self.by_id[case_id]
        if entry.get("problem") or not entry.get("mask"):
            raise ConfigError(f"case {case_id}: has no mask to judge ({entry.get('problem')})")
        return verdicts.record(
            self.dir, case_id, form.get("verdict", ""), note=form.get("note", ""),
            reviewer=form.get("reviewer", "") or self.reviewer, mask_sha256=mask_digest(entry["mask"]),
            flags=entry["flags"],
        )


class _Handler(BaseHTTPRequestHandler):
    server_version = "medseg-review"

    @property
    def app(self) -> ReviewApp:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status_code: HTTPStatus, body: bytes | str, content_type: str = "text/html; charset=utf-8",
              headers: Mapping[str, str] | None = None) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status_code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status_code: HTTPStatus, message: str) -> None:
        from html import escape

        self._send(status_code, f"<!doctype html><title>{status_code.value}</title><p>{escape(message)}</p>"
                                '<p><a href="/">queue</a></p>')

    def _case_id(self, quoted: str) -> str | None:
        case_id = unquote(quoted)
        if case_id not in self.app.by_id:
            self._error(HTTPStatus.NOT_FOUND, f"no case {case_id!r} in this review ({self.app.dir})")
            return None
        return case_id

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        try:
            if not parts:
                self._send(HTTPStatus.OK, self.app.index())
            elif parts == ["verdicts.csv"]:
                path = self.app.dir / verdicts.FILE
                self._send(HTTPStatus.OK, path.read_bytes() if path.is_file() else ",".join(verdicts.FIELDS) + "\n",
                           "text/csv; charset=utf-8")
            elif len(parts) == 2 and parts[0] == "case":
                case_id = self._case_id(parts[1])
                if case_id is not None:
                    self._send(HTTPStatus.OK, self.app.case(case_id))
            elif len(parts) == 2 and parts[0] == "picture" and parts[1].endswith(".png"):
                case_id = self._case_id(parts[1][: -len(".png")])
                if case_id is not None:
                    path = self.app.dir / PICTURES / f"{case_id}.png"
                    if path.is_file() and self.app.by_id[case_id].get("overview"):
                        self._send(HTTPStatus.OK, path.read_bytes(), "image/png")
                    else:
                        self._error(HTTPStatus.NOT_FOUND, f"case {case_id}: no overview picture")
            elif len(parts) == 4 and parts[0] == "slice" and parts[3].endswith(".png"):
                self._slice(parts[1], parts[2], parts[3][: -len(".png")], url.query)
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no page at {url.path}")
        except MedsegError as err:
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(err))
        except Exception as err:  # one bad page must not stop the review
            log.exception("GET %s failed", self.path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"GET {self.path} failed: {err}")

    do_HEAD = do_GET

    def _slice(self, quoted: str, view: str, index_text: str, query: str) -> None:
        case_id = self._case_id(quoted)
        if case_id is None:
            return
        layers = [layer for item in parse_qs(query).get("layers", ["mask"]) for layer in item.split(",") if layer]
        unknown = sorted(set(layers) - set(render.LAYERS))
        if view not in render.VIEWS or not index_text.isdigit() or unknown:
            self._error(HTTPStatus.BAD_REQUEST, f"expected /slice/<case>/<{'|'.join(render.VIEWS)}>/<index>.png"
                                                f"?layers={','.join(render.LAYERS)}, found {self.path}")
            return
        if self.app.by_id[case_id].get("problem"):
            self._error(HTTPStatus.NOT_FOUND, f"case {case_id}: nothing to show ({self.app.by_id[case_id]['problem']})")
            return
        images = self.app.images(case_id)
        index = int(index_text)
        if index >= images.slices(view):
            self._error(HTTPStatus.NOT_FOUND, f"case {case_id}: expected a {view} slice from 0 to "
                                              f"{images.slices(view) - 1}, found {index}")
            return
        self._send(HTTPStatus.OK, self.app.slice_png(case_id, view, index, layers), "image/png")

    def do_POST(self) -> None:
        parts = [p for p in urlsplit(self.path).path.split("/") if p]
        if len(parts) != 3 or parts[0] != "case" or parts[2] != "verdict":
            self._error(HTTPStatus.NOT_FOUND, f"expected POST /case/<case>/verdict, found {self.path}")
            return
        origin = self.headers.get("Origin")
        if origin and origin != "null" and urlsplit(origin).netloc != self.headers.get("Host"):
            self._error(HTTPStatus.FORBIDDEN, f"a verdict from a page of {origin} is refused; expected one of "
                                              f"this server ({self.headers.get('Host')})")
            return
        case_id = self._case_id(parts[1])
        if case_id is None:
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_FORM_BYTES:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"expected a form of at most {MAX_FORM_BYTES} bytes, "
                                                              f"found {length}")
            return
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode("utf-8", "replace")).items()}
        try:
            entry = self.app.record(case_id, form)
        except MedsegError as err:
            self._error(HTTPStatus.BAD_REQUEST, str(err))
            return
        log.info("case %s: %s by %s", case_id, entry.verdict, entry.reviewer or "-")
        following = self.app.next_open(case_id)
        target = f"/case/{quote(following, safe='')}" if following else "/"
        self._send(HTTPStatus.SEE_OTHER, f'<a href="{target}">{target}</a>', headers={"Location": target})


def make_server(review_dir: Path, config: ReviewConfig | None = None, *, host: str = "127.0.0.1", port: int = 8765,
                reviewer: str = "") -> ThreadingHTTPServer:
    """A server of the review folder ``review_dir`` (not yet serving); port 0 picks a free port."""
    app = ReviewApp(review_dir, config, reviewer=reviewer)
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    server.app = app  # type: ignore[attr-defined]
    return server


def address(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def serve(server: ThreadingHTTPServer) -> None:
    """Serve until interrupted (Ctrl-C), then close."""
    log.info("reviewing %d cases of %s at %s", len(server.app.queue), server.app.dir, address(server))  # type: ignore[attr-defined]
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
