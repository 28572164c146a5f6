"""The judging core: one path from prompts to audited decisions, shared by every front end.

The diffusers ``Guard``, the ComfyUI node and the HTTP service all go through ``GuardCore``:

1. ``judge`` decides each prompt (prompt lists, score, calibration, rules; scoring problems become the
   policy's ``on_error`` decisions) and writes one decision record per prompt **before returning**, so a
   decision is on disk before anything acts on it;
2. ``rewrite`` applies the ``rewrite`` action's mitigation to the prompts that need it;
3. ``conclude`` writes one outcome record per prompt (generated, withheld, blocked, rewritten, dropped,
   failed), chained to its decision record.

A front end only supplies what is its own: how prompts arrive and how images are generated.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .actions import BatchPlan, plan_batch
from .actions.ladder import LadderResult, LadderState, run_ladder
from .actions.verification import Generate, auto_verification
from .audit import AuditLogger, AuditWriteError, new_request_id
from .audit.record import Outcome
from .calibration import (
    CalibrationError,
    CalibrationMismatch,
    CalibrationMissing,
    CalibrationProfile,
    VerificationCalibration,
    auto_calibration,
)
from .events import log_event
from .monitor import CalibrationMonitor
from .policy import (
    Decision,
    Policy,
    PolicyError,
    VerifySettings,
    decide,
    decide_on_error,
    decision_limits,
    load_policy,
    match_lists,
)
from .redaction import redacted_library_logs
from .scoring import (
    AdaptiveScorer,
    DecisionLimits,
    Explanation,
    MemorizationScore,
    Scorer,
    TextConditioning,
    make_scorer,
)
from .scoring.explain import explain_prompt
from .telemetry import check_span, decide_span, rewrite_span, score_span, traced

__all__ = ["GuardCore", "GuardReport", "Mode", "Submission"]

#: ``check``: a verdict only (decision records are final); ``generate``: an outcome record follows.
Mode = Literal["check", "generate"]


@dataclass
class GuardReport:
    """What the guard decided and did for one request; ``Guard.__call__`` returns it as ``.memguard``.

    ``records`` holds each prompt's decision record as written (with its ``seq`` and ``hash``), the
    link its outcome record carries. ``audit_error`` says why a record could not be written.
    """

    request_id: str
    decisions: list[Decision]
    mode: Mode = "generate"
    generated: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    blocked: bool = False
    withheld: bool = False
    latency_scoring_ms: float | None = None
    latency_generation_ms: float | None = None
    mitigations: dict[int, LadderResult] = field(default_factory=dict)
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    audit_error: str | None = None
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def actions(self) -> list[str]:
        return [decision.action for decision in self.decisions]

    def plan(self, policy: Policy) -> BatchPlan:
        return plan_batch(policy, self.decisions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "decisions": [decision.to_dict() for decision in self.decisions],
            "generated": list(self.generated),
            "dropped": list(self.dropped),
            "blocked": self.blocked,
            "withheld": self.withheld,
            "latency_scoring_ms": self.latency_scoring_ms,
            "latency_generation_ms": self.latency_generation_ms,
            "mitigations": {i: m.to_dict() for i, m in self.mitigations.items()},
            "outcomes": dict(self.outcomes),
            "records": {i: {"seq": r.get("seq"), "hash": r.get("hash")} for i, r in self.records.items()},
            "audit_error": self.audit_error,
        }


@dataclass(frozen=True)
class Submission:
    """One caller's prompts (or precomputed conditioning) within a batch the core judges together."""

    prompts: Sequence[str | None]
    cond: TextConditioning | None = None
    encode_options: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    context: Mapping[str, Any] = field(default_factory=dict)


def ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


