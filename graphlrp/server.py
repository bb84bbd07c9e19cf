"""The HTTP explainer service behind `graphlrp serve`: FastAPI over onnxruntime, no torch.

Requests are decoded in the thread pool, then micro-batched: an asyncio queue collects up to `max_batch` inputs
(waiting at most `max_wait_ms` after the first) and one onnxruntime call per batch runs in a single-thread
executor. While a batch runs the next one fills up, so batches grow with the load. Bad input always gets a 4xx
with a JSON `detail`; request bodies are capped while they stream in.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from . import heatmap
from .errors import ImageError, InputError, RelevanceCheckError
from .metrics import CONTENT_TYPE, Counter, Histogram, Registry
from .runtime import ExplainerSession, Explanation, load, open_image
from .webpage import INDEX_HTML

ENV_CONFIG = "GRAPHLRP_SERVE_CONFIG"  # how `--workers N` hands the settings to each worker process
PATHS = ("/", "/v1/explain", "/v1/metadata", "/healthz", "/metrics")
TOPK = 5
MAX_PHOTO_SIDE = 1600  # pictures at the photo's resolution, up to this many pixels on its longer side


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body is larger than the limit of {limit / 2**20:g} MiB")


class ServerMetrics(Registry):
    def __init__(self, max_batch: int):
        self.requests = Counter("graphlrp_requests_total", "HTTP requests by path and status code.")
        self.latency = Histogram("graphlrp_request_duration_seconds", "Latency of POST /v1/explain.",
                                 [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10])
        sizes = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch} | {max_batch})
        self.batch_size = Histogram("graphlrp_batch_size", "Inputs per onnxruntime call.", sizes)
        self.batch_seconds = Histogram("graphlrp_batch_duration_seconds", "Duration of one onnxruntime call.",
                                       [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5])
        super().__init__(self.requests, self.latency, self.batch_size, self.batch_seconds)


class MicroBatcher:
    """Groups concurrent requests into one onnxruntime call."""

    def __init__(self, session: ExplainerSession, max_batch: int, max_wait_s: float, metrics: ServerMetrics):
        self.session, self.max_batch, self.max_wait_s, self.metrics = session, max_batch, max_wait_s, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="onnxruntime")
        self.task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, x: np.ndarray, target: int) -> Explanation:
        """x: one checked [C, H, W] input (see ExplainerSession.prepare)."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, target, future))
        return await future

    async def _collect(self) -> list:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
            except asyncio.TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            x = np.stack([item[0] for item in batch])
            target = np.array([item[1] for item in batch], np.int64)
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.session.run_each, x, target)
            except Exception as e:  # a failing model call fails its requests, not the server
                results = [e] * len(batch)
            self.metrics.batch_seconds.observe(time.perf_counter() - start)
            self.metrics.batch_size.observe(len(batch))
            for (_, _, future), result in zip(batch, results):
                if not future.done():
                    (future.set_exception if isinstance(result, Exception) else future.set_result)(result)


class BodyLimit:
    """ASGI middleware: 413 for a declared Content-Length over the limit before any of the body is read, and
    for streamed (chunked) bodies as soon as the running total passes it; nothing beyond the limit is kept."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": str(BodyTooLarge(self.max_bytes))}, status_code=413,
                                    headers={"Connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class RequestMetrics:
    """ASGI middleware counting responses by path and status, and timing explain requests."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in PATHS else "other"
            self.metrics.requests.inc(path=path, status=str(status))
            if path == "/v1/explain":
                self.metrics.latency.observe(time.perf_counter() - start)


