"""``memguard serve --engine ray``: the service as replicas of one Ray Serve deployment (extra ``memguard[ray]``).

Each replica loads its own pipeline, builds its own guards (one per distinct policy, as ``memguard serve`` does) and
serves **the same FastAPI app** (``guard.service.app.create_app``) as its Serve ingress, so both engines have one
implementation of the API: endpoints, API keys, per-key policies, body limits, ``/healthz``, ``/metrics``. What a
replica changes is passed in, not copied:

* ``/v1/check`` requests are batched by Ray Serve's ``serve.batch`` (``ServeBatcher``) instead of ``MicroBatcher``,
  with the same rules (``max_batch`` prompts, a request never split) and the same ``GuardCore.judge_many`` call on
  the replica's one worker thread, so a replica decides and scores exactly as the single-process service does.
* Rate limits hold for the deployment, not per replica: the token buckets live in a second deployment of one
  replica (``SharedState``), asked once per request of a key that has a limit. If it cannot be reached within
  ``rate_limit_timeout_s`` (e.g. while Ray restarts it), a replica falls back to buckets of its own holding
  ``1/N`` of the limit (N: the deployment's replicas), never to no limit. The failed-authentication throttle stays
  per replica (N replicas allow N times ``failures_per_minute`` wrong secrets per key).
* ``/metrics`` reaches one replica per scrape; it answers for all of them: each replica pushes its monitors'
  counters to ``SharedState`` every ``metrics_push_s``, and the answering replica serves every replica's latest
  (its own fresh), each series labelled ``replica``.
* Audit: every replica appends to its own segment of one trail (``guard.audit.trail``), whose writer id is the
  replica's own Serve id (``<app>-<replica id>``, also in the ``X-Memguard-Replica`` response header and the
  ``replica`` metrics label). A replica Ray restarts after a crash is a new replica with a new id: it starts a
  new segment and never appends to the dead one's, whose end may be torn or unsigned (``audit verify`` reports
  unsigned records; other segments' checkpoints witness them).

``app_builder`` is the application builder for ``serve run`` and Serve configs (a KubeRay ``RayService``'s
``serveConfigV2``; see ``docs/deployment.md``); ``serve_forever`` is what the CLI runs.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..audit.trail import WRITER_ENV, check_writer_id, is_trail_path
from ..errors import MemguardError
from ..events import log_event
from .metrics import MonitorSample, guard_samples
from .ratelimit import RateLimit, RateLimiter, TokenBucket

__all__ = [
    "APP_NAME",
    "INGRESS_DEPLOYMENT",
    "REPLICA_HEADER",
    "SHARED_DEPLOYMENT",
    "RayServeError",
    "ServeArgs",
    "ServeBatcher",
    "SharedLimiter",
    "SharedState",
    "app_builder",
    "build_app",
    "forwarded_environment",
    "replica_writer_id",
    "serve_forever",
]

APP_NAME = "memguard"
INGRESS_DEPLOYMENT = "MemguardService"
SHARED_DEPLOYMENT = "MemguardShared"
REPLICA_HEADER = "x-memguard-replica"
#: Environment variables of the ``memguard serve`` process that its replicas get too (signing key, trail name,
#: cache, OpenTelemetry); never the writer id, which each replica sets for itself.
FORWARDED_PREFIXES = ("MEMGUARD_", "OTEL_")
_NOT_FORWARDED = frozenset({WRITER_ENV})
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class RayServeError(MemguardError, RuntimeError):
    """The Ray Serve deployment could not be started or configured; the message says which option or what failed."""


def _option(field: str) -> str:
    """A ``ServeArgs`` field as both of its names: the Serve config's key and the CLI option."""
    return f"{field} (--{field.replace('_', '-')})"


