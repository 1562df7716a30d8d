"""The review server: the queue, a page per case where masks are viewed and corrected, and the verdicts.

Starlette on uvicorn (both come with MLflow's server). The case page draws the scan, the mask and
its layers in the browser with NiiVue (vendored under ``static/niivue``: nothing loads from the
internet); Python serves the volumes, the slices, and saves what reviewers send.

It listens on 127.0.0.1 unless told otherwise: the pages show patients' scans. With reviewers'
tokens (``medseg.review.tokens``) every request needs one (``Authorization: Bearer <token>``, or
``?token=`` once, which sets a cookie), else it is answered 401 with no content; bound to any other
address than loopback, the server refuses to start without tokens. A POST from a page of another
origin is refused (403).

Routes:

- ``GET /``: the queue, with the verdicts as they are now;
- ``GET /case/<case>``: the case's viewer (three views with a slider each, layers, brush, fill,
  undo/redo, save), its history and its verdict form;
- ``GET /volume/<case>/<scan|mask|predicted|reference|uncertainty>.nii.gz``: the volumes the
  viewer draws; ``mask`` is the one reviewers see: the latest correction on the present
  predicted mask, else the predicted mask;
- ``GET /saliency/<case>.nii.gz?label=<k>&view=<view>&index=<i>``: what drives the network's
  prediction of class ``k`` on that slice (``medseg.review.saliency``), computed on request and
  cached;
- ``GET /case/<case>/history.json``: every verdict and correction of the case, and the SHA-256 of the
  mask it shows (``shown_sha256``: what a correction starts from);
- ``GET /slice/<case>/<view>/<index>.png?layers=mask,reference,uncertainty``: one slice as a
  picture (drawn on the server); ``GET /picture/<case>.png``: the build's overview picture;
- ``GET /verdicts.csv``: every verdict recorded;
- ``POST /case/<case>/verdict`` (form: ``verdict``, ``note``, ``reviewer`` (ignored with tokens)):
  records it, then shows the next case of the queue that has no verdict (or an outdated one);
- ``POST /case/<case>/correction`` (body: the corrected mask as NIfTI, gzip or not; headers
  ``X-Base-SHA256`` (the mask it started from) and ``X-Note``): saves it as a new file in the
  review folder, in the scan's own geometry, and records the verdict ``fix`` with it (JSON answer).
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hmac
import ipaddress
import logging
import socket
import threading
from collections import OrderedDict
from collections.abc import Mapping
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import nibabel as nib
import numpy as np

from medseg.config import ReviewConfig
from medseg.errors import ConfigError, MedsegError
from medseg.review import page, render, verdicts
from medseg.review.folder import PICTURES, load_queue, mask_digest

log = logging.getLogger(__name__)

MAX_FORM_BYTES = 64 * 1024
COOKIE = "medseg_review_token"
STATIC = Path(__file__).parent / "static"
NIIVUE = "niivue/niivue.umd.js"  # NiiVue as npm ships it, stored as niivue.umd.js.gz (gzip -9)
VOLUMES = ("scan", "mask", "predicted", "reference", "uncertainty")


class ReviewApp:
    """What the server shows: a built review folder, its queue and its verdicts."""

    def __init__(self, review_dir: Path, config: ReviewConfig | None = None, *, reviewer: str = "",
                 cache_cases: int = 2, tracking_uri: str | None = None) -> None:
        self.dir = Path(review_dir)
        self.tracking_uri = tracking_uri
        self.config = config or ReviewConfig()
        self.reviewer = reviewer
        self.queue = load_queue(self.dir)
        self.by_id = {e["case_id"]: e for e in self.queue}
        self.order = [e["case_id"] for e in self.queue]
        self._cache: OrderedDict[str, render.CaseImages] = OrderedDict()
        self._volumes: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()
        self._cache_cases = max(1, cache_cases)
        self._lock = threading.Lock()

    # -- reading ----------------------------------------------------------------------------------

    def images(self, case_id: str) -> render.CaseImages:
        from medseg.review.cases import load_entry

        with self._lock:
            if case_id in self._cache:
                self._cache.move_to_end(case_id)
                return self._cache[case_id]
        images = load_entry(self.by_id[case_id], self.config)
        with self._lock:
            self._cache[case_id] = images
            while len(self._cache) > self._cache_cases:
                self._cache.popitem(last=False)
        return images

    def states(self) -> tuple[dict[str, str], dict[str, verdicts.Verdict]]:
        from medseg.review.cases import states

        current = verdicts.current(self.dir)
        return states(self.queue, current), current

    def shown(self, case_id: str) -> tuple[Path | None, str, verdicts.Verdict | None]:
        """The mask a reviewer sees on ``case_id`` (the latest correction on the present predicted
        mask, else the predicted mask), its SHA-256, and the verdict of the correction."""
        entry = self.by_id[case_id]
        predicted = mask_digest(entry.get("mask"))
        correction, row = verdicts.shown_mask(self.dir, case_id, predicted)
        if correction is not None and row is not None:
            return correction, row.correction_sha256, row
        return (Path(entry["mask"]) if entry.get("mask") else None), predicted, None

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
        from medseg.review.cases import summarize

        state_of, current = self.states()
        return page.index_page(self.queue, state_of, current, summarize(self.queue, current), served=True)

    def case(self, case_id: str, reviewer: str, *, authenticated: bool) -> str:
        entry = self.by_id[case_id]
        state_of, current = self.states()
        position = self.order.index(case_id)
        problem = entry.get("problem")
        slices: dict[str, int] = {}
        shown_sha, correction = "", None
        if not problem:
            try:
                images = self.images(case_id)
                slices = {view: images.slices(view) for view in render.VIEWS}
                _, shown_sha, correction = self.shown(case_id)
            except MedsegError as err:
                problem = f"cannot be shown: {err}"
        return page.case_page(
            {**entry, "problem": problem}, state_of[case_id], current.get(case_id), position=position + 1,
            total=len(self.order), previous=self.order[position - 1] if position > 0 else None,
            following=self.order[position + 1] if position + 1 < len(self.order) else None,
            slices=slices, reviewer=reviewer, reviewer_fixed=authenticated,
            history=verdicts.history(self.dir, case_id), shown_sha256=shown_sha, correction=correction,
            alpha=self.config.alpha,
        )

    def slice_png(self, case_id: str, view: str, index: int, layers: list[str]) -> bytes:
        picture = render.render(self.images(case_id), view, index, layers=layers, alpha=self.config.alpha,
                                size=self.config.slice_size)
        return render.png(picture)

    def volume(self, case_id: str, name: str) -> bytes | None:
        """A volume of the case as gzipped NIfTI bytes, on the scan's grid (None when it has none)."""
        entry = self.by_id[case_id]
        if name == "mask":
            path, digest, _ = self.shown(case_id)
        elif name == "scan":
            path, digest = None, "scan"
        else:
            key = {"predicted": "mask", "reference": "reference", "uncertainty": "uncertainty_map"}[name]
            path = Path(entry[key]) if entry.get(key) else None
            digest = mask_digest(path) if path is not None else ""
            if path is None:
                return None
        cache_key = (case_id, name, digest)
        with self._lock:
            if cache_key in self._volumes:
                return self._volumes[cache_key]
        if name == "scan":
            from medseg.review.cases import scan_image

            image, _ = scan_image(entry)
            data = np.asarray(image.dataobj)
            image = nib.Nifti1Image(data.astype(np.float32) if data.dtype.kind == "f" else data, image.affine)
            body = gzip.compress(image.to_bytes(), compresslevel=1)
        else:
            assert path is not None
            body = path.read_bytes() if path.name.endswith(".nii.gz") else gzip.compress(
                nib.load(str(path)).to_bytes(), compresslevel=1)
        with self._lock:
            self._volumes[cache_key] = body
            while len(self._volumes) > 4 * len(VOLUMES):
                self._volumes.popitem(last=False)
        return body

    # -- writing ----------------------------------------------------------------------------------

    def _judgeable(self, case_id: str) -> dict[str, Any]:
        entry = self.by_id[case_id]
        if entry.get("problem") or not entry.get("mask"):
            raise ConfigError(f"case {case_id}: has no mask to judge ({entry.get('problem')})")
        return entry

    def record(self, case_id: str, form: Mapping[str, str], reviewer: str) -> verdicts.Verdict:
        entry = self._judgeable(case_id)
        return verdicts.record(
            self.dir, case_id, form.get("verdict", ""), note=form.get("note", ""), reviewer=reviewer,
            mask_sha256=mask_digest(entry["mask"]), flags=entry["flags"],
        )

    def max_upload(self, case_id: str) -> int:
        """The most bytes a correction of ``case_id`` may have: its voxels as 16-bit, and a header."""
        from medseg.review.corrections import upload_limit

        return upload_limit(self.by_id[case_id])

    def save_correction(self, case_id: str, body: bytes, *, reviewer: str, base_sha256: str,
                        note: str) -> verdicts.Verdict:
        from medseg.review.corrections import save

        entry = self._judgeable(case_id)
        return save(self.dir, entry, body, reviewer=reviewer, base_sha256=base_sha256, note=note)

    def saliency(self, case_id: str, label: int, view: str, index: int) -> bytes:
        from medseg.review.saliency import saliency_volume

        entry = self._judgeable(case_id)
        return saliency_volume(self.dir, entry, label=label, view=view, index=index, tracking_uri=self.tracking_uri)


