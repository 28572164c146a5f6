"""``memguard serve``: the guard as an HTTP service (FastAPI + uvicorn)."""

from __future__ import annotations

import click


@click.command()
@click.option("--model", "model_path", required=True, help="Diffusers pipeline directory (or hub id).")
@click.option("--policy", default="strict", show_default=True, help="Shipped policy name or policy file.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1),
              help="Most prompts of concurrent /v1/check requests scored in one batch.")
@click.option("--max-wait-ms", default=10.0, show_default=True, type=click.FloatRange(0),
              help="How long a request waits for others to share its batch.")
@click.option("--max-body-bytes", default=64 * 1024, show_default=True, type=click.IntRange(1),
              help="Larger request bodies are refused with HTTP 413.")
@click.option("--audit", "audit_path", default=None, help="Audit log path (default: the policy's).")
@click.option("--calibration", default=None, type=click.Path(dir_okay=False), help="Calibration profile file.")
@click.option("--device", default=None, help="torch device (default: cuda, mps or cpu, whichever exists).")
@click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Model dtype (default: float16 on CUDA, float32 elsewhere).")
def serve(model_path, policy, host, port, max_batch, max_wait_ms, max_body_bytes, audit_path, calibration,
          device, dtype) -> None:
    """Serve POST /v1/check, POST /v1/generate and GET /healthz (OpenAPI at /docs)."""
    try:
        import uvicorn

        from ..service import create_app
    except ImportError as error:
        hint = "pip install 'memguard[serve]'"
        raise click.ClickException(f"memguard serve needs FastAPI and uvicorn: {hint} ({error})") from None
    from ..guard import Guard
    from ..loading import load_pipeline

    guard = Guard(load_pipeline(model_path, device=device, dtype=dtype), policy=policy, audit_path=audit_path,
                  calibration=calibration, source="service")
    app = create_app(guard, max_batch=max_batch, max_wait_ms=max_wait_ms, max_body_bytes=max_body_bytes)
    click.echo(f"memguard: serving {guard!r} on http://{host}:{port} (audit: {guard.audit.sink.path})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