class ServeArgs(BaseModel):
    """Everything a replica needs, as the CLI passes it and as a Serve config's ``args`` give it (unknown keys are
    refused). Paths must be readable on every node that runs a replica (the CLI makes them absolute)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="Diffusers pipeline directory (or hub id).")
    audit: str = Field(min_length=1, description="The audit trail directory every replica writes a segment of.")
    policy: str = Field(default="strict", min_length=1)
    api_keys: str | None = None
    calibration: str | None = None
    device: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    max_batch: int = Field(default=16, ge=1)
    max_wait_ms: float = Field(default=10.0, ge=0)
    max_body_bytes: int = Field(default=64 * 1024, ge=1)
    bind: str | None = None
    insecure_no_auth: bool = False
    replicas: int | None = Field(default=None, ge=1)
    min_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int | None = Field(default=None, ge=1)
    target_ongoing_requests: float | None = Field(default=None, gt=0)
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    num_gpus_per_replica: float = Field(default=0.0, ge=0)
    num_cpus_per_replica: float = Field(default=1.0, ge=0)
    metrics_push_s: float = Field(default=2.0, gt=0)
    rate_limit_timeout_s: float = Field(default=1.0, gt=0)
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables of every replica.")

    @field_validator("audit")
    @classmethod
    def _a_trail(cls, value: str) -> str:
        if os.path.isfile(value) or not is_trail_path(value):
            raise ValueError(f"audit (--audit): {value!r} is not a trail directory; every replica writes its own "
                             "segment of one trail, so give a directory (end it with '/' if it does not exist yet)")
        return value if value.endswith(("/", os.sep)) else value + "/"

    @model_validator(mode="after")
    def _scaling(self) -> ServeArgs:
        autoscaling = self.min_replicas is not None or self.max_replicas is not None
        if autoscaling and self.replicas is not None:
            raise ValueError(f"give {_option('replicas')} for a fixed number of replicas or {_option('min_replicas')}"
                             f" and {_option('max_replicas')} for autoscaling, not both")
        if autoscaling and (self.min_replicas is None or self.max_replicas is None):
            raise ValueError(f"autoscaling needs both {_option('min_replicas')} and {_option('max_replicas')}")
        if autoscaling and self.min_replicas > self.max_replicas:  # type: ignore[operator]
            raise ValueError(f"{_option('min_replicas')} ({self.min_replicas}) is more than "
                             f"{_option('max_replicas')} ({self.max_replicas})")
        if self.target_ongoing_requests is not None and not autoscaling:
            raise ValueError(f"{_option('target_ongoing_requests')} is an autoscaling target: it needs "
                             f"{_option('min_replicas')} and {_option('max_replicas')}")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch:
            raise ValueError(f"{_option('max_ongoing_requests')} = {self.max_ongoing_requests} is less than "
                             f"{_option('max_batch')} = {self.max_batch}: a replica would never be sent a full batch")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None

    @property
    def ongoing_limit(self) -> int:
        """Requests Serve sends one replica at once: room for two full batches (one judged, one filling)."""
        return self.max_ongoing_requests or 2 * self.max_batch

    def deployment_options(self) -> dict[str, Any]:
        """The ingress deployment's Ray Serve options (replicas or autoscaling bounds, resources, queue depth)."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.ongoing_limit,
            "ray_actor_options": {"num_cpus": self.num_cpus_per_replica, "num_gpus": self.num_gpus_per_replica,
                                  "runtime_env": {"env_vars": dict(self.env)}},
        }
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or float(self.max_batch),
            }
        else:
            options["num_replicas"] = self.replicas or 1
        return options

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> ServeArgs:
        """``ServeArgs`` from a mapping; ``RayServeError`` names the first bad field and why."""
        try:
            return cls.model_validate(dict(args))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
            message = message.removeprefix("Value error, ")
            raise RayServeError(f"{where}: {message}" if where and not message.startswith(where) else message
                                ) from None