# -- the web application ---------------------------------------------------------------------------


def _error_page(status_code: int, message: str) -> Any:
    from starlette.responses import HTMLResponse

    return HTMLResponse(f"<!doctype html><title>{status_code}</title><p>{escape(message)}</p>"
                        '<p><a href="/">queue</a></p>', status_code=status_code, headers={"Cache-Control": "no-store"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reviewer_of(token: str, tokens: Mapping[str, str]) -> str | None:
    """The reviewer whose token is ``token`` (compared in constant time), or None."""
    found = None
    for name, expected in tokens.items():
        if hmac.compare_digest(token.encode(), expected.encode()):
            found = name
    return found


def make_app(review_dir: Path, config: ReviewConfig | None = None, *, reviewer: str = "",
             tokens: Mapping[str, str] | None = None, tracking_uri: str | None = None) -> Any:
    """The review folder ``review_dir`` as an ASGI application."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    review = ReviewApp(review_dir, config, reviewer=reviewer, tracking_uri=tracking_uri)
    tokens = dict(tokens or {})
    no_store = {"Cache-Control": "no-store"}

    class Auth(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: Any) -> Response:
            if not tokens:
                request.state.reviewer, request.state.authenticated = review.reviewer, False
            else:
                given = request.headers.get("authorization", "")
                token = given[len("Bearer "):] if given.startswith("Bearer ") else ""
                token = token or request.query_params.get("token", "") or request.cookies.get(COOKIE, "")
                name = _reviewer_of(token, tokens) if token else None
                if name is None:
                    return Response("a reviewer's token is needed (Authorization: Bearer <token>, or ?token=)\n",
                                    status_code=401, media_type="text/plain",
                                    headers={"WWW-Authenticate": 'Bearer realm="medseg review"', **no_store})
                request.state.reviewer, request.state.authenticated = name, True
                if "token" in request.query_params and request.method == "GET":
                    rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                    target = request.url.path + ("?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in rest)
                                                 if rest else "")
                    response = RedirectResponse(target, status_code=303, headers=no_store)
                    response.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                                        secure=request.url.scheme == "https")
                    return response
            if request.method not in ("GET", "HEAD"):
                origin = request.headers.get("origin")
                site = request.headers.get("sec-fetch-site")
                if (origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host")) or (
                        site not in (None, "same-origin", "none")):
                    return _error_page(403, f"a change from a page of {origin or site} is refused; expected one of "
                                            f"this server ({request.headers.get('host')})")
            try:
                return await call_next(request)
            except MedsegError as err:
                return _error_page(500, str(err))

    def case_of(request: Request) -> str:
        case_id = request.path_params["case_id"]
        if case_id not in review.by_id:
            raise _NotFound(f"no case {case_id!r} in this review ({review.dir})")
        return case_id

    def queue(request: Request) -> Response:
        return HTMLResponse(review.index(), headers=no_store)

    def case(request: Request) -> Response:
        return HTMLResponse(review.case(case_of(request), request.state.reviewer,
                                        authenticated=request.state.authenticated), headers=no_store)

    def history(request: Request) -> Response:
        from dataclasses import asdict

        case_id = case_of(request)
        shown = review.shown(case_id)[1] if not review.by_id[case_id].get("problem") else ""
        return JSONResponse({"case_id": case_id, "shown_sha256": shown,
                             "history": [asdict(v) for v in verdicts.history(review.dir, case_id)]}, headers=no_store)

    def volume(request: Request) -> Response:
        case_id = case_of(request)
        name = request.path_params["name"]
        if name not in VOLUMES:
            return _error_page(404, f"expected /volume/<case>/<{'|'.join(VOLUMES)}>.nii.gz, found {request.url.path}")
        if review.by_id[case_id].get("problem"):
            return _error_page(404, f"case {case_id}: nothing to show ({review.by_id[case_id]['problem']})")
        body = review.volume(case_id, name)
        if body is None:
            return _error_page(404, f"case {case_id}: has no {name} volume")
        return Response(body, media_type="application/gzip", headers=no_store)

    def saliency(request: Request) -> Response:
        case_id = case_of(request)
        query = request.query_params
        view, label, index = query.get("view", ""), query.get("label", ""), query.get("index", "")
        if view not in render.VIEWS or not label.isdigit() or not index.isdigit():
            return _error_page(400, f"expected /saliency/<case>.nii.gz?label=<k>&view=<{'|'.join(render.VIEWS)}>"
                                    f"&index=<i>, found {request.url.path}?{request.url.query}")
        try:
            body = review.saliency(case_id, int(label), view, int(index))
        except ConfigError as err:
            return _error_page(400, str(err))
        return Response(body, media_type="application/gzip", headers=no_store)

    def slice_png(request: Request) -> Response:
        case_id = case_of(request)
        view, index_text = request.path_params["view"], request.path_params["index"]
        layers = [layer for item in request.query_params.getlist("layers") or ["mask"]
                  for layer in item.split(",") if layer]
        unknown = sorted(set(layers) - set(render.LAYERS))
        if view not in render.VIEWS or not index_text.isdigit() or unknown:
            return _error_page(400, f"expected /slice/<case>/<{'|'.join(render.VIEWS)}>/<index>.png"
                                    f"?layers={','.join(render.LAYERS)}, found {request.url.path}")
        if review.by_id[case_id].get("problem"):
            return _error_page(404, f"case {case_id}: nothing to show ({review.by_id[case_id]['problem']})")
        images = review.images(case_id)
        index = int(index_text)
        if index >= images.slices(view):
            return _error_page(404, f"case {case_id}: expected a {view} slice from 0 to {images.slices(view) - 1}, "
                                    f"found {index}")
        return Response(review.slice_png(case_id, view, index, layers), media_type="image/png", headers=no_store)

    def picture(request: Request) -> Response:
        case_id = case_of(request)
        path = review.dir / PICTURES / f"{case_id}.png"
        if path.is_file() and review.by_id[case_id].get("overview"):
            return Response(path.read_bytes(), media_type="image/png", headers=no_store)
        return _error_page(404, f"case {case_id}: no overview picture")

    def verdicts_csv(request: Request) -> Response:
        path = review.dir / verdicts.FILE
        body = path.read_bytes() if path.is_file() else (",".join(verdicts.FIELDS) + "\n").encode()
        return Response(body, media_type="text/csv; charset=utf-8", headers=no_store)

    async def read_body(request: Request, limit: int) -> bytes | None:
        """The request's body, or None when it is longer than ``limit`` bytes (read no further)."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def verdict(request: Request) -> Response:
        case_id = case_of(request)
        body = await read_body(request, MAX_FORM_BYTES)
        if body is None:
            return _error_page(413, f"expected a form of at most {MAX_FORM_BYTES} bytes")
        from urllib.parse import parse_qs

        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        name = request.state.reviewer if request.state.authenticated else (form.get("reviewer") or review.reviewer)
        try:
            entry = await asyncio.to_thread(review.record, case_id, form, name)
        except MedsegError as err:
            return _error_page(400, str(err))
        log.info("case %s: %s by %s", case_id, entry.verdict, entry.reviewer or "-")
        if "application/json" in request.headers.get("accept", ""):
            from dataclasses import asdict

            return JSONResponse(asdict(entry), headers=no_store)
        following = review.next_open(case_id)
        target = f"/case/{quote(following, safe='')}" if following else "/"
        return RedirectResponse(target, status_code=303, headers=no_store)

    async def correction(request: Request) -> Response:
        from dataclasses import asdict

        case_id = case_of(request)
        limit = review.max_upload(case_id)
        body = await read_body(request, limit)
        if body is None:
            return JSONResponse({"error": f"case {case_id}: expected a corrected mask of at most {limit} bytes"},
                                status_code=413, headers=no_store)
        try:
            entry = await asyncio.to_thread(
                review.save_correction, case_id, body, reviewer=request.state.reviewer,
                base_sha256=request.headers.get("x-base-sha256", ""), note=unquote(request.headers.get("x-note", "")))
        except MedsegError as err:
            return JSONResponse({"error": str(err)}, status_code=400, headers=no_store)
        log.info("case %s: corrected by %s -> %s", case_id, entry.reviewer or "-", entry.correction)
        return JSONResponse(asdict(entry), headers=no_store)

    def niivue(request: Request) -> Response:  # stored packed (under 1 MiB in the repository), sent as it is
        return Response(_niivue_packed(), media_type="text/javascript", headers={"Content-Encoding": "gzip",
                                                                                 "Cache-Control": "max-age=3600"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error_page(404, str(exc) if isinstance(exc, _NotFound) else f"no page at {request.url.path}")

    async def failed(request: Request, exc: Exception) -> Response:  # one bad page must not stop the review
        log.exception("%s %s failed", request.method, request.url.path)
        return _error_page(500, f"{request.method} {request.url.path} failed: {exc}")

    routes = [
        Route("/", queue),
        Route("/verdicts.csv", verdicts_csv),
        Route("/case/{case_id}", case),
        Route("/case/{case_id}/history.json", history),
        Route("/case/{case_id}/verdict", verdict, methods=["POST"]),
        Route("/case/{case_id}/correction", correction, methods=["POST"]),
        Route("/volume/{case_id}/{name}.nii.gz", volume),
        Route("/saliency/{case_id}.nii.gz", saliency),
        Route("/slice/{case_id}/{view}/{index}.png", slice_png),
        Route("/picture/{case_id}.png", picture),
        Route(f"/static/{NIIVUE}", niivue),
        Mount("/static", StaticFiles(directory=STATIC, follow_symlink=False)),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Auth)],
                    exception_handlers={_NotFound: not_found, 404: not_found, 500: failed})
    app.state.review = review
    return app


class _NotFound(Exception):
    pass


@functools.lru_cache(maxsize=1)
def _niivue_packed() -> bytes:
    return (STATIC / f"{NIIVUE}.gz").read_bytes()


class ReviewServer:
    """A review app on uvicorn, listening on its own socket: ``serve_forever`` (in any thread),
    ``shutdown`` (from another), ``server_close``; ``server_address`` is where it listens."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError:
            self.socket.close()
            raise
        self.socket.listen(128)
        self.server_address = self.socket.getsockname()[:2]
        self.app = app.state.review
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                     timeout_graceful_shutdown=5))
        self._done = threading.Event()

    def serve_forever(self) -> None:
        try:
            if threading.current_thread() is not threading.main_thread():
                self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # uvicorn < 0.29
            self._server.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self) -> None:
        self._server.should_exit = True
        self._done.wait(30)

    def server_close(self) -> None:
        self.socket.close()


def make_server(review_dir: Path, config: ReviewConfig | None = None, *, host: str = "127.0.0.1", port: int = 8765,
                reviewer: str = "", tokens: Mapping[str, str] | None = None,
                tracking_uri: str | None = None) -> ReviewServer:
    """A server of the review folder ``review_dir`` (not yet serving); port 0 picks a free port.
    Without ``tokens`` (reviewer name -> token) it only listens on loopback."""
    if not tokens and not is_loopback(host):
        raise ConfigError(f"review: serving on {host} needs reviewers' tokens (--tokens FILE; medseg review "
                          "--add-reviewer NAME --tokens FILE makes one); without them only 127.0.0.1 is served")
    return ReviewServer(make_app(review_dir, config, reviewer=reviewer, tokens=tokens, tracking_uri=tracking_uri),
                        host, port)


def address(server: ReviewServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def serve(server: ReviewServer) -> None:
    """Serve until interrupted (Ctrl-C), then close."""
    log.info("reviewing %d cases of %s at %s", len(server.app.queue), server.app.dir, address(server))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

