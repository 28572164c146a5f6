"""The HTTP service: a ``Guard`` behind FastAPI, for callers that are not written in Python.

``/v1/check`` requests arriving together are micro-batched into one ``GuardCore.judge_many`` call (one
batched model call), run on a single worker thread that owns the pipeline; each request keeps its own
request id, prompt indices and audit records. Every verdict goes through the guard's core, so a scorer
failure is the policy's ``on_error`` decision: the service never answers "allow" for a prompt it did not
score unless the policy says so.

With API keys (``access``), each request is authenticated before anything else (``auth.ApiKeyAuth``), judged
by its key's guard (one per distinct policy, sharing the pipeline) and recorded with the key's id in every
record's ``context``.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from ..actions import MemorizationBlocked
from ..audit import AuditWriteError, audit_context
from ..audit.record import current_actor
from ..core import GuardReport, Submission
from ..events import log_event
from ..policy import Decision, decide_on_error
from .auth import KEY_SCOPE, ApiKey, ApiKeyAuth, ServiceAccess
from .batching import MicroBatcher
from .models import (
    BlockedResponse,
    CheckRequest,
    CheckResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
)

try:  # at module level, so FastAPI can resolve the endpoints' ``request: Request`` annotations
    from fastapi import Request
except ImportError:  # the serve extra is missing: create_app's own import says so
    Request = Any  # type: ignore[assignment,misc]

DEFAULT_MAX_BODY_BYTES = 64 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def create_app(
    guard: Any,
    *,
    max_batch: int = 16,
    max_wait_ms: float = 10.0,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    access: ServiceAccess | None = None,
    bind: str | None = None,
    insecure_no_auth: bool = False,
) -> Any:
    """A FastAPI app serving ``guard`` (a ``guard.Guard``).

    Args:
        max_batch: most prompts scored in one micro-batch (a larger single request still runs whole).
        max_wait_ms: how long the first request of a batch waits for company.
        max_body_bytes: larger request bodies get HTTP 413, checked from Content-Length and as streamed.
        access: API keys (``ServiceAccess``); None serves everyone with ``guard``.
        bind: the address served, for the ``service_started`` audit record.
        insecure_no_auth: recorded in ``service_started``: the operator chose no keys on a public address.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="memguard-guard")
    guards = [guard] + [g for g in (access.distinct_guards() if access else []) if g is not guard]
    batchers: dict[int, MicroBatcher[tuple[list[str], dict[str, Any]], GuardReport]] = {
        id(g): MicroBatcher(lambda batch, g=g: _check_fail_closed(g, batch), executor, max_batch=max_batch,
                            max_wait_ms=max_wait_ms, size=lambda item: len(item[0]))
        for g in guards
    }
    batcher = batchers[id(guard)]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.get_running_loop().run_in_executor(
            executor, _record_start, guards, access, bind, insecure_no_auth)
        for each in batchers.values():
            each.start()
        yield
        for each in batchers.values():
            await each.stop()
        await asyncio.get_running_loop().run_in_executor(executor, _close_guards, guards)
        executor.shutdown(wait=True)

    app = FastAPI(
        title="memguard",
        summary="Memorization guard for text-to-image generation",
        description="Scores prompts for training-data memorization before generation and applies a policy.",
        lifespan=lifespan,
    )
    app.state.guard = guard
    app.state.batcher = batcher
    app.state.batchers = batchers
    app.state.access = access
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if access is not None:
        app.add_middleware(ApiKeyAuth, access=access)  # added last: runs first, before the body is read

    def caller(request: Request, endpoint: str) -> tuple[Any, dict[str, Any]]:
        """The guard that judges this request (its key's) and the context its records carry."""
        key: ApiKey | None = request.scope.get(KEY_SCOPE)
        if key is None:
            return guard, {"endpoint": endpoint}
        context = {"endpoint": endpoint, "key_id": key.id}
        if key.team is not None:
            context["team"] = key.team
        return access.guard_for(key) if access is not None else guard, context

    from .metrics import add_metrics_route

    add_metrics_route(app, guard)  # GET /metrics for Prometheus, when prometheus_client is installed

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content=_validation_content(exc.errors()))

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz() -> Any:
        ready = getattr(guard, "scorer", None) is not None
        health = Health(
            status="ok" if ready else "degraded",
            model=str(guard.model_id),
            policy=guard.policy.name,
            policy_version=str(guard.policy.version),
            scorer_ready=ready,
            detail=None if ready else f"cannot score this model: {guard.setup_error}",
        )
        return JSONResponse(status_code=200 if ready else 503, content=health.model_dump())

    @app.post("/v1/check", response_model=CheckResponse, responses={422: {"model": ErrorResponse}})
    async def check(body: CheckRequest, request: Request) -> CheckResponse:
        """Score and decide each prompt; nothing is generated. Each verdict is audited under ``request_id``."""
        target, context = caller(request, "/v1/check")
        report = await batchers[id(target)].submit((body.as_list(), context))
        return CheckResponse(
            request_id=report.request_id,
            decisions=report.decisions,
            blocked=[d.prompt_index for d in report.decisions if d.blocked],
        )

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses={403: {"model": BlockedResponse}, 422: {"model": ErrorResponse}},
    )
    async def generate(body: GenerateRequest, request: Request) -> Any:
        """Guarded generation: PNG images (base64) when allowed, HTTP 403 with the reason when blocked."""
        loop = asyncio.get_running_loop()
        target, context = caller(request, "/v1/generate")
        try:
            output = await loop.run_in_executor(executor, _generate, target, body, context)
        except MemorizationBlocked as blocked:
            return _blocked_response(str(blocked), blocked.report.request_id, blocked.decisions)
        except (ValueError, TypeError) as error:
            return JSONResponse(status_code=400, content={"error": "bad_request", "detail": str(error)})
        report = output.memguard
        if getattr(report, "withheld", False) or getattr(report, "blocked", False):
            return _blocked_response("memguard withheld the request", report.request_id, report.decisions)
        return GenerateResponse(
            request_id=report.request_id,
            images=[_png_base64(image) for image in output.images],
            decisions=report.decisions,
            latency_scoring_ms=report.latency_scoring_ms,
            latency_generation_ms=report.latency_generation_ms,
        )

    return app