class GuardCore:
    """Scores, decides, rewrites and audits for one model under one policy.

    Args:
        model: a diffusers pipeline or a ``guard.scoring.ModelAdapter``. A model the guard cannot score is
            not an error here: every request then gets the policy's ``on_error`` decision (``setup_error``).
        policy: a shipped policy name, a YAML path, a mapping or a ``Policy``.
        audit_path: where records go; overrides ``$MEMGUARD_AUDIT_PATH`` and the policy.
        calibration: a ``CalibrationProfile`` or its file, overriding the policy's ``calibration``.
        model_id: the model's name in audit records.
        source: the front end's name in audit records (``python``, ``service``, ``comfyui``, ...).
        setup_error: why the front end could not make a model adapter (every request then gets ``on_error``).
    """

    def __init__(
        self,
        model: Any,
        policy: str | os.PathLike | Policy | Mapping[str, Any] = "balanced",
        *,
        audit_path: str | os.PathLike | None = None,
        calibration: CalibrationProfile | str | os.PathLike | None = None,
        model_id: str | None = None,
        source: str = "python",
        setup_error: Exception | None = None,
    ) -> None:
        self.policy = load_policy(policy)
        self.source = source
        self.lock = threading.RLock()
        self.scorer: Scorer | None = None
        self.setup_error: Exception | None = setup_error
        settings = self.policy.scoring
        self._calibration_override = calibration
        try:
            if setup_error is not None:
                raise setup_error
            self.scorer = make_scorer(
                model,
                samples=settings.samples,
                max_samples=settings.max_samples,
                seed=settings.noise_seed,
                inference_steps=settings.inference_steps,
                profile=self.policy.score_weights(calibration),
                prediction_space=settings.prediction_space,
                batch_size=settings.batch_size or 16,
            )
        except Exception as error:  # an unscorable model is an error decision on every call, not a crash
            self.setup_error = error
        adapter = self.scorer.adapter if self.scorer is not None else None
        if adapter is not None:
            self._check_rungs_apply(adapter)
        self.model_class = adapter.model_class if adapter is not None else type(model).__name__
        self.model_id = model_id or (adapter.model_id if adapter is not None else None) or self.model_class
        self._audit_path = audit_path
        self._audit: AuditLogger | None = None
        self._calibration: CalibrationProfile | None = None
        self._calibration_error: CalibrationError | None = None
        self._calibration_label: str | None = None
        self._verification: dict[tuple[int, int], VerificationCalibration] = {}
        self.monitor = CalibrationMonitor(self.policy, emit=self._record_event)
        try:
            self.audit  # noqa: B018 - open the log now so a bad path shows up at once, as a warning
        except AuditWriteError as error:
            warnings.warn(f"memguard: {error}; requests will follow on_error ({self.policy.on_error})", stacklevel=3)

    def _check_rungs_apply(self, adapter: Any) -> None:
        """A rewrite rule whose every rung cannot run on this model is a policy error, said at once."""
        if getattr(adapter, "classifier_free_guidance", True):  # front ends that sample elsewhere (ComfyUI)
            return
        for index, rule in enumerate(self.policy.rules):
            if rule.action == "rewrite" and rule.rewrite is not None and set(rule.rewrite.rungs) == {
                    "guidance_schedule"}:
                source = str(self.policy._source) if self.policy._source is not None else f"policy {self.policy.name}"
                raise PolicyError(source, [(f"rules[{index}].rewrite", (
                    f"guidance_schedule does not apply to {adapter.model_class}: it is guidance-distilled (no "
                    "classifier-free guidance to schedule); add prompt_embedding or initial_noise to the ladder"))])

    @property
    def audit(self) -> AuditLogger:
        """The audit logger; opened on first use, and retried on each request while it cannot be."""
        if self._audit is None:
            audit = AuditLogger.for_policy(
                self.policy, path=self._audit_path, model_id=self.model_id, model_class=self.model_class
            )
            try:
                audit.log_policy_loaded(self.policy, source=self.source)
            except BaseException:
                audit.close()
                raise
            self._audit = audit
        return self._audit

    @property
    def hashes_prompts(self) -> bool:
        """Whether prompt text must stay out of logs (the policy does not log prompts in plain text)."""
        return self.policy.audit.prompt != "plain"

    # ------------------------------------------------------------------ calibration

    @property
    def calibration(self) -> CalibrationProfile | None:
        """The calibration the policy's relative thresholds use, loaded or made once and kept in memory.

        Raises ``CalibrationError`` (remembered, not retried per request) when it is unusable: unreadable,
        or measured on another model or with other scoring settings than this guard's.
        """
        with self.lock:
            if self._calibration_error is not None:
                raise self._calibration_error
            if self._calibration is None:
                try:
                    self._calibration = self._load_calibration()
                except CalibrationError as error:
                    self._calibration_error = error
                    raise
                self._audit_calibration(None)
            return self._calibration

    def use_calibration(self, calibration: CalibrationProfile | str | os.PathLike) -> CalibrationProfile | None:
        """Switch to another calibration (a profile or its file), checked against this model now and audited
        with the one it replaces; raises ``CalibrationError`` and keeps the current one if it does not fit."""
        with self.lock:
            previous = self._calibration.id if self._calibration is not None else None
            kept = self._calibration_override
            self._calibration_override = calibration
            try:
                profile = self._load_calibration()
            except BaseException:
                self._calibration_override = kept
                raise
            self._calibration, self._calibration_error = profile, None
            self._audit_calibration(previous)
            return profile

    def _audit_calibration(self, previous: str | None) -> None:
        """A ``calibration_loaded`` record; an unwritable log is reported by the decisions that follow."""
        profile = self._calibration
        if profile is None:
            return
        label = self._calibration_label
        origin = "file" if label else ("object" if isinstance(self._calibration_override, CalibrationProfile)
                                       else "auto")
        try:
            self.audit.log_calibration_loaded(profile.id, origin=origin, path=label, previous=previous,
                                              source=self.source)
        except (AuditWriteError, OSError) as error:
            log_event("audit_unwritable", level="error", error=str(error))

    def _load_calibration(self) -> CalibrationProfile | None:
        override = self._calibration_override
        profile: CalibrationProfile | None
        label: str | None = None
        if isinstance(override, CalibrationProfile):
            profile = override
        elif override is not None:
            profile, label = CalibrationProfile.load(override), str(override)
        elif self.policy.calibration_path is not None:
            label = str(self.policy.calibration_path)
            profile = CalibrationProfile.load(self.policy.calibration_path)
        elif self.policy.calibration in ("auto", "auto-strict") and self._needs_calibration \
                and self.scorer is not None:
            profile = auto_calibration(self.scorer)
        else:
            profile = None
        if profile is not None and self.scorer is not None:
            profile.check_measurement(self.scorer.measurement(), source=label)
            automatic = override is None and self.policy.calibration_path is None
            problem = self.monitor.start(profile, pipe=getattr(self.scorer.adapter, "pipe", None), automatic=automatic)
            if problem is not None:
                raise CalibrationError(problem)
        self._calibration_label = label
        return profile

    @property
    def _needs_calibration(self) -> bool:
        """Relative thresholds read it; adaptive sampling reads its band from it."""
        return self.policy.uses_relative_thresholds or self.policy.scoring.adaptive

    def _calibration_or_error(self) -> tuple[CalibrationProfile | None, str | None]:
        if not self.policy.uses_relative_thresholds:
            return None, None
        try:
            calibration = self.calibration
        except CalibrationError as error:
            return None, str(error)
        except Exception as error:
            return None, str(CalibrationMissing(f"calibration unavailable: {type(error).__name__}: {error}"))
        if calibration is None:
            return None, str(CalibrationMissing(f"policy {self.policy.name!r} has no calibration for this model"))
        if self.monitor.blocking_problem is not None:
            return None, self.monitor.blocking_problem
        return calibration, None

    # ------------------------------------------------------------------ judging

    def judge(
        self,
        prompts: Sequence[str | None],
        *,
        cond: TextConditioning | None = None,
        encode_options: Mapping[str, Any] | None = None,
        mode: Mode = "generate",
        request_id: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> tuple[GuardReport, TextConditioning | None]:
        """Decide each prompt and write its decision record; returns the report and the conditioning
        scored (reusable for generation). ``prompts`` entries are None where only ``cond`` is known."""
        request = Submission(list(prompts), cond, dict(encode_options or {}), request_id, dict(context or {}))
        (report,), conds = self.judge_many([request], mode=mode)
        return report, conds[0]

    @traced(check_span)
    def judge_many(
        self, requests: Sequence[Submission], *, mode: Mode = "check"
    ) -> tuple[list[GuardReport], list[TextConditioning | None]]:
        """Decide many callers' prompts in one batched scoring pass, each with its own request id,
        prompt indices and records (the service's micro-batching)."""
        started = time.perf_counter()
        decided = self._decide(requests)
        scoring_ms = ms_since(started)
        reports = []
        for request, (decisions, _) in zip(requests, decided):
            report = GuardReport(
                request_id=request.request_id or new_request_id(), decisions=decisions, mode=mode,
                latency_scoring_ms=scoring_ms, context=dict(request.context),
            )
            self._write_decisions(report, request.prompts)
            self.monitor.observe(report.decisions)
            reports.append(report)
        return reports, [cond for _, cond in decided]

    def _decide(self, requests: Sequence[Submission]) -> list[tuple[list[Decision], TextConditioning | None]]:
        """Decisions (and the conditioning scored) per request; the prompts of requests that arrive as
        text with the same encode options are encoded and scored together in batches."""
        listed: list[dict[int, Decision]] = []
        for request in requests:
            found = {}
            for index, prompt in enumerate(request.prompts):
                decision = match_lists(self.policy, prompt, index) if prompt is not None else None
                if decision is not None:
                    found[index] = decision
            listed.append(found)
        if self.scorer is None:
            error = f"the guard cannot score this model: {self.setup_error}"
            return [(self._all_errors(r.prompts, found, error), r.cond) for r, found in zip(requests, listed)]
        groups: dict[str, list[int]] = {}
        for position, request in enumerate(requests):
            key = "cond" + str(position) if request.cond is not None else repr(sorted(request.encode_options.items()))
            groups.setdefault(key, []).append(position)
        results: dict[int, tuple[list[Decision], TextConditioning | None]] = {}
        for members in groups.values():
            results.update(self._decide_group([requests[i] for i in members], [listed[i] for i in members], members))
        return [results[i] for i in range(len(requests))]

    def _decide_group(
        self, requests: list[Submission], listed: list[dict[int, Decision]], positions: list[int]
    ) -> dict[int, tuple[list[Decision], TextConditioning | None]]:
        """Requests scored in one pass: all precomputed (one request) or all text with the same encode options."""
        texts = [p or "" for request in requests for p in request.prompts]
        starts = [0]
        for request in requests:
            starts.append(starts[-1] + len(request.prompts))
        pending = [starts[k] + i for k, request in enumerate(requests)
                   for i in range(len(request.prompts)) if i not in listed[k]]
        cond = requests[0].cond if len(requests) == 1 else None
        try:
            with self.lock, redacted_library_logs(self.scorer.adapter, self.hashes_prompts), \
                    score_span(self, len(texts)):
                if cond is None:
                    cond = self.scorer.encode(texts, **dict(requests[0].encode_options))
                flat = [p for request in requests for p in request.prompts]
                scores = self._score(cond.select(pending), [flat[i] for i in pending]) if pending else []
        except Exception as error:
            message = f"scoring failed: {type(error).__name__}: {error}"
            return {
                position: (self._all_errors(request.prompts, found, message), request.cond)
                for position, request, found in zip(positions, requests, listed)
            }
        calibration, calibration_error = self._calibration_or_error() if pending else (None, None)
        by_flat = dict(zip(pending, scores))
        out = {}
        for k, (position, request) in enumerate(zip(positions, requests)):
            decisions = dict(listed[k])
            for i, prompt in enumerate(request.prompts):
                if i not in decisions:
                    decisions[i] = self._decide_one(prompt, by_flat[starts[k] + i], i, calibration, calibration_error)
                    decisions[i] = self._explained(decisions[i], prompt, request.encode_options)
            rows = cond.select(slice(starts[k], starts[k + 1]))
            out[position] = ([decisions[i] for i in range(len(request.prompts))], rows)
        return out

    def _score(self, cond: TextConditioning, prompts: list[str | None]) -> list[MemorizationScore]:
        """Scores of ``cond``'s rows; an adaptive scorer gets the policy's thresholds and the calibration's bands
        (without them, e.g. while the calibration is unusable, it scores every prompt on all its draws)."""
        if not isinstance(self.scorer, AdaptiveScorer):
            return self.scorer.score_conditioning(cond, prompts, strict=False)
        return self.scorer.score_conditioning(cond, prompts, strict=False, limits=self._decision_limits())

    def _decision_limits(self) -> DecisionLimits | None:
        try:
            calibration = self.calibration
            return decision_limits(self.policy, calibration) if calibration is not None else None
        except Exception as error:  # the decisions report the calibration problem; scoring just takes every draw
            log_event("adaptive_limits_unavailable", level="warning", error=f"{type(error).__name__}: {error}")
            return None

    def _explained(self, decision: Decision, prompt: str | None, encode_options: Mapping[str, Any]) -> Decision:
        """``decision`` with the explanation the policy asks for (``explain``); an explanation that cannot be made
        is a warning on the decision, never a different verdict."""
        settings = self.policy.explain
        score = decision.score
        if not settings.applies(decision.action) or score is None or decision.error or self.scorer is None:
            return decision
        if not prompt or not prompt.strip():
            problem = "no explanation: the prompt text is not known here"
        else:
            try:
                with self.lock, redacted_library_logs(self.scorer.adapter, self.hashes_prompts):
                    explanation = explain_prompt(self.scorer, prompt, method=settings.method, samples=score.samples,
                                                 encode_options=encode_options)
                return decision.model_copy(update={"explanation": explanation})
            except Exception as error:
                problem = f"no explanation: {type(error).__name__}: {error}"
        return decision.model_copy(update={"warnings": (*decision.warnings, problem)})

    def explain(
        self, prompt: str, *, method: str | None = None, samples: int | None = None,
        encode_options: Mapping[str, Any] | None = None,
    ) -> Explanation:
        """Which words of ``prompt`` drive its score (``guard.scoring.explain``), by the policy's ``explain.method``
        unless ``method`` is given, on the scorer's first ``samples`` draws (default: all). Not audited: it decides
        nothing."""
        if self.scorer is None:
            raise RuntimeError(f"the guard cannot score this model: {self.setup_error}")
        with self.lock, redacted_library_logs(self.scorer.adapter, self.hashes_prompts):
            return explain_prompt(self.scorer, prompt, method=method or self.policy.explain.method, samples=samples,
                                  encode_options=encode_options)

    def _all_errors(self, prompts: Sequence[str | None], decided: dict[int, Decision], error: str) -> list[Decision]:
        """Every prompt not already decided by the lists gets the ``on_error`` decision."""
        return [decided.get(i) or decide_on_error(self.policy, i, error) for i in range(len(prompts))]

    @traced(decide_span)
    def _decide_one(
        self,
        prompt: str | None,
        score: MemorizationScore,
        index: int,
        calibration: CalibrationProfile | None,
        calibration_error: str | None,
    ) -> Decision:
        if calibration_error is not None:
            return decide_on_error(self.policy, index, calibration_error, score=score)
        try:
            return decide(self.policy, score, prompt or "", calibration, prompt_index=index)
        except CalibrationError as error:
            return decide_on_error(self.policy, index, str(error), score=score)

    def _write_decisions(self, report: GuardReport, prompts: Sequence[str | None]) -> None:
        """Write-ahead: one decision record per prompt. If the log cannot be written, every prompt gets the
        ``on_error`` decision instead (so fail-closed policies generate nothing they could not record)."""
        outcome = "checked" if report.mode == "check" else "pending"
        measured = self._measurement_record()
        try:
            for decision in report.decisions:
                report.records[decision.prompt_index] = self.audit.log_decision(
                    decision,
                    prompt=prompts[decision.prompt_index],
                    outcome=outcome,
                    request_id=report.request_id,
                    latency_scoring_ms=report.latency_scoring_ms,
                    source=self.source,
                    context=report.context,
                    measurement=measured if decision.score is not None else None,
                )
        except (AuditWriteError, OSError) as error:
            message = f"audit log not writable: {error}"
            report.audit_error = message
            report.decisions = [
                decide_on_error(self.policy, d.prompt_index, message, score=d.score) for d in report.decisions
            ]
            warnings.warn(f"memguard: request {report.request_id} not audited: {message}", stacklevel=4)
            log_event("audit_unwritable", level="error", request_id=report.request_id, error=str(error))

    def _measurement_record(self) -> dict[str, Any] | None:
        """How this guard measures, for decision records: what ``calibrate --from-audit`` rebuilds a profile with."""
        if self.scorer is None:
            return None
        measured = self.scorer.measurement()
        return {"fingerprint": measured.fingerprint, "steps": measured.steps, "seed": measured.seed,
                "samples": measured.samples, "sampling": measured.sampling,
                "prediction_space": measured.prediction_space,
                "g_norm": measured.g_norm, "g_cos": measured.g_cos}

    def _record_event(self, event: str, fields: dict[str, Any]) -> None:
        """The monitor's findings as audit records; an unwritable log is said, never raised, here."""
        try:
            self.audit.log(event, source=self.source, **fields)
        except (AuditWriteError, OSError) as error:
            log_event("audit_unwritable", level="error", event_kind=event, error=str(error))

    # ------------------------------------------------------------------ acting

    @traced(rewrite_span)
    def rewrite(
        self,
        report: GuardReport,
        cond: TextConditioning,
        latents: torch.Tensor | None = None,
        *,
        generate: Generate | None = None,
        images_per_prompt: int = 1,
        guidance_available: str | None = None,
    ) -> LadderState:
        """Rewrite the prompts whose decision is ``rewrite`` by their ladders (``docs/mitigation.md``).

        ``cond`` and ``latents`` (the call's own unpacked initial noise, ``images_per_prompt`` per prompt)
        hold the prompts the call generates, ``report.plan(policy).generate``, in that order. ``generate``
        runs one pipeline call for a ``GenerationRequest`` (None where the front end cannot generate: then
        nothing can be verified). Updates ``report.decisions`` (fallbacks) and ``report.mitigations``;
        returns the inputs to release from, with the last generation if it was made from exactly them.
        """
        kept = list(report.plan(self.policy).generate)
        by_index = {d.prompt_index: d for d in report.decisions}
        if self.scorer is None:
            return LadderState(cond, latents, {}, None)
        with self.lock:
            decided, state = run_ladder(
                self.scorer, self.policy, [by_index[i] for i in kept], cond, latents,
                images_per_prompt=images_per_prompt, generate=generate,
                threshold=lambda verify: self._verification_threshold(verify, generate),
                seed=self.policy.scoring.noise_seed, guidance_available=guidance_available,
                results=report.mitigations,
            )
        for decision in decided:
            ladder = report.mitigations.get(decision.prompt_index)
            if ladder is not None:
                decision = decision.model_copy(update={"mitigation": ladder.to_dict()})
            by_index[decision.prompt_index] = decision
        report.decisions = [by_index[d.prompt_index] for d in report.decisions]
        return state

    def _verification_threshold(self, verify: VerifySettings, generate: Generate | None) -> float:
        """The probe-similarity threshold ``verify`` asks for: absolute, or read off the verification
        calibration (the calibration profile's own, else the cached automatic one, else measured now)."""
        if verify.max_similarity is not None:
            return verify.max_similarity
        verification = self._verification_calibration(verify, generate)
        if (verification.probes, verification.probe_steps) != (verify.probes, verify.probe_steps):
            raise CalibrationMismatch(
                f"the verification calibration was measured with {verification.probes} probes of "
                f"{verification.probe_steps} steps; the policy asks for {verify.probes} of {verify.probe_steps}"
            )
        return verification.threshold_at_fpr(verify.above_fpr, verify.against)

    def _verification_calibration(self, verify: VerifySettings, generate: Generate | None) -> VerificationCalibration:
        calibration = self.calibration
        if calibration is not None and calibration.verification is not None:
            return calibration.verification
        key = (verify.probes, verify.probe_steps)
        if key in self._verification:
            return self._verification[key]
        if self.policy.calibration not in ("auto", "auto-strict") or self.scorer is None or generate is None:
            where = f"calibration {calibration.id}" if calibration is not None else "this policy's calibration"
            raise CalibrationMissing(
                f"{where} has no verification values for rewrites: run `memguard calibrate --model DIR "
                "--verification 64 ...` and name the profile in the policy, or use `calibration: auto`"
            )
        self._verification[key] = auto_verification(self.scorer, generate, verify)
        return self._verification[key]

    def conclude(
        self,
        report: GuardReport,
        outcomes: Mapping[int, Outcome],
        *,
        latency_generation_ms: float | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Write one outcome record per prompt, chained to its decision record.

        The decision was on disk before anything was done, so a log that fails now does not undo the
        action: the report says so (``audit_error``) and a warning is raised.
        """
        report.outcomes.update(outcomes)
        report.latency_generation_ms = latency_generation_ms
        try:
            for decision in report.decisions:
                index = decision.prompt_index
                mitigation = report.mitigations.get(index)
                written = report.records.get(index)
                changed = written is not None and written.get("action") != decision.action
                self.audit.log_outcome(
                    request_id=report.request_id,
                    prompt_index=index,
                    action=decision.action,
                    outcome=outcomes[index],
                    decision_record=written,
                    reason=decision.reason if changed or error is not None else None,
                    latency_generation_ms=latency_generation_ms,
                    error=error,
                    source=self.source,
                    context=report.context,
                    extras={"mitigation": mitigation.to_dict()} if mitigation is not None else {},
                )
        except (AuditWriteError, OSError) as failure:
            report.audit_error = f"outcome not audited: {failure}"
            warnings.warn(f"memguard: request {report.request_id}: {report.audit_error}", stacklevel=3)
            log_event("audit_unwritable", level="error", request_id=report.request_id, error=str(failure))

    def close(self) -> None:
        """Close the audit log (reopened if the core is used again)."""
        if self._audit is not None:
            self._audit.close()
            self._audit = None

    def __repr__(self) -> str:
        return f"GuardCore({self.model_class}, policy={self.policy.name!r} v{self.policy.version})"
