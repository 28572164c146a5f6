"""``memguard serve``: the guard as an HTTP service (FastAPI + uvicorn); ``memguard serve hash-key``."""

from __future__ import annotations

import sys
from typing import Any

import click


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
@click.option("--audit", "audit_path", default=None, help="Audit log path (default: each policy's).")
@click.option("--calibration", default=None, type=click.Path(dir_okay=False), help="Calibration profile file.")
@click.option("--device", default=None, help="torch device (default: cuda, mps or cpu, whichever exists).")
@click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Model dtype (default: float16 on CUDA, float32 elsewhere).")
@click.pass_context
def serve(ctx: click.Context, model_path, policy, host, port, api_keys, insecure_no_auth, max_batch, max_wait_ms,
          max_body_bytes, audit_path, calibration, device, dtype) -> None:
    """Serve POST /v1/check, POST /v1/generate and GET /healthz (OpenAPI at /docs).

    Without --api-keys the server only binds a loopback address (127.0.0.1, ::1, localhost) unless
    --insecure-no-auth is given. With OTEL_EXPORTER_OTLP_ENDPOINT set, spans are exported over OTLP.
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
