"""``memguard demo``: the guard on memguard's own memorizing model, in well under a minute on a CPU."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from ..assets import SHIPPED_MODEL, shipped_calibration_path


@click.command()
@click.option("--model", "model_path", default=None, help="Diffusers pipeline directory (default: the shipped model).")
@click.option("--policy", default="balanced", show_default=True, help="Shipped policy name or a policy file.")
@click.option("--audit", "audit_path", default=None, type=click.Path(dir_okay=False),
              help="Audit log to write (default: a temporary file).")
@click.option("--device", default="cpu", show_default=True)
def demo(model_path: str | None, policy: str, audit_path: str | None, device: str) -> None:
    """Score memorized and unseen prompts on the shipped memorizing model and show what a policy decides.

    The shipped model is a small text-to-image latent diffusion model trained on purpose to
    memorize some captions (benchmarks/memorizer). Its thresholds come from its own calibration,
    not from Stable Diffusion's.
    """
    from ..audit import verify_log
    from ..guard import Guard
    from ..loading import load_pipeline

    model = Path(model_path) if model_path else SHIPPED_MODEL
    pipe = load_pipeline(model, device=device, dtype="float32")
    prompts = _demo_prompts(model)
    calibration = shipped_calibration_path(model)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(audit_path) if audit_path else Path(tmp) / "demo-audit.jsonl"
        with Guard(pipe, policy, audit_path=log, calibration=calibration, source="cli") as guard:
            decisions = guard.check_many([prompt for prompt, _ in prompts])
        click.echo(f"model: {model}\npolicy: {guard.policy.name} v{guard.policy.version}"
                   + (f", calibration {decisions[0].calibration_id}" if decisions[0].calibration_id else "") + "\n")
        click.echo(_table(prompts, decisions))
        report = verify_log(log)
        click.echo(f"\naudit log: {log if audit_path else '(temporary)'}: {report}")


def _demo_prompts(model: Path) -> list[tuple[str, str]]:
    path = model / "demo_prompts.json"
    if not path.exists():
        raise click.ClickException(f"{model} has no demo_prompts.json; pass prompts with `memguard scan` instead")
    data = json.loads(path.read_text(encoding="utf-8"))
    copies = data.get("copies") or [None] * len(data["memorized"])
    trained = [(p, f"trained {n}x" if n else "memorized") for p, n in zip(data["memorized"], copies)]
    return trained + [(p, "unseen") for p in data["unseen"]]


def _table(prompts: list[tuple[str, str]], decisions: list) -> str:
    rows = [("prompt", "kind", "norm", "cos", "score", "action", "rule")]
    for (prompt, kind), decision in zip(prompts, decisions):
        score = decision.score
        numbers = (f"{score.norm:.3f}", f"{score.cos:+.3f}", f"{score.score:.3f}") if score else ("-", "-", "-")
        rows.append((_clip(prompt, 48), kind, *numbers, decision.action, decision.rule))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
