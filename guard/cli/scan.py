"""``memguard scan``: score every prompt of a file against a model."""

from __future__ import annotations

import json

import click

from ..loading import load_pipeline
from ..prompts_io import read_prompts, truncate_to_complete_rows


@click.command()
@click.option("--model", "model_path", required=True, help="Diffusers pipeline directory (or hub id).")
@click.option("--prompts", "prompts_path", required=True, type=click.Path(dir_okay=False),
              help="Text file, one prompt per line; blank lines are skipped.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Output JSONL file.")
@click.option("--samples", default=1, show_default=True, type=click.IntRange(1), help="Noise draws per prompt.")
@click.option("--seed", default=51, show_default=True, type=int, help="Seed of the detection noise.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Prompts per UNet call.")
@click.option("--device", default=None, help="torch device (default: cuda, mps or cpu, whichever exists).")
@click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Model dtype (default: float16 on CUDA, float32 elsewhere).")
@click.option("--profile", default=None, help="Score weights by profile name (default: the model family's).")
@click.option("--resume/--no-resume", default=False, show_default=True,
              help="Continue an interrupted scan: keep OUT's complete rows and score the rest.")
def scan(model_path, prompts_path, out_path, samples, seed, batch_size, device, dtype, profile, resume) -> None:
    """Score each non-blank line of PROMPTS and write one JSON object per prompt, in input order."""
    from tqdm import tqdm

    from ..scoring import Scorer

    prompts = read_prompts(prompts_path)
    done = truncate_to_complete_rows(out_path) if resume else 0
    if done > len(prompts):
        raise click.ClickException(f"{out_path} has {done} rows but {prompts_path} only {len(prompts)} prompts")
    scorer = Scorer(load_pipeline(model_path, device=device, dtype=dtype), samples=samples, seed=seed,
                    batch_size=batch_size, profile=profile)
    with open(out_path, "a" if resume else "w", encoding="utf-8") as out, tqdm(
        total=len(prompts), initial=done, unit="prompt", desc="scan", disable=None
    ) as progress:
        for start in range(done, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            for offset, result in enumerate(scorer.score(chunk)):
                row = {"index": start + offset, **result.to_dict()}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            progress.update(len(chunk))
    click.echo(f"scored {len(prompts) - done} prompts -> {out_path}", err=True)
