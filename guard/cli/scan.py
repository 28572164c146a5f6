"""``memguard scan``: score every prompt of a file against a model, locally or on a Ray cluster."""

from __future__ import annotations

import click

from ..engines import ScanError, ScanJob
from .options import policy_scoring_option, scoring_settings


@click.command()
@click.option("--model", "model_path", required=True, help="Diffusers pipeline directory (or hub id).")
@click.option("--prompts", "prompts_path", required=True, type=click.Path(dir_okay=False),
              help="Text file, one prompt per line; blank lines are skipped.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Output JSONL file.")
@policy_scoring_option
@click.option("--device", default=None, help="torch device (default: cuda, mps or cpu, whichever exists).")
@click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Model dtype (default: float16 on CUDA, float32 elsewhere).")
@click.option("--resume/--no-resume", default=False, show_default=True,
              help="Continue an interrupted scan: keep OUT's complete rows and score the rest.")
@click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: this process; ray: an actor pool on a Ray cluster (pip install 'memguard[ray]').")
@click.option("--address", default=None, help="[ray] cluster address (default: start a local Ray).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
              help="[ray] actors, each holding one copy of the pipeline.")
@click.option("--num-gpus-per-worker", default=0.0, show_default=True, type=click.FloatRange(0),
              help="[ray] GPUs per actor (0: score on CPU).")
def scan(model_path, prompts_path, out_path, device, dtype, resume, engine, address, workers, num_gpus_per_worker,
         **scoring) -> None:
    """Score each non-blank line of PROMPTS and write one JSON object per prompt, in input order."""
    job = ScanJob(model=model_path, prompts_path=prompts_path, out_path=out_path, scoring=scoring_settings(scoring),
                  device=device, dtype=dtype, resume=resume)
    try:
        if engine == "ray":
            from ..engines.ray_engine import scan_ray

            scored = scan_ray(job, address=address, workers=workers, num_gpus_per_worker=num_gpus_per_worker)
        else:
            if address is not None or workers != 1 or num_gpus_per_worker:
                raise ScanError("--address, --workers and --num-gpus-per-worker need --engine ray")
            from ..engines.local import scan_local

            scored = scan_local(job)
    except ScanError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"scored {scored} prompts -> {out_path}", err=True)
