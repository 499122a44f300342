"""The HTTP app (Starlette; run it under uvicorn): endpoints, input checks, answers.

POST /v1/translate   multipart form: image (file, required); member (index or 'all', default 'all');
                     styles (1..max_styles, default 1); seed (0..2**63-1, default random, echoed);
                     size (a multiple of 2**n_downsample up to max_size, default the config's new_size);
                     format (json | png, default json); face_crop (0/1, default the server's --face-crop).
                     json: {"outputs": [{"member", "style", "png_base64"}], "face": {...} | null, "seed",
                     "size", "batch_size", "timing_ms": {...}}; png: the image itself (exactly one output).
GET  /v1/info        what the page needs: members, sizes, limits
GET  /healthz        liveness: 200 while the process serves
GET  /readyz         200 once the model is loaded and warmed up, else 503
GET  /metrics        Prometheus text format (:mod:`council_fast.serving.metrics`)
GET  /               the page (static files in ``page/``)

Every refusal is a JSON body ``{"error": message}`` naming the field or limit at fault: 400 for a body
that is not a readable image or not a multipart form, 413 for an upload over --max-upload-mb or an
image over --max-pixels (decompression bombs), 422 for unknown, missing or out-of-range fields,
503 with Retry-After when the queue is full or the server is shutting down, 500 when the batch that
held the request failed (other batches are unaffected).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..facecrop import DEFAULT_MARGIN, FaceCropError, crop_face
from ..images import ImageReadError, ImageTooLargeError, decode_rgb, tensor_to_pil
from .batcher import Batcher, QueueFull, ShuttingDown
from .engine import ServingEngine, Work, safe_stem, style_codes
from .metrics import CONTENT_TYPE, Metrics

__all__ = ["ServeSettings", "create_app", "PAGE_DIR"]

PAGE_DIR = str(resources.files("council_fast.serving") / "page")
FIELDS = ("image", "member", "styles", "seed", "size", "format", "face_crop")
MAX_SEED = 2 ** 63 - 1
KNOWN_PATHS = ("/v1/translate", "/v1/info", "/healthz", "/readyz", "/metrics", "/")


@dataclass
class ServeSettings:
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_upload_bytes: int = 20 * 2 ** 20
    max_pixels: int = 40_000_000
    max_styles: int = 16
    max_size: int = 1024
    face_crop: bool = False
    face_margin: float = DEFAULT_MARGIN


class RequestError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status, headers=self.headers)


@dataclass
class Options:
    members: list[int]
    styles: int
    seed: int
    size: int
    format: str
    face_crop: bool


class Service:
    """What the endpoints share: engine, batcher, metrics, settings."""

    def __init__(self, engine: ServingEngine, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        self.batcher = Batcher(self._run_batch, settings.max_batch, settings.max_wait_ms / 1e3, settings.max_queue,
                               on_batch=lambda n, s, ok: self.metrics.batch(n, s, ok), before_start=self._warm_up)
        self.metrics = Metrics(lambda: self.batcher.depth, self.ready)

    def _warm_up(self) -> None:
        self.engine.warm_up()
        self.batcher.max_batch = min(self.settings.max_batch, self.engine.batch_limit)
        if self.engine.tuning_ms:
            timings = ", ".join(f"{b}: {ms:.1f}" for b, ms in self.engine.tuning_ms.items())
            print(f"council-fast serve: batch limit {self.batcher.max_batch} on the CPU "
                  f"(ms per image by batch size, {self.engine.size}x{self.engine.size}: {timings})", file=sys.stderr)

    def ready(self) -> bool:
        return self.batcher.started.is_set() and self.batcher.start_error is None

    def _run_batch(self, works: list[Work]) -> list[dict]:
        start = time.monotonic()
        images = self.engine.run(works)
        done = time.monotonic()
        return [{"images": im, "batch_size": len(works), "started": start, "model_s": done - start} for im in images]

    def retry_after(self) -> str:
        hist = self.metrics.batch_seconds
        per_batch = hist.sum / hist.count if hist.count else 1.0
        return str(max(1, math.ceil(per_batch * (self.batcher.depth / self.batcher.max_batch + 1))))

    # ------------------------------------------------------------------ parsing

    async def read_form(self, request: Request):
        limit = self.settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"upload of {int(declared)} bytes exceeds the {limit}-byte limit (--max-upload-mb)")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise RequestError(400, "expected a multipart/form-data body with an 'image' file field")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"upload exceeds the {limit}-byte limit (--max-upload-mb)")
        return await _parse_multipart(request, bytes(body))

    def options(self, form) -> Options:
        unknown = sorted({k for k in form.keys() if k not in FIELDS})
        if unknown:
            raise RequestError(422, f"unknown field(s): {', '.join(unknown)}; accepted: {', '.join(FIELDS)}")
        for key in form.keys():
            if len(form.getlist(key)) > 1:
                raise RequestError(422, f"field '{key}' given more than once")
        e = self.engine
        opts = Options(members=_members(form.get("member"), e.members),
                       styles=_int_field(form, "styles", 1, 1, self.settings.max_styles),
                       seed=_int_field(form, "seed", None, 0, MAX_SEED),
                       size=_size_field(form, e.size, e.size_factor, self.settings.max_size),
                       format=_choice(form, "format", "json", ("json", "png")),
                       face_crop=_bool_field(form, "face_crop", self.settings.face_crop))
        if opts.seed is None:
            opts.seed = secrets.randbelow(MAX_SEED + 1)
        if opts.format == "png" and len(opts.members) * opts.styles != 1:
            raise RequestError(422, f"format=png returns one image, but member/styles ask for "
                                    f"{len(opts.members) * opts.styles}; use format=json or one member and styles=1")
        return opts

    def load_image(self, upload: UploadFile, data: bytes, opts: Options):
        name = upload.filename or "image"
        try:
            im = decode_rgb(data, f"image '{name}'", self.settings.max_pixels)
        except ImageTooLargeError as err:
            raise RequestError(413, f"{err} (--max-pixels)") from None
        except ImageReadError as err:
            raise RequestError(400, str(err)) from None
        face = None
        if opts.face_crop:
            try:
                crop = crop_face(im, self.settings.face_margin)
            except FaceCropError as err:
                raise RequestError(422, f"face_crop: {err}") from None
            face = {**crop.as_dict(), "photo_size": [im.width, im.height]}
            im = crop.image
        return self.engine.prepare(im, opts.size), face

    # ------------------------------------------------------------------ answering

    async def translate(self, request: Request) -> Response:
        t0 = time.monotonic()
        form = await self.read_form(request)
        try:
            opts = self.options(form)
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise RequestError(422, "field 'image' is missing or not a file")
            data = await upload.read()
        finally:
            await form.close()
        x, face = await run_in_threadpool(self.load_image, upload, data, opts)
        z = style_codes(opts.seed, safe_stem(upload.filename), opts.styles, self.engine.style_dim)
        t1 = time.monotonic()
        result = await self._submit(Work(x, opts.members, z), opts.size)
        t2 = time.monotonic()
        images = result["images"]
        keys = [(m, s) for m in opts.members for s in range(opts.styles)]
        pngs = await run_in_threadpool(lambda: [_png(images[k]) for k in keys])
        t3 = time.monotonic()
        timing = {"decode": t1 - t0, "queue": result["started"] - t1, "model": result["model_s"],
                  "encode": t3 - t2, "total": t3 - t0}
        headers = {"X-Seed": str(opts.seed), "X-Batch-Size": str(result["batch_size"])}
        if opts.format == "png":
            return Response(pngs[0], media_type="image/png", headers=headers)
        return JSONResponse({
            "outputs": [{"member": m, "style": s, "png_base64": base64.b64encode(p).decode("ascii")}
                        for (m, s), p in zip(keys, pngs)],
            "face": face, "seed": opts.seed, "size": opts.size, "batch_size": result["batch_size"],
            "timing_ms": {k: round(v * 1e3, 3) for k, v in timing.items()}}, headers=headers)

    async def _submit(self, work: Work, size: int) -> dict:
        try:
            future = self.batcher.submit(work, key=size)
        except QueueFull as err:
            raise RequestError(503, f"{err}; retry later", {"Retry-After": self.retry_after()}) from None
        except ShuttingDown as err:
            raise RequestError(503, str(err), {"Retry-After": "5"}) from None
        try:
            return await asyncio.wrap_future(future)
        except ShuttingDown as err:
            raise RequestError(503, str(err), {"Retry-After": "5"}) from None
        except Exception as err:  # noqa: BLE001 - the batch holding this request failed
            raise RequestError(500, f"the model batch holding this request failed: {type(err).__name__}: {err}") \
                from None

    def info(self) -> dict:
        e, s = self.engine, self.settings
        return {"members": e.members, "size": e.size, "size_multiple": e.size_factor, "max_size": s.max_size,
                "max_styles": s.max_styles, "face_crop": s.face_crop, "max_upload_bytes": s.max_upload_bytes,
                "max_batch": s.max_batch, "batch_limit": self.batcher.max_batch, "engine": e.engine, "device": str(e.device), "precision": e.precision,
                "ready": self.ready()}


async def _parse_multipart(request: Request, body: bytes):
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}
    try:
        return await Request(request.scope, receive).form(max_files=2, max_fields=len(FIELDS) + 4)
    except MultiPartException as err:
        raise RequestError(400, f"malformed multipart body: {err}") from None
    except Exception as err:  # noqa: BLE001 - e.g. starlette's HTTPException for too many fields
        raise RequestError(400, f"malformed multipart body: {getattr(err, 'detail', err)}") from None


def _text(form, key: str) -> str | None:
    value = form.get(key)
    if value is None:
        return None
    if isinstance(value, UploadFile):
        raise RequestError(422, f"field '{key}' must be a plain value, not a file")
    value = value.strip()
    return value or None


def _int_field(form, key: str, default, low: int, high: int):
    text = _text(form, key)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise RequestError(422, f"field '{key}': {text[:40]!r} is not an integer") from None
    if not low <= value <= high:
        raise RequestError(422, f"field '{key}': {value} is out of range [{low}, {high}]")
    return value


def _size_field(form, default: int, factor: int, high: int) -> int:
    size = _int_field(form, "size", default, factor, max(high, default))
    if size % factor:
        raise RequestError(422, f"field 'size': {size} is not a multiple of {factor} (2**gen.n_downsample)")
    return size


def _choice(form, key: str, default: str, choices) -> str:
    text = _text(form, key)
    if text is None:
        return default
    if text not in choices:
        raise RequestError(422, f"field '{key}': {text[:40]!r} is not one of {', '.join(choices)}")
    return text


def _bool_field(form, key: str, default: bool) -> bool:
    text = _text(form, key)
    if text is None:
        return default
    if text.lower() not in ("0", "1", "true", "false"):
        raise RequestError(422, f"field '{key}': {text[:40]!r} is not one of 0, 1, true, false")
    return text.lower() in ("1", "true")


def _members(text, available: list[int]) -> list[int]:
    if isinstance(text, UploadFile):
        raise RequestError(422, "field 'member' must be a plain value, not a file")
    text = (text or "all").strip()
    if text == "all":
        return list(available)
    try:
        k = int(text)
    except ValueError:
        raise RequestError(422, f"field 'member': {text[:40]!r} is not a member index or 'all'") from None
    if k not in available:
        raise RequestError(422, f"field 'member': {k} is not a member; the model has {available}")
    return [k]


def _png(t) -> bytes:
    buf = io.BytesIO()
    tensor_to_pil(t).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- the app

class _CountRequests:
    """ASGI middleware: every answer counted by path and status (unknown paths as 'other')."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [500]
        path = scope.get("path", "")
        label = path if path in KNOWN_PATHS else "/static" if path.startswith("/static/") else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, counting_send)
        finally:
            seconds = time.monotonic() - start if label == "/v1/translate" else None
            self.metrics.request(label, status[0], seconds)


def create_app(engine: ServingEngine, settings: ServeSettings | None = None) -> Starlette:
    """The app; its lifespan starts the batcher (which warms the model up) and drains it on shutdown."""
    service = Service(engine, settings or ServeSettings())

    async def translate(request: Request) -> Response:
        try:
            return await service.translate(request)
        except RequestError as err:
            return err.response()

    async def info(request: Request) -> Response:
        return JSONResponse(service.info())

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if service.ready():
            return JSONResponse({"ready": True})
        error = service.batcher.start_error
        return JSONResponse({"ready": False, "error": None if error is None else str(error)}, status_code=503)

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(service.metrics.render(), media_type=CONTENT_TYPE)

    async def page(request: Request) -> Response:
        return FileResponse(os.path.join(PAGE_DIR, "index.html"), media_type="text/html")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.batcher.close)

    app = Starlette(routes=[
        Route("/v1/translate", translate, methods=["POST"]),
        Route("/v1/info", info), Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics),
        Route("/", page), Mount("/static", StaticFiles(directory=PAGE_DIR), name="static"),
    ], lifespan=lifespan, middleware=[Middleware(_CountRequests, metrics=service.metrics)])
    app.state.service = service
    return app
