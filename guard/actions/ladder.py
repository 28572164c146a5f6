"""The rewrite ladder: mitigation methods tried cheapest first, each generation verified before release.

For every prompt whose decision is ``rewrite``: its probes are generated once (``verification``); then at
each level of its ladder the rung's input is prepared (a guidance schedule, the prompt without the words
that carry its score, an adapted prompt embedding, an optimised initial noise, or the last two with the
schedule), the front end generates the call, and the prompt's images are verified. A prompt whose images
pass keeps that rung's input and is done; one that passes no rung takes its rule's ``fallback``. Rungs of
different prompts of one call share each generation, so other prompts' images come out exactly as the call
would have made them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..calibration import CalibrationError
from ..policy import (
    Decision,
    GuidanceStage,
    Policy,
    RewriteResult,
    RewriteSettings,
    Rung,
    RungResult,
    VerifySettings,
    decide_on_error,
)
from ..scoring import Scorer, TextConditioning, explain_prompt, prompt_words
from .generation import GenerationJob, GenerationResult, Generator
from .mitigation import NOISE_CANDIDATES, mitigate_initial_noise, mitigate_prompt_embedding, noise_seed
from .trigger_words import TriggerRewrite, rewrite_triggers, word_indices
from .verification import probe_similarity, run_probes

__all__ = ["LadderResult", "LadderState", "RungResult", "run_ladder"]

#: Probes of one prompt from different noises this alike (lowest cosine) mean the model draws one image whatever
#: the noise: the ``initial_noise`` rung cannot free it and is skipped (on the zoo it freed no strong memorizer).
FIXED_IMAGE_AGREEMENT = 0.9

#: The ladder's result for one prompt is the policy package's typed ``RewriteResult``.
LadderResult = RewriteResult


@dataclass
class LadderState:
    """The call's inputs after the ladder, and the last generation if it was made from exactly these.

    Rows are positions in the conditioning the ladder got; ``prompts`` names the caller's prompt behind each.
    ``original_cond`` and ``original_latents`` are the inputs before any rung (``restore`` puts a row's back).
    """

    cond: TextConditioning
    latents: torch.Tensor | None
    guidance: dict[int, tuple[GuidanceStage, ...]]
    last: GenerationResult | None
    probes: dict[int, torch.Tensor] = field(default_factory=dict)
    thresholds: dict[int, float] = field(default_factory=dict)
    prompts: list[int] = field(default_factory=list)
    original_cond: TextConditioning | None = None
    original_latents: torch.Tensor | None = None
    images_per_prompt: int = 1

    def restore(self, k: int) -> None:
        """Row ``k``'s original inputs back (after a rewrite that cannot be released)."""
        _restore(self, self.original_cond, self.original_latents, k, self.images_per_prompt)
        self.last = None

    def still_verified(self, result: GenerationResult, prompts: Sequence[int], per: int) -> list[int]:
        """Of the verified ``prompts`` (the caller's indices, generated as ``result`` in that order), those whose
        images no longer pass: a release made again is checked again."""
        failed = []
        for position, index in enumerate(prompts):
            k = self.prompts.index(index)
            if k in self.probes and k in self.thresholds:
                values = probe_similarity(result.latents[_rows(position, per)], self.probes[k])
                if float(values.max()) > self.thresholds[k]:
                    failed.append(index)
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
    generate: Generator | None,
    prompts: Sequence[int],
    threshold: Callable[[VerifySettings], float],
    seed: int,
    results: dict[int, RewriteResult],
    texts: Sequence[str | None] | None = None,
    encode_options: Mapping[str, Any] | None = None,
) -> tuple[list[Decision], LadderState]:
    """Rewrite every ``rewrite`` decision of a call by its ladder (``decisions`` in the call's row order).

    ``cond`` and ``latents`` (the call's own unpacked initial noises, ``images_per_prompt`` per prompt) hold the
    rows the call generates; ``prompts`` names the caller's prompt behind each row. ``threshold`` gives the
    verification threshold for a rule's settings (it may raise ``CalibrationError``). ``generate`` is None where
    the front end cannot generate (a conditioning node): then nothing can be verified, so only unverified rules
    (``verify: null``) rewrite, by their prompt-embedding rung. ``results`` receives each rewritten prompt's
    ``RewriteResult`` under its prompt index. ``texts`` (per row; None where only embeddings are known) and the
    call's ``encode_options`` are what the ``token`` rung edits and re-encodes. Returns the updated decisions and
    the inputs to release from.

    Exceptions of the front end's generation propagate: the core turns them into the rules' fallbacks.
    """
    per = images_per_prompt
    decisions = list(decisions)
    state = LadderState(cond.clone(), None if latents is None else latents.clone(), {}, None, prompts=list(prompts),
                        original_cond=cond, original_latents=latents, images_per_prompt=per)
    guidance_available = generate.guidance_unavailable if generate is not None else None
    pending: dict[int, RewriteSettings] = {}
    thresholds: dict[int, float | None] = {}
    for k, decision in enumerate(decisions):
        if decision.action != "rewrite":
            continue
        settings = decision.rewrite or RewriteSettings()
        if generate is None and settings.verify is not None:
            results[decision.prompt_index] = RewriteResult(note="this front end cannot generate, so no rewrite can "
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
        except Exception as error:  # measuring the verification calibration failed: no verdict can be trusted
            decisions[k] = decide_on_error(policy, decision.prompt_index, "rewrite cannot be verified: the "
                                           f"verification calibration failed: {type(error).__name__}: {error}",
                                           score=decision.score)
            continue
        pending[k] = settings
        results[decision.prompt_index] = RewriteResult(
            signal=None if settings.verify is None else settings.verify.signal, threshold=thresholds[k],
            above_fpr=None if settings.verify is None else settings.verify.above_fpr,
        )
    if not pending:
        return decisions, state
    started = time.perf_counter()
    probes = _probes(generate, cond, pending, seed, results, decisions, prompts) if generate is not None else {}
    state.probes = probes

    def reset(k: int) -> None:
        _restore(state, cond, latents, k, per)

    steps = generate.steps if generate is not None else 50  # what a generation of this call is
    position = dict.fromkeys(pending, 0)  # each prompt's next rung
    deeper: dict[int, TriggerRewrite] = {}  # a token edit that failed verification, to go one word deeper from
    while any(position[k] < len(settings.rungs) for k, settings in pending.items()):
        generated: dict[int, RungResult] = {}
        for k, settings in list(pending.items()):
            if position[k] >= len(settings.rungs):
                continue
            rung = settings.rungs[position[k]]
            position[k] += 1
            ladder = results[decisions[k].prompt_index]
            rung_started = time.perf_counter()
            budget = settings.max_generations
            left = None if budget is None else budget - ladder.generations - per  # after the rung's generation
            if left is not None and left < 0:
                ladder.rungs.append(RungResult(rung=rung, ran=False, note=(
                    f"skipped: {ladder.generations:.2f} of the rewrite's {budget:g} generations spent")))
                continue
            if rung == "initial_noise" and (ladder.probe_agreement or 0.0) >= FIXED_IMAGE_AGREEMENT:
                ladder.rungs.append(RungResult(rung=rung, ran=False, note=(
                    f"skipped: the prompt's probes from different noises agree at {ladder.probe_agreement:.3f} "
                    f">= {FIXED_IMAGE_AGREEMENT}, so another initial noise cannot move its image")))
                continue
            previous = deeper.pop(k, None)
            reset(k)  # every rung starts from the prompt's original inputs
            if rung == "token":
                text = texts[k] if texts is not None and k < len(texts) else None
                outcome, met, edit = _prepare_token(k, settings, decisions[k], scorer, state, text,
                                                    dict(encode_options or {}), steps, previous)
            else:
                outcome, met = _prepare(rung, k, settings, decisions[k], scorer, cond, latents, state, per,
                                        guidance_available, steps, left)
                edit = None
            outcome.seconds = time.perf_counter() - rung_started
            ladder.rungs.append(outcome)
            ladder.generations += outcome.generations  # what preparing it cost (optimisation or scoring passes)
            if edit is not None and not edit.exhausted:
                deeper[k] = edit
            if not outcome.ran:
                reset(k)  # whatever a failed preparation left behind
                continue
            if settings.verify is None and not met:
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
        result = generate(GenerationJob(cond=state.cond, latents=state.latents, images_per_prompt=per,
                                        prompts=list(prompts), guidance=dict(state.guidance), kind="release"))
        state.last = result
        share = (time.perf_counter() - generation_started) / len(generated)
        for k, outcome in generated.items():
            outcome.seconds += share
            outcome.generations += per
            results[decisions[k].prompt_index].generations += per
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
                if outcome.rung == "token" and k in deeper:
                    position[k] -= 1  # the same rung again, one word deeper
    for k, settings in pending.items():
        decisions[k] = _fallback(decisions[k], settings, results[decisions[k].prompt_index])
    elapsed = time.perf_counter() - started
    for k in results:
        results[k].seconds = elapsed
    return decisions, state


def _probes(
    generate: Generator,
    cond: TextConditioning,
    pending: Mapping[int, RewriteSettings],
    seed: int,
    results: dict[int, RewriteResult],
    decisions: Sequence[Decision],
    prompts: Sequence[int],
) -> dict[int, torch.Tensor]:
    """Each verified prompt's probe latents ``[probes, C, h, w]``, one probe call per distinct verify setting."""
    groups: dict[VerifySettings, list[int]] = {}
    for k, settings in pending.items():
        if settings.verify is not None:
            groups.setdefault(settings.verify, []).append(k)
    probes: dict[int, torch.Tensor] = {}
    for verify, members in groups.items():
        found = run_probes(generate, cond.select(members), verify, seed, prompts=[prompts[k] for k in members])
        cost = verify.probes * verify.probe_steps / max(generate.steps, 1)
        for k, prompt_probes in zip(members, found):
            probes[k] = prompt_probes
            result = results[decisions[k].prompt_index]
            result.generations += cost
            if verify.probes > 1:
                flat = torch.nn.functional.normalize(prompt_probes.flatten(1), dim=1)
                similarity = flat @ flat.T
                off_diagonal = similarity[~torch.eye(len(flat), dtype=torch.bool)]
                result.probe_agreement = float(off_diagonal.min())
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


def _share(rows: float, steps: int) -> float:
    """What ``rows`` denoiser row evaluations cost in guided ``steps``-step generations (2 rows per step). A scored
    noise draw is 2 rows (the two timesteps); an optimisation step on it, forward and backward, about 6."""
    return rows / (2.0 * max(steps, 1))


def _set_row(state: LadderState, k: int, row: TextConditioning) -> None:
    """Prompt ``k``'s conditioning in ``state`` replaced by the one-row ``row`` (pooled too, where both have it)."""
    state.cond.embeds[k] = row.embeds[0].to(state.cond.embeds.device, state.cond.embeds.dtype)
    if state.cond.pooled is not None and row.pooled is not None:
        state.cond.pooled[k] = row.pooled[0].to(state.cond.pooled.device, state.cond.pooled.dtype)


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
    steps: int,
    left: float | None,
) -> tuple[RungResult, bool]:
    """Set prompt ``k``'s inputs in ``state`` for ``rung`` (the caller has put its original inputs back and resets
    them when the rung does not run); returns the rung's result and whether every optimisation met its score target.
    ``left``: the generations its optimisations may spend (None: no budget); their step counts are cut to fit it,
    and a rung that cannot take one step is skipped."""
    rows = _rows(k, per)
    if latents is None and rung in ("initial_noise", "combined"):
        return RungResult(rung=rung, ran=False, note="needs the generation's initial noise, which this front end "
                                                     "does not have"), False
    if rung == "guidance_schedule" and settings.verify is None:
        return RungResult(rung=rung, ran=False, note="without verification nothing can tell whether a guidance "
                                                     "schedule worked (it has no score target)"), False
    uses_guidance = rung in ("guidance_schedule", "combined")
    if uses_guidance and guidance_available is not None:
        if rung == "guidance_schedule":
            return RungResult(rung=rung, ran=False, note=guidance_available), False
        uses_guidance = False
    embedding_step = _share(6 * scorer.samples, steps) if rung in ("prompt_embedding", "combined") else 0.0
    noise_step = _share(6 * NOISE_CANDIDATES * scorer.samples, steps) if rung in ("initial_noise", "combined") else 0.0
    if left is not None and left < embedding_step + noise_step:
        return RungResult(rung=rung, ran=False, note=f"skipped: the rewrite's budget leaves {left:.2f} generations, "
                                                     "less than one optimisation step"), False
    outcome = RungResult(rung=rung, ran=True)
    met = True
    target = float(decision.rewrite_target)
    row = cond.select([k])
    try:
        if rung in ("prompt_embedding", "combined"):
            cap = settings.max_steps if left is None else min(settings.max_steps,
                                                               int((left - noise_step) // embedding_step))
            adapted = mitigate_prompt_embedding(scorer, row, target=target, max_steps=cap, lr=settings.lr,
                                                proximity=settings.proximity)
            outcome.optimisations.append(adapted.summary())
            outcome.generations += adapted.steps * embedding_step
            met = met and adapted.met
            row = adapted.cond
            _set_row(state, k, row)
        if rung in ("initial_noise", "combined"):
            own = latents[rows]
            cap = settings.max_steps if left is None else min(settings.max_steps,
                                                               int((left - outcome.generations) // noise_step))
            moved = mitigate_initial_noise(scorer, row, own, target=target, max_steps=cap, lr=settings.lr,
                                           seed=noise_seed(own))
            outcome.optimisations.append(moved.summary())
            outcome.generations += moved.steps * noise_step
            met = met and moved.met
            state.latents[rows] = moved.latents.to(state.latents.device, state.latents.dtype)
    except Exception as error:  # a failed optimisation is a failed rung, not a crash of the call (the caller resets)
        outcome.ran, outcome.note = False, f"{type(error).__name__}: {error}"
        return outcome, False
    if uses_guidance:
        for image in rows:
            state.guidance[image] = settings.guidance
    if rung == "combined" and guidance_available is not None:
        outcome.note = f"without the guidance schedule: {guidance_available}"
    return outcome, met


def _prepare_token(
    k: int,
    settings: RewriteSettings,
    decision: Decision,
    scorer: Scorer,
    state: LadderState,
    text: str | None,
    encode_options: dict[str, Any],
    steps: int,
    previous: TriggerRewrite | None,
) -> tuple[RungResult, bool, TriggerRewrite | None]:
    """Prompt ``k``'s conditioning re-encoded from its text without the words that carry its score: occlusion
    names the top word, it is deleted, the rest re-attributed, until the score is under the rewrite target or
    ``max_words`` are gone. After an edit that failed verification (``previous``) it goes on from that edit, one
    word deeper. The record keeps the deleted words' indices and the words (the audit logger drops the words unless
    prompts are logged plain), and the scoring passes spent, in generations. Returns the rung's result, whether the
    score target was met, and the edit (None when the rung did not run). The caller has put the prompt's original
    inputs back, and resets them when the rung does not run."""
    if not text or not text.strip():
        return RungResult(rung="token", ran=False, note="needs the prompt's text; the call gave only embeddings"), \
            False, None
    target = float(decision.rewrite_target)
    start = previous.prompt if previous is not None else text
    done = len(previous.removed) if previous is not None else 0
    try:
        found = rewrite_triggers(
            start,
            explain=lambda prompt: explain_prompt(scorer, prompt, encode_options=encode_options).words,
            score=lambda prompts: [r.score for r in scorer.score(list(prompts), **encode_options)],
            target=target,
            max_words=settings.max_words - done,
            min_words=1 if previous is not None else 0,
        )
        if not found.changed:
            return RungResult(rung="token", ran=False, note="no (further) word raises the score, so none is "
                                                            "deleted"), False, None
        edited = scorer.encode([found.prompt], **encode_options)
        _set_row(state, k, edited)
    except Exception as error:  # a prompt that cannot be edited or re-encoded is a failed rung, not a crash
        return RungResult(rung="token", ran=False, note=f"{type(error).__name__}: {error}"), False, None
    removed = (*(previous.removed if previous is not None else ()), *found.removed)
    outcome = RungResult(rung="token", ran=True, generations=_share(2 * found.scored * scorer.samples, steps), edits={
        "word_indices": word_indices(text, removed, prompt_words(text)),
        "words": list(removed),
        "score": round(found.score, 6),
        "target": round(target, 6),
        "scored_prompts": found.scored,
    })
    edit = TriggerRewrite(found.prompt, found.score, removed, (), found.rounds, found.scored, found.exhausted)
    return outcome, found.score <= target, edit


def _fallback(decision: Decision, settings: RewriteSettings, ladder: RewriteResult) -> Decision:
    reason = f"{decision.reason}; rewrite: {ladder.describe()}; fallback: {settings.fallback}"
    return decision.model_copy(update={"action": settings.fallback, "reason": reason, "mitigation": ladder})