def create_app(session: ExplainerSession, max_batch: int = 8, max_wait_ms: float = 5.0,
               max_body_mb: float = 16.0) -> FastAPI:
    metrics = ServerMetrics(max_batch)
    batcher = MicroBatcher(session, max_batch, max_wait_ms / 1000.0, metrics)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="graphlrp explainer", version=session.metadata.get("graphlrp_version", ""),
                  lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=int(max_body_mb * 2**20))
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost, so 413s are counted too
    app.add_exception_handler(ImageError, _error_handler(400))
    app.add_exception_handler(InputError, _error_handler(422))
    app.add_exception_handler(RelevanceCheckError, _error_handler(422))  # this input cannot be explained
    app.add_exception_handler(BodyTooLarge, _error_handler(413))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return INDEX_HTML

    @app.get("/healthz")
    async def healthz():
        if not batcher.alive:
            return JSONResponse({"status": "batcher stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/metadata")
    async def metadata():
        return {"metadata": session.metadata, "input_size": list(session.input_size),
                "preprocessing": session.preprocessing.summary(),
                "num_classes": session.num_classes, "providers": session.providers,
                "max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_body_mb": max_body_mb}

    @app.post("/v1/explain")
    async def explain(request: Request, target: int | None = None, relevance: bool = False, overlay: bool = False,
                      photo: bool = False, cmap: str | None = None):
        """Body: multipart field `image` (+ optional field `target`), or JSON {"image_base64": ..., "target": k}
        or {"array": [C][H][W] normalised floats, "target": k}. The body's target wins over `?target=`.
        `?photo=1`: overlay and heatmap also at the photo's resolution (images only); `?cmap=`: a matplotlib
        colour map instead of the one the relevance's signs call for."""
        if cmap is not None:
            heatmap.check_cmap(cmap)
        source, body_target, name = await _read_input(request)
        if body_target is not None:
            target = body_target
        x, t, image = await run_in_threadpool(_to_input, session, source, target, name)
        exp = await batcher.submit(x[0], int(t[0]))
        return JSONResponse(await run_in_threadpool(_result, session, exp, relevance, overlay,
                                                    image if photo else None, cmap))

    return app


def _error_handler(status: int):
    async def handler(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=status)

    return handler


async def _read_input(request: Request) -> tuple[bytes | list, int | None, str | None]:
    """(encoded image bytes or nested-list array, target from the body or None, the uploaded file's name)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        async with request.form(max_files=2, max_fields=8) as form:
            image = form.get("image")
            if not isinstance(image, UploadFile):
                raise InputError("multipart field 'image' (a file upload) is required")
            return await image.read(), _parse_target(form.get("target")), image.filename or None
    if content_type.startswith("application/json"):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise HTTPException(400, f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise InputError('JSON body must be an object: {"image_base64": ...} or {"array": ...}')
        if "image_base64" in body:
            return _decode_base64(body["image_base64"]), _parse_target(body.get("target")), None
        if "array" in body:
            return body["array"], _parse_target(body.get("target")), None
        raise InputError("JSON body needs 'image_base64' (an encoded image) or 'array' (normalised [C][H][W])")
    raise HTTPException(415, "send multipart/form-data with an 'image' file, or application/json")


def _decode_base64(text) -> bytes:
    if not isinstance(text, str):
        raise ImageError("image_base64 must be a string")
    if text.startswith("data:"):  # accept data URLs as browsers produce them
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image_base64 is not valid base64") from None


def _parse_target(value) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise InputError(f"target must be an integer class index, got {value!r}")


def _to_input(session: ExplainerSession, source, target: int | None, name: str | None = None):
    """Decode (image) or convert (array) and check, off the event loop: (x, target, the decoded image or None).
    An unreadable upload is named by its file name where it has one."""
    if isinstance(source, bytes):
        try:
            image = open_image(source)
            x = session.preprocess(image)
        except ImageError as e:
            generic, text = "uploaded image", str(e)  # how the runtime names an image given as bytes
            if name and text.startswith(generic):
                raise ImageError(name + text[len(generic):]) from None
            raise
        return (*session.prepare(x, target), image)
    return (*session.prepare(source, target), None)


def _result(session: ExplainerSession, exp: Explanation, relevance: bool, overlay: bool, image, cmap) -> dict:
    scale = heatmap.ColourScale.of(exp.relevance_map, cmap)
    result = {"target": exp.target, "predicted": exp.predicted,
              "target_name": _name(session, exp.target), "predicted_name": _name(session, exp.predicted),
              "probability": float(exp.probabilities[exp.target]),
              "topk": [{"index": i, "label": session.label(i), "name": _name(session, i), "probability": p}
                       for i, p in exp.topk(TOPK)],
              "heatmap_png": _b64png(heatmap.heatmap(exp.relevance, scale)),
              "scale": scale.to_dict(), "colorbar_png": _b64png(scale.colorbar())}
    if overlay:
        result["overlay_png"] = _b64png(heatmap.overlay(exp.relevance, session.to_rgb(exp.input), scale=scale))
    if image is not None:
        photo = image.convert("RGB")
        result["photo_size"] = list(photo.size)
        if max(photo.size) > MAX_PHOTO_SIDE:
            photo = photo.copy()
            photo.thumbnail((MAX_PHOTO_SIDE, MAX_PHOTO_SIDE))
        pmap = heatmap.photo_map(exp.relevance, session.preprocessing, image.size, shown=photo.size)
        result["photo_shown_size"] = list(photo.size)
        result["photo_overlay_png"] = _b64png(heatmap.photo_overlay(pmap, photo, scale))
        result["photo_heatmap_png"] = _b64png(heatmap.photo_heatmap(pmap, scale))
    if relevance:
        result["relevance"] = heatmap.relevance_map(exp.relevance).tolist()
    return result


def _name(session: ExplainerSession, index: int) -> str:
    return session.label(index) or f"class {index}"


def _b64png(image) -> str:
    return base64.b64encode(heatmap.png_bytes(image)).decode("ascii")


def app_from_env() -> FastAPI:
    """App factory for uvicorn worker processes (`--workers N`): settings come from $GRAPHLRP_SERVE_CONFIG."""
    config = json.loads(os.environ[ENV_CONFIG])
    session = load(config.pop("model"), providers=config.pop("provider"), threads=config.pop("threads"))
    labels = config.pop("labels", None)
    if labels is not None:
        session.set_labels(labels)
    return create_app(session, **config)
