"""The HTTP service: a ``Guard`` behind FastAPI, for callers that are not written in Python.

``/v1/check`` requests arriving together are micro-batched into one ``GuardCore.judge_many`` call (one
batched model call), run on a single worker thread that owns the pipeline; each request keeps its own
request id, prompt indices and audit records. Every verdict goes through the guard's core, so a scorer
failure is the policy's ``on_error`` decision: the service never answers "allow" for a prompt it did not
score unless the policy says so.

With API keys (``access``), each request is authenticated before anything else (``auth.ApiKeyAuth``), judged
by its key's guard (one per distinct policy, sharing the pipeline) and recorded with the key's id in every
record's ``context``.

This one app is the whole API in both engines: ``memguard serve`` runs it under uvicorn, and each replica of
``memguard serve --engine ray`` builds it as its Ray Serve ingress (``guard.service.ray_serve``), passing Ray
Serve's batcher, the rate limits its replicas share and ``/metrics`` for all of them.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from .._version import __version__
from ..actions import MemorizationBlocked
from ..audit import AuditWriteError, audit_context
from ..audit.record import current_actor
from ..core import GuardReport, Submission
from ..events import log_event
from ..policy import Decision
from .batching import Batcher, BatcherFactory, MicroBatcher
from .keys import ApiKey
from .metrics import MonitorSample
from .middleware import DEFAULT_MAX_BODY_BYTES, KEY_SCOPE, ApiKeyAuth, BodySizeLimit
from .models import (
    BlockedResponse,
    CheckRequest,
    CheckResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    GuardHealth,
    Health,
)
from .routing import ServiceAccess

#: Where ``/docs`` loads Swagger UI's assets from (this server, not a CDN).
DOCS_ASSETS = "/docs/assets"

try:  # at module level, so FastAPI can resolve the endpoints' ``request: Request`` annotations
    from fastapi import Request
except ImportError:  # the serve extra is missing: create_app's own import says so
    Request = Any  # type: ignore[assignment,misc]



def create_app(
    guard: Any,
    *,
    max_batch: int = 16,
    max_wait_ms: float = 10.0,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    access: ServiceAccess | None = None,
    bind: str | None = None,
    insecure_no_auth: bool = False,
    batcher: BatcherFactory = MicroBatcher,
    metrics: Callable[[], Awaitable[Sequence[MonitorSample]]] | None = None,
    metrics_labels: Sequence[str] = (),
    started: Mapping[str, Any] | None = None,
) -> Any:
    """A FastAPI app serving ``guard`` (a ``guard.Guard``).

    Args:
        max_batch: most prompts scored in one micro-batch (a larger single request still runs whole).
        max_wait_ms: how long the first request of a batch waits for company.
        max_body_bytes: larger request bodies get HTTP 413, checked from Content-Length and as streamed.
        access: API keys (``ServiceAccess``); None serves everyone with ``guard``.
        bind: the address served, for the ``service_started`` audit record.
        insecure_no_auth: recorded in ``service_started``: the operator chose no keys on a public address.
        batcher: makes each guard's ``/v1/check`` batcher (``MicroBatcher``; a replica passes Ray Serve's).
        metrics: what ``GET /metrics`` serves, awaited per scrape (default: this app's guards), each sample with
            ``metrics_labels`` (a replica answers for its whole deployment, ``replica`` telling them apart).
        started: more about this process for the ``service_started`` record's ``extras`` (engine, replica).
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="memguard-guard")
    guards = [guard] + [g for g in (access.distinct_guards() if access else []) if g is not guard]
    batchers: dict[int, Batcher[tuple[list[str], dict[str, Any]], GuardReport]] = {
        id(g): batcher(lambda batch, g=g: _check(g, batch), executor, max_batch=max_batch,
                       max_wait_ms=max_wait_ms, size=lambda item: len(item[0]))
        for g in guards
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.get_running_loop().run_in_executor(
            executor, _record_start, guards, access, bind, insecure_no_auth, started)
        for each in batchers.values():
            each.start()
        yield
        for each in batchers.values():
            await each.stop()
        await asyncio.get_running_loop().run_in_executor(executor, _close_guards, guards)
        executor.shutdown(wait=True)

    app = FastAPI(
        title="memguard",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        summary="Memorization guard for text-to-image generation",
        description="Scores prompts for training-data memorization before generation and applies a policy.",
        lifespan=lifespan,
    )
    _add_docs(app)
    app.state.guard = guard
    app.state.guards = guards
    app.state.batcher = batchers[id(guard)]
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

    add_metrics_route(app, guards, metrics, metrics_labels)  # GET /metrics, when prometheus_client is installed

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content=_validation_content(exc.errors()))

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz() -> Any:
        states = [_guard_health(each) for each in guards]
        ok = all(state.scorer_ready and state.audit_writable for state in states)
        health = Health(
            status="ok" if ok else "degraded",
            model=str(guard.model_id),
            policy=guard.policy.name,
            policy_version=str(guard.policy.version),
            scorer_ready=states[0].scorer_ready,
            detail=None if ok else "; ".join(f"{s.policy}: {s.detail}" for s in states if s.detail),
            guards=states,
        )
        return JSONResponse(status_code=200 if ok else 503, content=health.model_dump())

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


def _check(guard: Any, batch: list[tuple[list[str], dict[str, Any]]]) -> list[GuardReport]:
    """One judging pass over every request of a micro-batch: each prompt's verdict, audited (a prompt that cannot
    be judged gets the policy's ``on_error`` verdict from the core, also audited)."""
    reports, _ = guard.core.judge_many([Submission(prompts, context=context) for prompts, context in batch],
                                       mode="check")
    return reports


def _add_docs(app: Any) -> None:
    """``GET /docs``: Swagger UI served from this machine (the assets of the ``swagger-ui-py`` package), so the page
    works where no CDN can be reached; without that package, FastAPI's own page (which loads from a CDN)."""
    try:
        import swagger_ui
    except ImportError:
        from fastapi.openapi.docs import get_swagger_ui_html

        @app.get("/docs", include_in_schema=False)
        async def docs_from_cdn() -> Any:
            return get_swagger_ui_html(openapi_url=app.openapi_url, title="memguard API")

        return
    from pathlib import Path

    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount(DOCS_ASSETS, StaticFiles(directory=Path(swagger_ui.__file__).parent / "static"), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Any:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="memguard API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


def _guard_health(guard: Any) -> GuardHealth:
    """Whether ``guard`` can score its model and write its audit log (opening the log if it is not open yet)."""
    problems = []
    ready = getattr(guard, "scorer", None) is not None
    if not ready:
        problems.append(f"cannot score this model: {guard.setup_error}")
    try:
        guard.audit  # noqa: B018 - opens the log, as the next request would
        writable = True
    except Exception as error:
        writable = False
        problems.append(f"audit log not writable: {type(error).__name__}: {error}")
    return GuardHealth(policy=guard.policy.name, policy_version=str(guard.policy.version), scorer_ready=ready,
                       audit_writable=writable, detail="; ".join(problems) or None)


def _record_start(guards: Sequence[Any], access: ServiceAccess | None, bind: str | None,
                  insecure_no_auth: bool, started: Mapping[str, Any] | None = None) -> None:
    """One ``service_started`` record per audit log in use: the address, the auth mode, each key's policy (and, from
    a replica, which replica of which deployment this is, in ``extras``)."""
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
                keys=access.grants() if access is not None else [], extras=dict(started or {}),
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
