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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guard.data import generic_captions, generic_captions_id
from guard.events import log_event
from guard.scoring import ModelProfile, Scorer

from .profile import CalibrationProfile

__all__ = ["Features", "calibrate", "prompt_set_id", "score_sets"]


@dataclass(frozen=True)
class Features:
    """Measured ``norm`` and ``cos`` per prompt of one prompt set, in order."""

    norms: list[float]
    coses: list[float]

    def scores(self, profile: ModelProfile) -> list[float]:
        return [profile.combine(n, c) for n, c in zip(self.norms, self.coses)]


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
        "seed": measurement.seed,
        "steps": measurement.steps,
        "prediction_space": measurement.prediction_space,
        "batch_size": scorer.batch_size,
        "device": str(scorer.adapter.device),
        "dtype": str(scorer.adapter.dtype),
        "sets": {name: _digest("\n".join(prompts)) for name, prompts in sets.items()},
    }


def _read_sidecar(path: Path, settings: dict[str, Any]) -> dict[tuple[str, int, str], tuple[float, float]]:
    """Rows of a sidecar made with ``settings``; empty (and the file removed) otherwise."""
    from guard.prompts_io import completed_rows

    rows = completed_rows(path)
    header = next(rows, None)
    if header is None or header.get("settings") != settings:
        path.unlink(missing_ok=True)
        return {}
    return {(r["set"], r["index"], r["prompt"]): (r["norm"], r["cos"]) for r in rows}


def score_sets(
    scorer: Scorer, sets: dict[str, list[str]], sidecar: Path | None = None, *, progress: bool | None = None
) -> dict[str, Features]:
    """``norm``/``cos`` of every prompt of every set, batched; resumable through ``sidecar`` when given.

    ``progress``: ``None`` shows a bar on a terminal only, ``False`` never.
    """
    from tqdm import tqdm

    from guard.prompts_io import truncate_to_complete_rows

    done: dict[tuple[str, int, str], tuple[float, float]] = {}
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
                measured: list[tuple[float, float]] = []
                for start in range(0, len(prompts), size):
                    chunk = prompts[start : start + size]
                    keys = [(name, start + i, p) for i, p in enumerate(chunk)]
                    if all(k in done for k in keys):
                        measured.extend(done[k] for k in keys)
                    else:
                        scored = [(r.norm, r.cos) for r in scorer.score(chunk)]
                        if sink is not None:
                            sink.write("".join(
                                json.dumps({"set": k[0], "index": k[1], "prompt": k[2], "norm": n, "cos": c},
                                           ensure_ascii=False) + "\n"
                                for k, (n, c) in zip(keys, scored)
                            ))
                            sink.flush()
                        measured.extend(scored)
                    bar.update(len(chunk))
                results[name] = Features([m[0] for m in measured], [m[1] for m in measured])
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

    ``source`` names the prompt set in the profile (default: the generic captions' id, else ``custom``).
    """
    if prompts is None:
        prompts, source = generic_captions(), source or generic_captions_id()
    prompts = list(prompts)
    measurement = scorer.measurement()
    log_event("calibration_started", prompts=len(prompts), model=measurement.model_class,
              fingerprint=measurement.fingerprint, source=source or "custom")
    features = score_sets(scorer, {"nmem": prompts}, progress=progress)["nmem"]
    profile = CalibrationProfile.from_measurement(
        measurement, features.scores(scorer.profile), norms=features.norms, coses=features.coses,
        source=source or "custom",
    )
    log_event("calibration_finished", calibration=profile.id, prompts=profile.n_prompts)
    return profile
