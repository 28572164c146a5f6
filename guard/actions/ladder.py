"""The rewrite ladder: mitigation methods tried cheapest first, each generation verified before release.

For every prompt whose decision is ``rewrite``: its probes are generated once (``verification``); then at
each level of its ladder the rung's input is prepared (a guidance schedule, an adapted prompt embedding, an
optimised initial noise, or all three), the front end generates the call, and the prompt's images are
verified. A prompt whose images pass keeps that rung's input and is done; one that passes no rung takes its
rule's ``fallback``. Rungs of different prompts of one call share each generation, so other prompts' images
come out exactly as the call would have made them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..calibration import CalibrationError
from ..policy import Decision, GuidanceStage, Policy, RewriteSettings, Rung, VerifySettings, decide_on_error
from ..scoring import Scorer, TextConditioning
from .mitigation import MitigationResult, mitigate_initial_noise, mitigate_prompt_embedding, noise_seed
from .verification import Generate, GenerationRequest, GenerationResult, probe_similarity, run_probes

__all__ = ["LadderResult", "LadderState", "RungResult", "run_ladder"]


@dataclass
class RungResult:
    """One rung for one prompt: whether it ran, what the optimisation did, and what verification measured."""

    rung: Rung
    ran: bool
    verified: bool = False
    similarity: list[float] = field(default_factory=list)
    mitigations: list[MitigationResult] = field(default_factory=list)
    note: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rung": self.rung,
            "ran": self.ran,
            "verified": self.verified,
            "similarity": [round(v, 6) for v in self.similarity],
            "mitigations": [m.to_dict() for m in self.mitigations],
            "note": self.note,
            "seconds": round(self.seconds, 4),
        }


@dataclass
class LadderResult:
    """What the rewrite of one prompt did: the rungs that ran, the verification signal, threshold and verdict.

    ``verified`` is True only when the released images were checked and passed; ``released`` names the
    rung whose input they came from. ``probe_agreement`` (the lowest cosine between the prompt's probes)
    near 1 says the model draws one fixed image for the original prompt.
    """

    rungs: list[RungResult] = field(default_factory=list)
    signal: str | None = None
    threshold: float | None = None
    above_fpr: float | None = None
    probe_agreement: float | None = None
    verified: bool = False
    released: Rung | None = None
    note: str | None = None
    seconds: float = 0.0

    @property
    def met(self) -> bool:
        """The rewrite succeeded: verified, or (with verification off) the score target was met."""
        return self.released is not None

    @property
    def method(self) -> str | None:
        return self.released

    @property
    def steps(self) -> int:
        """Optimisation steps spent over every rung that ran (guidance rungs spend none)."""
        return sum(m.steps for rung in self.rungs for m in rung.mitigations)

    def describe(self) -> str:
        tried = ", ".join(f"{r.rung}{'' if r.ran else ' (n/a)'}" for r in self.rungs) or "none"
        if self.verified:
            value = max(next(r for r in self.rungs if r.rung == self.released).similarity, default=float("nan"))
            return (f"rewritten by {self.released}, verified ({self.signal} {value:.4f} <= {self.threshold:.4f}); "
                    f"rungs: {tried}")
        if self.released is not None:
            return f"rewritten by {self.released}, unverified (verification off); rungs: {tried}"
        return f"no rung passed verification; rungs: {tried}" + (f" ({self.note})" if self.note else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "rungs": [r.to_dict() for r in self.rungs],
            "signal": self.signal,
            "threshold": _finite(self.threshold),
            "above_fpr": self.above_fpr,
            "probe_agreement": _finite(self.probe_agreement),
            "verified": self.verified,
            "released": self.released,
            "note": self.note,
            "seconds": round(self.seconds, 4),
        }


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


@dataclass
class LadderState:
    """The call's inputs after the ladder, and the last generation if it was made from exactly these."""

    cond: TextConditioning
    latents: torch.Tensor | None
    guidance: dict[int, tuple[GuidanceStage, ...]]
    last: GenerationResult | None
    probes: dict[int, torch.Tensor] = field(default_factory=dict)
    thresholds: dict[int, float] = field(default_factory=dict)

    def still_verified(self, result: GenerationResult, rows: Sequence[int], per: int) -> list[int]:
        """Of the verified prompts among ``rows`` (positions in this state) generated as ``result`` (in that
        order), those whose images no longer pass: a release made again is checked again."""
        failed = []
        for position, k in enumerate(rows):
            if k in self.probes and k in self.thresholds:
                values = probe_similarity(result.latents[_rows(position, per)], self.probes[k])
                if float(values.max()) > self.thresholds[k]:
                    failed.append(k)
        return failed


def _rows(k: int, per: int) -> list[int]:
    return list(range(k * per, (k + 1) * per))


def run_ladder(
    scorer: Scorer,
    policy: Policy,
    decisions: list[Decision],
    cond: TextConditioning,
    latents: torch.Tensor | None,
    *,
    images_per_prompt: int,
    generate: Generate | None,
    threshold: Callable[[VerifySettings], float],
    seed: int,
    guidance_available: str | None,
    results: dict[int, LadderResult],
) -> tuple[list[Decision], LadderState]:
    """Rewrite every ``rewrite`` decision of a call by its ladder (``decisions`` in the call's row order).

    ``latents`` are the call's own unpacked initial noises (``images_per_prompt`` per prompt). ``threshold``
    gives the verification threshold for a rule's settings (it may raise ``CalibrationError``);
    ``guidance_available`` says why the guidance schedule cannot run on this call (None when it can).
    ``generate`` is None where the front end cannot generate (a conditioning node): then nothing can be
    verified, so only unverified rules (``verify: null``) rewrite, by their prompt-embedding rung.
    ``results`` receives each rewritten prompt's ``LadderResult`` under its prompt index. Returns the updated
    decisions and the inputs to release from.
    """
    per = images_per_prompt
    decisions = list(decisions)
    state = LadderState(cond.clone(), None if latents is None else latents.clone(), {}, None)
    pending: dict[int, RewriteSettings] = {}
    thresholds: dict[int, float | None] = {}
    for k, decision in enumerate(decisions):
        if decision.action != "rewrite":
            continue
        settings = decision.rewrite or RewriteSettings()
        if generate is None and settings.verify is not None:
            results[decision.prompt_index] = LadderResult(note="this front end cannot generate, so no rewrite can "
                                                               "be verified here")
            decisions[k] = _fallback(decision, settings, results[decision.prompt_index])
            continue
        if decision.rewrite_target is None or not math.isfinite(decision.rewrite_target):
            decisions[k] = decide_on_error(policy, decision.prompt_index, "rewrite has no usable score target",
                                           score=decision.score)
            continue
        try:
            thresholds[k] = threshold(settings.verify) if settings.verify is not None else None
        except CalibrationError as error:
            decisions[k] = decide_on_error(policy, decision.prompt_index, f"rewrite cannot be verified: {error}",
                                           score=decision.score)
            continue
        pending[k] = settings
        results[decision.prompt_index] = LadderResult(
            signal=None if settings.verify is None else settings.verify.signal, threshold=thresholds[k],
            above_fpr=None if settings.verify is None else settings.verify.above_fpr,
        )
    if not pending:
        return decisions, state
    started = time.perf_counter()
    probes = _probes(generate, cond, latents, pending, seed, results, decisions) if generate is not None else {}
    state.probes = probes

    def reset(k: int) -> None:
        _restore(state, cond, latents, k, per)

    depth = max(len(settings.rungs) for settings in pending.values())
    for level in range(depth):
        generated: dict[int, RungResult] = {}
        for k, settings in list(pending.items()):
            if level >= len(settings.rungs):
                continue
            rung = settings.rungs[level]
            ladder = results[decisions[k].prompt_index]
            rung_started = time.perf_counter()
            outcome = _prepare(rung, k, settings, decisions[k], scorer, cond, latents, state, per,
                               guidance_available)
            outcome.seconds = time.perf_counter() - rung_started
            ladder.rungs.append(outcome)
            if not outcome.ran:
                continue
            if settings.verify is None and not all(m.met for m in outcome.mitigations):
                reset(k)  # nothing to verify with: only a met score target releases
                continue
            generated[k] = outcome
        if not generated:
            continue
        if generate is None:  # unverified rules only (see above): the met target releases
            for k, outcome in generated.items():
                results[decisions[k].prompt_index].released = outcome.rung
                del pending[k]
            continue
        generation_started = time.perf_counter()
        result = generate(GenerationRequest(cond=state.cond, latents=state.latents, images_per_prompt=per,
                                            guidance=dict(state.guidance)))
        state.last = result
        share = (time.perf_counter() - generation_started) / len(generated)
        for k, outcome in generated.items():
            outcome.seconds += share
            settings = pending[k]
            ladder = results[decisions[k].prompt_index]
            if settings.verify is None:
                ladder.released = outcome.rung
                del pending[k]
                continue
            values = probe_similarity(result.latents[_rows(k, per)], probes[k]).tolist()
            outcome.similarity = values
            outcome.verified = max(values) <= thresholds[k]
            if outcome.verified:
                ladder.verified, ladder.released = True, outcome.rung
                state.thresholds[k] = thresholds[k]
                del pending[k]
            else:
                reset(k)
                state.last = None  # the inputs changed since that generation
    for k, settings in pending.items():
        decisions[k] = _fallback(decisions[k], settings, results[decisions[k].prompt_index])
    elapsed = time.perf_counter() - started
    for k in results:
        results[k].seconds = elapsed
    return decisions, state


def _probes(
    generate: Generate,
    cond: TextConditioning,
    latents: torch.Tensor,
    pending: Mapping[int, RewriteSettings],
    seed: int,
    results: dict[int, LadderResult],
    decisions: Sequence[Decision],
) -> dict[int, torch.Tensor]:
    """Each verified prompt's probe latents ``[probes, C, h, w]``, one probe call per distinct verify setting."""
    groups: dict[VerifySettings, list[int]] = {}
    for k, settings in pending.items():
        if settings.verify is not None:
            groups.setdefault(settings.verify, []).append(k)
    probes: dict[int, torch.Tensor] = {}
    for verify, members in groups.items():
        found = run_probes(generate, cond.select(members), latents.shape[1:], verify, seed, rows=members)
        for k, prompt_probes in zip(members, found):
            probes[k] = prompt_probes
            if verify.probes > 1:
                flat = torch.nn.functional.normalize(prompt_probes.flatten(1), dim=1)
                similarity = flat @ flat.T
                off_diagonal = similarity[~torch.eye(len(flat), dtype=torch.bool)]
                results[decisions[k].prompt_index].probe_agreement = float(off_diagonal.min())
    return probes


def _restore(state: LadderState, cond: TextConditioning, latents: torch.Tensor | None, k: int, per: int) -> None:
    """Prompt ``k``'s original inputs back into ``state``."""
    state.cond.embeds[k] = cond.embeds[k]
    if state.cond.pooled is not None:
        state.cond.pooled[k] = cond.pooled[k]
    rows = _rows(k, per)
    if latents is not None:
        state.latents[rows] = latents[rows]
    for row in rows:
        state.guidance.pop(row, None)


def _prepare(
    rung: Rung,
    k: int,
    settings: RewriteSettings,
    decision: Decision,
    scorer: Scorer,
    cond: TextConditioning,
    latents: torch.Tensor | None,
    state: LadderState,
    per: int,
    guidance_available: str | None,
) -> RungResult:
    """Set prompt ``k``'s inputs in ``state`` for ``rung`` (starting from its original inputs)."""
    rows = _rows(k, per)
    _restore(state, cond, latents, k, per)
    if latents is None and rung in ("initial_noise", "combined"):
        return RungResult(rung=rung, ran=False, note="needs the generation's initial noise, which this front end "
                                                     "does not have")
    if rung == "guidance_schedule" and settings.verify is None:
        return RungResult(rung=rung, ran=False, note="without verification nothing can tell whether a guidance "
                                                     "schedule worked (it has no score target)")
    uses_guidance = rung in ("guidance_schedule", "combined")
    if uses_guidance and guidance_available is not None:
        if rung == "guidance_schedule":
            return RungResult(rung=rung, ran=False, note=guidance_available)
        uses_guidance = False
    outcome = RungResult(rung=rung, ran=True)
    target = float(decision.rewrite_target)
    row = cond.select([k])
    try:
        if rung in ("prompt_embedding", "combined"):
            adapted = mitigate_prompt_embedding(scorer, row, target=target, max_steps=settings.max_steps,
                                                lr=settings.lr, proximity=settings.proximity)
            outcome.mitigations.append(adapted)
            row = adapted.cond
            state.cond.embeds[k] = row.embeds[0].to(state.cond.embeds.device, state.cond.embeds.dtype)
            if state.cond.pooled is not None and row.pooled is not None:
                state.cond.pooled[k] = row.pooled[0].to(state.cond.pooled.device, state.cond.pooled.dtype)
        if rung in ("initial_noise", "combined"):
            own = latents[rows]
            moved = mitigate_initial_noise(scorer, row, own, target=target, max_steps=settings.max_steps,
                                           lr=settings.lr, seed=noise_seed(own))
            outcome.mitigations.append(moved)
            state.latents[rows] = moved.latents.to(state.latents.device, state.latents.dtype)
    except Exception as error:  # a failed optimisation is a failed rung, not a crash of the call
        outcome.ran, outcome.note = False, f"{type(error).__name__}: {error}"
        return outcome
    if uses_guidance:
        for image in rows:
            state.guidance[image] = settings.guidance
    if rung == "combined" and guidance_available is not None:
        outcome.note = f"without the guidance schedule: {guidance_available}"
    return outcome


def _fallback(decision: Decision, settings: RewriteSettings, ladder: LadderResult) -> Decision:
    reason = f"{decision.reason}; rewrite: {ladder.describe()}; fallback: {settings.fallback}"
    return decision.model_copy(update={"action": settings.fallback, "reason": reason})