def forwarded_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of this process that replicas need too (``MEMGUARD_*``, ``OTEL_*``; not the writer id)."""
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items() if k.startswith(FORWARDED_PREFIXES) and k not in _NOT_FORWARDED}


def replica_writer_id(app_name: str, replica_id: str) -> str:
    """A replica's audit writer id: its app and its Serve replica id, so a segment, a response header and a metrics
    label name the same replica (and a restarted replica, which Serve gives a new id, a new segment)."""
    return check_writer_id(_UNSAFE.sub("-", f"{app_name}-{replica_id}").strip(".-")[:128])


# ---------------------------------------------------------------------------------------------- shared state


class SharedState:
    """One replica's worth of state for the whole deployment: the API keys' token buckets (so a key's rate limit
    holds across replicas) and each replica's latest metrics samples (so any replica can answer ``/metrics``).

    Its state is memory only: when Ray restarts it, buckets start full and samples come back with each replica's
    next push (``metrics_push_s``)."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, float, int], TokenBucket] = {}
        self._samples: dict[str, tuple[float, list[MonitorSample]]] = {}
        self._lock = threading.Lock()

    def admit(self, key_id: str, per_second: float, capacity: int) -> float:
        """0.0 if the key may make a request now (a token is spent), else the seconds to wait. A changed limit (a
        new key file) gets a new bucket."""
        with self._lock:
            key = (key_id, float(per_second), int(capacity))
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(float(per_second), int(capacity))
            return bucket.take()

    def report(self, replica: str, samples: list[MonitorSample]) -> None:
        """A replica's current counters (replacing its previous ones)."""
        with self._lock:
            self._samples[replica] = (time.monotonic(), list(samples))

    def collect(self, replica: str, samples: list[MonitorSample], stale_after_s: float) -> list[MonitorSample]:
        """Every replica's latest samples, ``replica``'s replaced by the ones it sends; replicas silent for
        ``stale_after_s`` (dead, or scaled down) are dropped."""
        now = time.monotonic()
        with self._lock:
            self._samples[replica] = (now, list(samples))
            for name in [n for n, (seen, _) in self._samples.items() if now - seen > stale_after_s]:
                del self._samples[name]
            return [sample for name in sorted(self._samples) for sample in self._samples[name][1]]


async def _awaited(response: Any) -> Any:
    """A deployment handle's response as a coroutine (for ``asyncio.wait_for``)."""
    return await response


