"""Making a calibration: score ordinary prompts on a model and keep their distribution.

Scoring a prompt set can take minutes on a real model, so it shows progress (tqdm and a log event) and,
through ``score_sets``, can resume: each finished batch is appended to a sidecar file (a header naming
the settings, then one row per prompt), and a rerun with the same settings rescores only the batches
that are not complete, with the same batch boundaries, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard.data import generic_captions, generic_captions_id
from guard.events import log_event
from guard.scoring import AdaptiveScorer, ModelProfile, Scorer

from .profile import CalibrationProfile, SampleSpread

__all__ = ["Features", "calibrate", "prompt_set_id", "score_sets", "spread_stages"]


@dataclass(frozen=True)
class Features:
    """Measured ``norm`` and ``cos`` per prompt of one prompt set, in order.

    With an adaptive scorer also every draw's values (``sample_norms``/``sample_coses``, one list per prompt),
    which the profile's ``spread`` (its adaptive bands) is measured from; ``norms``/``coses`` are their means.
    """

    norms: list[float]
    coses: list[float]
    sample_norms: list[list[float]] = field(default_factory=list)
    sample_coses: list[list[float]] = field(default_factory=list)

    def scores(self, profile: ModelProfile) -> list[float]:
        return [profile.combine(n, c) for n, c in zip(self.norms, self.coses)]

    def spread(self, profile: ModelProfile, stages: Sequence[int]) -> SampleSpread:
        """How far the first ``k`` draws' means lie from all draws', per stage ``k``, with ``profile``'s weights."""
        return SampleSpread.measure(self.sample_norms, self.sample_coses, profile.combine, stages)


def spread_stages(scorer: Scorer) -> tuple[int, ...]:
    """The stages an adaptive scorer can stop at before its last (where the band is 0)."""
    return tuple(k for k in getattr(scorer, "stages", ()) if k < scorer.samples)


def _measure(scorer: Scorer, prompts: list[str]) -> list[dict[str, Any]]:
    """One row per prompt: its mean ``norm``/``cos`` and, for an adaptive scorer, every draw's (all of them:
    the values near-threshold decisions reproduce, and their spread)."""
    if not isinstance(scorer, AdaptiveScorer):
        return [{"norm": r.norm, "cos": r.cos} for r in scorer.score(prompts)]
    import torch

    with torch.no_grad():
        norms, coses = scorer.sample_statistics(scorer.encode(prompts))
    return [{"norm": n, "cos": c, "norms": ns, "coses": cs} for n, c, ns, cs in zip(
        norms.mean(dim=1).tolist(), coses.mean(dim=1).tolist(), norms.tolist(), coses.tolist())]


def prompt_set_id(name: str, prompts: Sequence[str]) -> str:
    """A name for a prompt set that changes when its content does (``calib.txt-1a2b3c4d5e6f``)."""
    return f"{name}-{_digest(chr(10).join(prompts))[:12]}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _sidecar_settings(scorer: Scorer, sets: dict[str, list[str]]) -> dict[str, Any]:
    """Everything that changes a measured value: a sidecar made otherwise is not reused."""
    measurement = scorer.measurement()
    return {
        "fingerprint": measurement.fingerprint,
        "samples": measurement.samples,
        "sampling": measurement.sampling,
        "seed": measurement.seed,
        "steps": measurement.steps,
        "prediction_space": measurement.prediction_space,
        "batch_size": scorer.batch_size,
        "device": str(scorer.adapter.device),
        "dtype": str(scorer.adapter.dtype),
        "sets": {name: _digest("\n".join(prompts)) for name, prompts in sets.items()},
    }


def _read_sidecar(path: Path, settings: dict[str, Any]) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Rows of a sidecar made with ``settings``; empty (and the file removed) otherwise."""
    from guard.prompts_io import completed_rows

    rows = completed_rows(path)
    header = next(rows, None)
    if header is None or header.get("settings") != settings:
        path.unlink(missing_ok=True)
        return {}
    keep = ("norm", "cos", "norms", "coses")
    return {(r["set"], r["index"], r["prompt"]): {k: r[k] for k in keep if k in r} for r in rows}


def score_sets(
    scorer: Scorer, sets: dict[str, list[str]], sidecar: Path | None = None, *, progress: bool | None = None
) -> dict[str, Features]:
    """``norm``/``cos`` of every prompt of every set, batched; resumable through ``sidecar`` when given.

    ``progress``: ``None`` shows a bar on a terminal only, ``False`` never.
    """
    from tqdm import tqdm

    from guard.prompts_io import truncate_to_complete_rows

    done: dict[tuple[str, int, str], dict[str, Any]] = {}
    sink = None
    if sidecar is not None:
        settings = _sidecar_settings(scorer, sets)
        truncate_to_complete_rows(sidecar)
        done = _read_sidecar(sidecar, settings)
        fresh = not sidecar.exists()
        sink = sidecar.open("a", encoding="utf-8")
        if fresh:
            sink.write(json.dumps({"settings": settings}) + "\n")
            sink.flush()
    total = sum(len(p) for p in sets.values())
    size = scorer.batch_size
    results: dict[str, Features] = {}
    bar = tqdm(total=total, unit="prompt", desc="calibrate", disable=None if progress is None else not progress)
    try:
        with bar:
            for name, prompts in sets.items():
                measured: list[dict[str, Any]] = []
                for start in range(0, len(prompts), size):
                    chunk = prompts[start : start + size]
                    keys = [(name, start + i, p) for i, p in enumerate(chunk)]
                    if all(k in done for k in keys):
                        measured.extend(done[k] for k in keys)
                    else:
                        scored = _measure(scorer, chunk)
                        if sink is not None:
                            sink.write("".join(
                                json.dumps({"set": k[0], "index": k[1], "prompt": k[2], **row}, ensure_ascii=False)
                                + "\n" for k, row in zip(keys, scored)
                            ))
                            sink.flush()
                        measured.extend(scored)
                    bar.update(len(chunk))
                results[name] = Features(
                    [m["norm"] for m in measured], [m["cos"] for m in measured],
                    [m["norms"] for m in measured if "norms" in m], [m["coses"] for m in measured if "coses" in m],
                )
    finally:
        if sink is not None:
            sink.close()
    return results


def calibrate(
    scorer: Scorer,
    prompts: Sequence[str] | None = None,
    *,
    source: str | None = None,
    progress: bool | None = None,
) -> CalibrationProfile:
    """Score ``prompts`` (default: memguard's built-in generic captions) and build a calibration profile.

    With an ``AdaptiveScorer`` every prompt gets every draw: the profile holds the ``max_samples`` values (what an
    adaptive decision reproduces near a threshold, so relative thresholds are read off them) and their spread.

    ``source`` names the prompt set in the profile (default: the generic captions' id, else ``custom``).
    """
    if prompts is None:
        prompts, source = generic_captions(), source or generic_captions_id()
    prompts = list(prompts)
    measurement = scorer.measurement()
    log_event("calibration_started", prompts=len(prompts), model=measurement.model_class,
              fingerprint=measurement.fingerprint, source=source or "custom")
    features = score_sets(scorer, {"nmem": prompts}, progress=progress)["nmem"]
    stages = spread_stages(scorer)
    profile = CalibrationProfile.from_measurement(
        measurement, features.scores(scorer.profile), norms=features.norms, coses=features.coses,
        source=source or "custom", spread=features.spread(scorer.profile, stages) if stages else None,
    )
    log_event("calibration_finished", calibration=profile.id, prompts=profile.n_prompts)
    return profile
