"""``memguard explain``: which words of a prompt drive its memorization score on a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..scoring import Explanation
from .options import policy_scoring_option, scorer_from_options

__all__ = ["explain", "render_png"]


@click.command()
@click.option("--model", "model_path", required=True, help="Diffusers pipeline directory (or hub id).")
@click.argument("prompt")
@click.option("--method", type=click.Choice(["occlusion", "gradient"]), default=None,
              help="occlusion: delete each word, re-encode, re-score; gradient: gradient x input on the text "
                   "embeddings [default: the policy's explain.method, else occlusion].")
@policy_scoring_option
@click.option("--device", default=None, help="torch device (default: cuda, mps or cpu, whichever exists).")
@click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Model dtype (default: float16 on CUDA, float32 elsewhere).")
@click.option("--top", default=5, show_default=True, type=click.IntRange(1), help="Words to list, highest first.")
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON (with the words).")
@click.option("--png", "png_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also render the prompt with its words highlighted by weight as a PNG.")
def explain(model_path, prompt, method, device, dtype, top, as_json, png_path, **scoring) -> None:
    """Attribute PROMPT's memorization score on MODEL to its words.

    Scored as a guard with the same scoring settings (--policy, or the options) would score it, on all its
    noise draws. A positive weight means the word raises the score.
    """
    from ..loading import load_pipeline
    from ..policy import load_policy
    from ..scoring import explain_prompt

    if method is None:
        method = load_policy(scoring["scoring_policy"]).explain.method if scoring.get("scoring_policy") else "occlusion"
    scorer = scorer_from_options(load_pipeline(model_path, device=device, dtype=dtype), scoring)
    explanation = explain_prompt(scorer, prompt, method=method)
    if as_json:
        click.echo(json.dumps(explanation.to_dict(with_words=True), indent=1))
    else:
        click.echo(f"score {explanation.score:.4f} ({explanation.samples} draw(s)), {method}, "
                   f"{explanation.seconds:.2f} s")
        peak = max((abs(w.weight) for w in explanation.words), default=0.0) or 1.0
        for word in explanation.top(top):
            bar = "#" * max(0, round(20 * word.weight / peak))
            click.echo(f"  {word.weight:+9.4f}  {word.word:<20} {bar}")
        if method == "gradient":
            click.echo(f"  {explanation.rest:+9.4f}  (start, end and padding tokens)")
    if png_path is not None:
        render_png(explanation, prompt, png_path)
        click.echo(f"png -> {png_path}", err=True)


def render_png(explanation: Explanation, prompt: str, path: str | Path, *, width: int = 900,
               title: str | None = None) -> Path:
    """The prompt with each word on a background whose strength is its weight (red raises the score, blue lowers
    it), the weight printed under it; a title line says what was explained. Pillow only (a diffusers dependency)."""
    from PIL import Image, ImageDraw, ImageFont

    def font(size: int) -> Any:
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: a fixed bitmap font
            return ImageFont.load_default()

    big, small = font(26), font(14)
    peak = max((abs(w.weight) for w in explanation.words), default=0.0) or 1.0
    weights = {w.index: w.weight for w in explanation.words}
    pieces: list[tuple[str, float | None]] = []
    at = 0
    for w in explanation.words:
        if prompt[at : w.start].strip():
            pieces.append((prompt[at : w.start].strip(), None))
        pieces.append((prompt[w.start : w.end], weights[w.index]))
        at = w.end
    if prompt[at:].strip():
        pieces.append((prompt[at:].strip(), None))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin, gap, line_height = 24, 10, 62
    lines: list[list[tuple[str, float | None, int]]] = [[]]
    x = margin
    for text, weight in pieces:
        w = int(probe.textlength(text, font=big)) + 12
        if weight is not None:  # room for the weight printed under the word
            w = max(w, int(probe.textlength(f"{weight:+.3f}", font=small)) + 8)
        if lines[-1] and x + w > width - margin:
            lines.append([])
            x = margin
        lines[-1].append((text, weight, w))
        x += w + gap
    height = 2 * margin + 34 + line_height * len(lines) + 26
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    heading = title or (f"{explanation.method} attribution of score {explanation.score:.3f} "
                        f"({explanation.samples} draw(s))")
    draw.text((margin, margin), heading, fill=(60, 60, 60), font=small)
    y = margin + 34
    for line in lines:
        x = margin
        for text, weight, w in line:
            if weight is not None:
                share = max(-1.0, min(1.0, weight / peak))
                base = (200, 67, 60) if share >= 0 else (74, 127, 193)
                fill = tuple(round(255 - abs(share) * (255 - c)) for c in base)
                draw.rounded_rectangle((x, y, x + w, y + 36), radius=5, fill=fill)
                draw.text((x + w / 2, y + 50), f"{weight:+.3f}", fill=(90, 90, 90), font=small, anchor="mm")
            draw.text((x + 6, y + 18), text, fill=(20, 20, 20), font=big, anchor="lm")
            x += w + gap
        y += line_height
    draw.text((margin, height - margin - 6), "red: the word raises the score; blue: it lowers it; "
              "number: score change it carries", fill=(110, 110, 110), font=small)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target)
    return target