class SharedLimiter:
    """The deployment's rate limits (``Limiter``): asks ``SharedState`` through its handle; if that fails or takes
    longer than ``timeout_s``, a bucket of this replica's own with ``1/replicas()`` of the limit answers."""

    def __init__(self, shared: Any, *, timeout_s: float, replicas: Callable[[], int]) -> None:
        self._shared = shared
        self._timeout = timeout_s
        self._replicas = replicas
        self._local = RateLimiter()

    async def acquire(self, key_id: str, limit: RateLimit | None) -> float:
        if limit is None:
            return 0.0
        try:
            response = self._shared.admit.remote(key_id, limit.per_second, limit.capacity)
            return float(await asyncio.wait_for(_awaited(response), self._timeout))
        except Exception as error:
            replicas = max(1, self._replicas())
            share = RateLimit(per_second=limit.per_second / replicas, burst=max(1, limit.capacity // replicas))
            log_event("rate_limit_fallback", level="warning", key_id=key_id, replicas=replicas,
                      error=f"{type(error).__name__}: {error}")
            return self._local.admit(key_id, share)


# ---------------------------------------------------------------------------------------------- the replica


class ServeBatcher:
    """A ``Batcher`` on Ray Serve's ``serve.batch``: at most ``max_batch`` prompts per call of ``fn`` (a request with
    more runs alone, as with ``MicroBatcher``: its size counts as ``max_batch``), ``fn`` run in ``executor``."""

    def __init__(self, fn: Callable[[list], Sequence], executor: Any, *, max_batch: int, max_wait_ms: float,
                 size: Callable[[Any], int]) -> None:
        from ray import serve

        self.batches = 0

        async def judge_batch(items: list) -> list:
            self.batches += 1
            results = await asyncio.get_running_loop().run_in_executor(executor, fn, items)
            if len(results) != len(items):
                raise RuntimeError(f"batched call returned {len(results)} results for {len(items)} requests")
            return list(results)

        self._handler = serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_ms / 1000.0,
                                    batch_size_fn=lambda items: sum(min(size(i), max_batch) for i in items)
                                    )(judge_batch)

    def start(self) -> None:
        """Nothing to start: Serve's batch queue starts with the first request."""

    async def stop(self) -> None:
        """Nothing to stop: the queue ends with the replica."""

    async def submit(self, item: Any) -> Any:
        return await self._handler(item)


class ReplicaHeader:
    """ASGI middleware, outermost: every response says which replica answered (``X-Memguard-Replica``: the writer
    id of its audit segment and its ``replica`` metrics label)."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.value = replica.encode("ascii")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_replica(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (REPLICA_HEADER.encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, send_with_replica)


class MemguardReplica:
    """One replica: its own pipeline and guards (the same as ``memguard serve`` builds), its own audit segment, and
    the service's app as its ingress (``__serve_build_asgi_app__``, called by Serve after ``__init__``)."""

    def __init__(self, args: ServeArgs | Mapping[str, Any], shared: Any) -> None:
        from ray import serve

        from ..guard import Guard
        from ..loading import load_pipeline
        from ..telemetry import configure_from_environment
        from .keys import load_api_keys
        from .routing import ServiceAccess

        self.args = args if isinstance(args, ServeArgs) else ServeArgs.parse(args)
        context = serve.get_replica_context()
        self.app_name, self.deployment = context.app_name, context.deployment
        self.replica_id = context.replica_id.unique_id
        self.writer = replica_writer_id(self.app_name, self.replica_id)
        os.environ[WRITER_ENV] = self.writer  # before any guard opens its log: this replica's segment
        self.shared = shared
        configure_from_environment()
        pipe = load_pipeline(self.args.model, device=self.args.device, dtype=self.args.dtype)
        audit, calibration = self.args.audit, self.args.calibration

        def make_guard(spec: str, lock: Any = None) -> Guard:
            return Guard(pipe, policy=spec, audit_path=audit, calibration=calibration, source="service", lock=lock)

        self.guard = make_guard(self.args.policy)
        keys = load_api_keys(self.args.api_keys) if self.args.api_keys else None
        limiter = SharedLimiter(shared, timeout_s=self.args.rate_limit_timeout_s, replicas=self._replicas)
        self.access = ServiceAccess.build(keys, self.guard, make_guard, limiter=limiter) if keys is not None else None
        self.guards: list[Any] = []
        self._pusher: asyncio.Task | None = None

    def _replicas(self) -> int:
        from ray import serve

        try:
            return int(serve.get_replica_context().world_size) or 1
        except Exception:
            return self.args.replicas or self.args.max_replicas or 1

    async def __serve_build_asgi_app__(self) -> Any:
        from .app import create_app

        started = {"engine": "ray", "app": self.app_name, "deployment": self.deployment, "replica": self.replica_id,
                   "writer": self.writer, "replicas": self.args.replicas, "min_replicas": self.args.min_replicas,
                   "max_replicas": self.args.max_replicas, "rate_limits": "shared"}
        app = create_app(self.guard, max_batch=self.args.max_batch, max_wait_ms=self.args.max_wait_ms,
                         max_body_bytes=self.args.max_body_bytes, access=self.access, bind=self.args.bind,
                         insecure_no_auth=self.args.insecure_no_auth, batcher=ServeBatcher, metrics=self._metrics,
                         metrics_labels=("replica",), started=started)
        app.add_middleware(ReplicaHeader, replica=self.writer)
        self.guards = list(app.state.guards)
        self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())
        return app

    def _samples(self) -> list[MonitorSample]:
        return guard_samples(self.guards, {"replica": self.writer})

    async def _metrics(self) -> Sequence[MonitorSample]:
        """Every replica's samples for ``/metrics`` (this one's fresh); only this one's if the shared state is away."""
        own = self._samples()
        try:
            response = self.shared.collect.remote(self.writer, own, self._stale_after)
            return await asyncio.wait_for(_awaited(response), self.args.rate_limit_timeout_s * 5)
        except Exception as error:
            log_event("metrics_gather_failed", level="warning", error=f"{type(error).__name__}: {error}")
            return own

    @property
    def _stale_after(self) -> float:
        return 3 * self.args.metrics_push_s + 10.0

    async def _push_metrics(self) -> None:
        """Every ``metrics_push_s``: this replica's counters to the shared state (a failed push is retried later)."""
        while True:
            await asyncio.sleep(self.args.metrics_push_s)
            try:
                await asyncio.wait_for(_awaited(self.shared.report.remote(self.writer, self._samples())),
                                       self.args.metrics_push_s * 5)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log_event("metrics_push_failed", level="warning", error=f"{type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------------------- the application


def build_app(args: ServeArgs) -> Any:
    """The Ray Serve application: the ingress deployment (``args.deployment_options()``) bound to the shared state."""
    from ray import serve

    shared = serve.deployment(SharedState, name=SHARED_DEPLOYMENT, num_replicas=1, max_ongoing_requests=10_000,
                              ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
    try:  # the ingress app is built in the replica, after its guards (Serve's late-bound ingress, Ray >= 2.60)
        replica = serve.ingress()(MemguardReplica)
    except (TypeError, ValueError) as error:
        import ray

        raise RayServeError(f"memguard serve --engine ray needs Ray Serve 2.60 or later (installed: Ray "
                            f"{ray.__version__}): {error}") from None
    ingress = serve.deployment(replica, name=INGRESS_DEPLOYMENT, **args.deployment_options())
    return ingress.bind(args, shared.bind())


def app_builder(args: dict[str, Any]) -> Any:
    """Application builder for Serve configs (``import_path: guard.service.ray_serve:app_builder``, ``args``: the
    fields of ``ServeArgs``), e.g. a KubeRay RayService; bad args raise ``RayServeError`` naming the field.

    A Serve config's proxies listen wherever its ``http_options`` say (every node's ``0.0.0.0`` on Kubernetes), so,
    as ``memguard serve`` does for a public address, it needs ``api_keys`` or an explicit ``insecure_no_auth``."""
    parsed = ServeArgs.parse(args)
    if parsed.api_keys is None and not parsed.insecure_no_auth:
        raise RayServeError("api_keys: a Serve config serves whoever reaches its proxies; give api_keys (the key "
                            "file), or insecure_no_auth: true if a proxy in front authenticates")
    return build_app(parsed)


def serve_forever(args: ServeArgs, *, address: str | None, host: str, port: int,
                  echo: Callable[[str], None] = print) -> None:
    """Start (or join, with ``address``) a Ray cluster, deploy the application on ``host:port`` and serve until
    SIGINT or SIGTERM; then delete the application (replicas close their logs: a final checkpoint each)."""
    import ray
    from ray import serve

    joined = address is not None
    ray.init(address=address, include_dashboard=False, runtime_env={"env_vars": dict(args.env)},
             ignore_reinit_error=True)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        except Exception as error:  # a replica that cannot start (model, policy, key file, audit directory)
            raise RayServeError(f"the Ray Serve application did not start: {type(error).__name__}: "
                                f"{_first_line(error)}") from None
        scaling = (f"{args.min_replicas}-{args.max_replicas} replicas (autoscaling)" if args.autoscaling
                   else f"{args.replicas or 1} replica(s)")
        echo(f"memguard: serving on http://{host}:{port} with Ray Serve, {scaling}; audit trail: {args.audit}")
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            serve.delete(APP_NAME)
        finally:
            if not joined:
                serve.shutdown()
            ray.shutdown()


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def absolute_if_local(value: str | None) -> str | None:
    """A path made absolute when it names something on this machine (replicas run elsewhere, with another cwd);
    names (a shipped policy, a hub id) stay as they are."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value
