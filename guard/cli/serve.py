"""``memguard serve``: the guard as an HTTP service (FastAPI + uvicorn, or replicas on Ray Serve with ``--engine
ray``); ``memguard serve hash-key``."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

#: Options that only mean something with ``--engine ray`` (given with ``--engine local``, they are an error).
RAY_OPTIONS = ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests",
               "num_gpus_per_replica", "num_cpus_per_replica", "address")


@click.group(invoke_without_command=True)
@click.option("--model", "model_path", default=None, help="Diffusers pipeline directory (or hub id). Required.")
@click.option("--policy", default="strict", show_default=True,
              help="Shipped policy name or policy file: the policy of keys that name none (and of everyone "
                   "without --api-keys).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on. Anything but a loopback address needs --api-keys (or --insecure-no-auth).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-keys", "api_keys", default=None, type=click.Path(dir_okay=False),
              help="YAML/JSON file of API keys (ids, hashed secrets, policies, rate limits); requests need "
                   "'Authorization: Bearer <id>.<secret>'. See docs/deployment.md.")
@click.option("--insecure-no-auth", is_flag=True,
              help="Serve without API keys on a non-loopback address: anyone who reaches the port is served.")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1),
              help="Most prompts of concurrent /v1/check requests scored in one batch.")
@click.option("--max-wait-ms", default=10.0, show_default=True, type=click.FloatRange(0),
              help="How long a request waits for others to share its batch.")
@click.option("--max-body-bytes", default=64 * 1024, show_default=True, type=click.IntRange(1),
              help="Larger request bodies are refused with HTTP 413.")
@click.option("--audit", "audit_path", default=None,
              help="Audit log path (default: each policy's); with --engine ray a trail directory (DIR/).")
@click.option("--calibration", default=None, type=click.Path(dir_okay=False), help="Calibration profile file.")
@click.option("--device", default=None, help="torch device (default: cuda, mps or cpu, whichever exists).")
@click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Model dtype (default: float16 on CUDA, float32 elsewhere).")
@click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: one uvicorn process; ray: replicas of a Ray Serve deployment (pip install "
                   "'memguard[ray]'), each with its own pipeline and audit segment.")
@click.option("--replicas", default=None, type=click.IntRange(1),
              help="[ray] Number of replicas (default 1; or autoscale with --min-replicas/--max-replicas).")
@click.option("--min-replicas", default=None, type=click.IntRange(0), help="[ray] Autoscaling: fewest replicas.")
@click.option("--max-replicas", default=None, type=click.IntRange(1), help="[ray] Autoscaling: most replicas.")
@click.option("--target-ongoing-requests", default=None, type=click.FloatRange(0, min_open=True),
              help="[ray] Autoscaling target of requests in progress per replica (default: --max-batch).")
@click.option("--max-ongoing-requests", default=None, type=click.IntRange(1),
              help="[ray] Most requests one replica is sent at once (default: 2 x --max-batch).")
@click.option("--num-gpus-per-replica", default=None, type=click.FloatRange(0),
              help="[ray] GPUs each replica reserves (default 0; 1 on a GPU cluster).")
@click.option("--num-cpus-per-replica", default=None, type=click.FloatRange(0),
              help="[ray] CPUs each replica reserves (default 1).")
@click.option("--address", default=None,
              help="[ray] Ray cluster to join ('auto', or host:port); default: start a local one.")
@click.pass_context
def serve(ctx: click.Context, model_path, policy, host, port, api_keys, insecure_no_auth, max_batch, max_wait_ms,
          max_body_bytes, audit_path, calibration, device, dtype, engine, replicas, min_replicas, max_replicas,
          target_ongoing_requests, max_ongoing_requests, num_gpus_per_replica, num_cpus_per_replica,
          address) -> None:
    """Serve POST /v1/check, POST /v1/generate and GET /healthz (OpenAPI at /docs).

    Without --api-keys the server only binds a loopback address (127.0.0.1, ::1, localhost) unless
    --insecure-no-auth is given. With OTEL_EXPORTER_OTLP_ENDPOINT set, spans are exported over OTLP.
    With --engine ray the same API is served by replicas on Ray Serve; --audit must then be a directory (one
    audit trail, a segment per replica). See docs/deployment.md.
    """
    if ctx.invoked_subcommand is not None:
        return
    if model_path is None:
        raise click.UsageError("Missing option '--model'.")
    if api_keys and insecure_no_auth:
        raise click.UsageError("--api-keys and --insecure-no-auth contradict each other; give one")
    from ..service.routing import is_loopback

    if api_keys is None and not insecure_no_auth and not is_loopback(host):
        raise click.UsageError(f"refusing to serve {host} without API keys: anyone who can reach it could use the "
                               f"guard; pass --api-keys FILE, or --insecure-no-auth if a proxy in front authenticates")
    from_command_line = click.core.ParameterSource.COMMANDLINE
    ray_given = [name for name in RAY_OPTIONS if ctx.get_parameter_source(name) == from_command_line]
    if engine == "local" and ray_given:
        raise click.UsageError(f"--{ray_given[0].replace('_', '-')} needs --engine ray")
    if engine == "ray":
        _serve_ray(ctx, model_path=model_path, policy=policy, host=host, port=port, api_keys=api_keys,
                   insecure_no_auth=insecure_no_auth, max_batch=max_batch, max_wait_ms=max_wait_ms,
                   max_body_bytes=max_body_bytes, audit_path=audit_path, calibration=calibration, device=device,
                   dtype=dtype, replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                   target_ongoing_requests=target_ongoing_requests, max_ongoing_requests=max_ongoing_requests,
                   num_gpus_per_replica=num_gpus_per_replica, num_cpus_per_replica=num_cpus_per_replica,
                   address=address)
        return
    try:
        import uvicorn

        from ..service import create_app
    except ImportError as error:
        hint = "pip install 'memguard[serve]'"
        raise click.ClickException(f"memguard serve needs FastAPI and uvicorn: {hint} ({error})") from None
    from ..guard import Guard
    from ..loading import load_pipeline
    from ..service.keys import load_api_keys
    from ..service.routing import ServiceAccess
    from ..telemetry import configure_from_environment

    keys = load_api_keys(api_keys) if api_keys else None
    if configure_from_environment():
        click.echo("memguard: exporting OpenTelemetry spans over OTLP", err=True)
    pipe = load_pipeline(model_path, device=device, dtype=dtype)

    def make_guard(spec: str, lock: Any = None) -> Guard:
        return Guard(pipe, policy=spec, audit_path=audit_path, calibration=calibration, source="service", lock=lock)

    guard = make_guard(policy)
    access = ServiceAccess.build(keys, guard, make_guard) if keys is not None else None
    app = create_app(guard, max_batch=max_batch, max_wait_ms=max_wait_ms, max_body_bytes=max_body_bytes,
                     access=access, bind=f"{host}:{port}", insecure_no_auth=insecure_no_auth)
    auth = f"{len(keys.keys)} API keys from {keys.path}" if keys is not None else "no authentication"
    click.echo(f"memguard: serving {guard!r} on http://{host}:{port} ({auth}; audit: {guard.audit.sink.path})",
               err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _serve_ray(ctx: click.Context, *, model_path: str, policy: str, host: str, port: int, api_keys: str | None,
               audit_path: str | None, address: str | None, **options: Any) -> None:
    """``--engine ray``: check everything here (one line naming the option), then deploy and serve until stopped."""
    from ..audit.logger import AUDIT_PATH_ENV
    from ..service.keys import load_api_keys
    from ..service.ray_serve import RayServeError, ServeArgs, absolute_if_local, forwarded_environment

    audit = audit_path or os.environ.get(AUDIT_PATH_ENV)
    if not audit:
        raise click.UsageError("--engine ray needs --audit DIR/: every replica writes its own segment of one audit "
                               "trail in that directory (on a cluster: a directory every node can write)")
    if api_keys:
        load_api_keys(api_keys)  # a bad key file is an error here, not in every replica
    trailing = audit.endswith(("/", os.sep))
    audit = absolute_if_local(audit) or audit
    audit = os.path.abspath(audit) + ("/" if trailing else "")
    given = {k: v for k, v in options.items() if v is not None}
    try:
        args = ServeArgs.parse({
            **given, "model": absolute_if_local(model_path), "policy": absolute_if_local(policy),
            "api_keys": absolute_if_local(api_keys), "calibration": absolute_if_local(options.get("calibration")),
            "audit": audit, "bind": f"{host}:{port}", "env": forwarded_environment(),
        })
    except RayServeError as error:
        raise click.UsageError(str(error)) from None
    try:
        import ray  # noqa: F401
        from ray import serve as _serve  # noqa: F401
    except ImportError as error:
        raise click.ClickException(f"--engine ray needs Ray Serve: pip install 'memguard[ray]' ({error})") from None
    from ..service.ray_serve import serve_forever

    serve_forever(args, address=address, host=host, port=port, echo=lambda line: click.echo(line, err=True))


@serve.command(name="hash-key")
@click.option("--generate", is_flag=True, help="Make a new random key for --id instead of reading a secret.")
@click.option("--id", "key_id", default=None, help="The key id (with --generate; else, to print a key file entry).")
def hash_key(generate: bool, key_id: str | None) -> None:
    """Print the scrypt hash of an API key secret for the key file's secret_hash.

    The secret is read from standard input (or asked for, hidden, on a terminal). With --generate --id ID a
    random key is made: the key file entry goes to standard output and the token for the client,
    ID.SECRET, to standard error (shown once, never stored).
    """
    from ..service.keys import hash_secret, new_api_key

    if generate:
        if key_id is None:
            raise click.UsageError("--generate needs --id")
        try:
            token, hashed = new_api_key(key_id)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--id") from None
        click.echo(f"api key for {key_id} (give it to the client; it is not stored anywhere): {token}", err=True)
        click.echo(f"  - id: {key_id}\n    secret_hash: \"{hashed}\"")
        return
    if sys.stdin.isatty():
        secret = click.prompt("secret", hide_input=True, confirmation_prompt=True)
    else:
        secret = sys.stdin.readline().rstrip("\r\n")
    try:
        hashed = hash_secret(secret)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    if key_id is not None:
        click.echo(f"  - id: {key_id}\n    secret_hash: \"{hashed}\"")
    else:
        click.echo(hashed)