def _check_fail_closed(guard: Any, batch: list[tuple[list[str], dict[str, Any]]]) -> list[GuardReport]:
    """One judging pass over every request of a micro-batch; a failure anywhere is the policy's ``on_error``
    verdict for that batch's prompts, never an exception."""
    requests = [Submission(prompts, context=context) for prompts, context in batch]
    try:
        reports, _ = guard.core.judge_many(requests, mode="check")
        return reports
    except Exception as error:
        message = f"check failed: {type(error).__name__}: {error}"
        return [
            GuardReport(request_id="unaudited", decisions=[decide_on_error(guard.policy, i, message)
                                                           for i in range(len(prompts))], mode="check",
                        audit_error=message)
            for prompts, _ in batch
        ]


def _record_start(guards: Sequence[Any], access: ServiceAccess | None, bind: str | None,
                  insecure_no_auth: bool) -> None:
    """One ``service_started`` record per audit log in use: the address, the auth mode, each key's policy."""
    written: set[str] = set()
    for each in guards:
        try:
            logger = each.audit
            path = str(logger.sink.path.resolve())
            if path in written:
                continue
            written.add(path)
            logger.log(
                "service_started", source="service", actor=current_actor(), bind=bind,
                auth="api_keys" if access is not None else "none", insecure_no_auth=insecure_no_auth,
                api_keys_path=str(access.config.path) if access is not None else None,
                api_keys_sha256=access.config.sha256 if access is not None else None,
                keys=access.grants() if access is not None else [],
            )
        except (AuditWriteError, OSError) as error:  # requests will follow on_error, as for any unwritable log
            log_event("audit_unwritable", level="error", event_kind="service_started", error=str(error))


def _close_guards(guards: Sequence[Any]) -> None:
    """At shutdown: close each guard's audit log (a signing log gets its final checkpoint)."""
    for each in guards:
        each.close()


def _generate(guard: Any, body: GenerateRequest, context: dict[str, Any] | None = None) -> Any:
    import torch

    kwargs: dict[str, Any] = {
        "prompt": body.prompt,
        "num_inference_steps": body.num_inference_steps,
        "guidance_scale": body.guidance_scale,
        "num_images_per_prompt": body.num_images,
        "output_type": "pil",
    }
    for name in ("negative_prompt", "height", "width"):
        if getattr(body, name) is not None:
            kwargs[name] = getattr(body, name)
    if body.seed is not None:
        kwargs["generator"] = torch.Generator("cpu").manual_seed(body.seed)
    with audit_context(**(context or {})):
        return guard(**kwargs)


def _blocked_response(detail: str, request_id: str | None, decisions: Sequence[Decision]) -> Any:
    from fastapi.responses import JSONResponse

    body = BlockedResponse(detail=detail, request_id=request_id, decisions=list(decisions))
    return JSONResponse(status_code=403, content=body.model_dump(mode="json"))


def _png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _validation_content(errors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One readable line first (malformed JSON says where), then FastAPI's per-field details."""
    clean = [{k: v for k, v in e.items() if k in ("type", "loc", "msg", "ctx")} for e in errors]
    clean = json.loads(json.dumps(clean, default=str))
    json_errors = [e for e in errors if e.get("type") == "json_invalid"]
    if json_errors:
        error = json_errors[0]
        where = (error.get("ctx") or {}).get("error") or error.get("msg")
        message = f"malformed JSON body: {where} (at character {error['loc'][-1]})"
        return {"error": "malformed_json", "detail": message, "errors": clean}
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in errors]
    return {"error": "invalid_request", "detail": "; ".join(parts), "errors": clean}


class BodySizeLimit:
    """ASGI middleware: HTTP 413 for bodies over ``max_bytes``, by Content-Length or as actually streamed.

    The body is read (up to the limit) before the app sees it, so a lying or absent Content-Length
    cannot make the app buffer more than the limit.
    """

    def __init__(self, app: Any, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                await self._reject(send, f"request body of {int(declared)} bytes exceeds {self.max_bytes}")
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send, f"request body exceeds {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(send: Send, detail: str) -> None:
        payload = json.dumps({"error": "payload_too_large", "detail": detail}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
