"""The guard's core: one request life cycle, judge -> act -> conclude, shared by every front end.

Every front end (the diffusers ``Guard``, the HTTP service, the ComfyUI nodes, the CLI) only translates its
arguments into a call here, and the core's report back into its own terms:

1. ``judge`` decides each prompt (prompt lists, score, calibration, rules; any scoring problem is the policy's
   ``on_error`` decision) and writes one decision record per prompt **before returning**, so a decision is on
   disk before anything acts on it. A log that cannot take the records turns every decision into ``on_error``.
2. ``act`` carries the decisions out with the front end's ``Generator``: a blocked call is refused; ``rewrite``
   climbs the rule's ladder, whose every image is verified before release, and anything that goes wrong on the
   way takes the rule's ``fallback`` (or ``on_error``), never an exception; then the release is generated.
3. Concluding writes one outcome record per prompt (generated, withheld, blocked, rewritten, dropped, failed),
   chained to its decision record. The only exceptions that leave the core are the generator's own failures
   on an ordinary release (recorded as ``failed`` first) and ``MemorizationBlocked`` from
   ``GuardReport.raise_for_block``, which front ends call where blocking means raising.

Reading order for one ``guard(...)`` call: ``guard/guard.py`` (translation) -> this file -> ``guard/audit/
recorder.py`` (the records).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .actions import BatchPlan, MemorizationBlocked, plan_batch
from .actions.generation import GenerationJob, GenerationResult, Generator, generation_settings
from .actions.ladder import LadderState, run_ladder
from .actions.verification import auto_verification
from .audit import AuditLogger, new_request_id
from .audit.record import Outcome, error_info
from .audit.recorder import AuditUnavailable, RequestRecorder
from .calibration import CalibrationError, CalibrationMismatch, CalibrationMissing, CalibrationProfile
from .calibration.state import CalibrationInForce, Origin
from .events import log_event
from .monitor import CalibrationMonitor
from .policy import (
    Decision,
    Policy,
    PolicyError,
    RewriteResult,
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
    ScoringError,
    TextConditioning,
    make_scorer,
)
from .scoring.explain import explain_prompt
from .telemetry import (
    SpanSubject,
    check_span,
    decide_span,
    finish_check,
    finish_decide,
    finish_rewrite,
    generate_span,
    request_span,
    rewrite_span,
    score_span,
)

__all__ = ["GuardCore", "GuardReport", "Mode", "Release", "Submission"]

#: ``check``: a verdict only (decision records are final); ``generate``: an outcome record follows.
Mode = Literal["check", "generate"]


@dataclass
class GuardReport:
    """What the guard decided and did for one request; ``Guard.__call__`` returns it as ``.memguard``.

    ``records`` holds each prompt's decision record as written (with its ``seq`` and ``hash``), the link its
    outcome record carries. ``audit_error`` says why a record could not be written; ``errors`` names, per prompt,
    what failed while acting on it (the outcome record carries it too).
    """

    request_id: str
    decisions: list[Decision]
    mode: Mode = "check"
    generated: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    blocked: bool = False
    withheld: bool = False
    latency_scoring_ms: float | None = None
    latency_generation_ms: float | None = None
    mitigations: dict[int, RewriteResult] = field(default_factory=dict)
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    errors: dict[int, dict[str, str]] = field(default_factory=dict)
    audit_error: str | None = None
    context: dict[str, Any] = field(default_factory=dict)
    #: The request's prompt texts (None where only embeddings came) and encode options, for the ``token`` rung;
    #: never serialised.
    prompts: list[str | None] = field(default_factory=list, repr=False)
    encode_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def actions(self) -> list[str]:
        return [decision.action for decision in self.decisions]

    def plan(self, policy: Policy) -> BatchPlan:
        return plan_batch(policy, self.decisions)

    def raise_for_block(self) -> None:
        """Raise ``MemorizationBlocked`` if the call was blocked and not merely withheld (``block_mode``)."""
        if self.blocked and not self.withheld:
            raise MemorizationBlocked(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; never holds prompt text."""
        return {
            "request_id": self.request_id,
            "mode": self.mode,
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
            "errors": dict(self.errors),
            "audit_error": self.audit_error,
            "context": dict(self.context),
        }


@dataclass(frozen=True)
class Submission:
    """One caller's prompts (or precomputed conditioning) within a batch the core judges together."""

    prompts: Sequence[str | None]
    cond: TextConditioning | None = None
    encode_options: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    context: Mapping[str, Any] = field(default_factory=dict)
    #: Why this request cannot be scored (e.g. conditioning the model does not take): every prompt gets on_error.
    unscorable: str | None = None


@dataclass
class Release:
    """What a call released: the generator's output (None when refused, or when the front end generates
    elsewhere) and the conditioning of every prompt of the call with rewritten rows replaced (what a front end that
    passes conditioning on to a sampler hands on; None when the prompts were not encoded)."""

    output: Any = None
    cond: TextConditioning | None = None


def ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


class GuardCore:
    """Scores, decides, acts and audits for one model under one policy.

    Args:
        model: a diffusers pipeline or a ``guard.scoring.ModelAdapter``. A model the guard cannot score is not an
            error here: every request then gets the policy's ``on_error`` decision (``setup_error``).
        policy: a shipped policy name, a YAML path, a mapping or a ``Policy``.
        audit_path: where records go; overrides ``$MEMGUARD_AUDIT_PATH`` and the policy.
        calibration: a ``CalibrationProfile``, its file, or a mode in the policy's words (``auto``,
            ``auto-strict``, ``off``), overriding the policy's ``calibration``.
        model_id: the model's name in audit records.
        source: the front end's name in audit records (``python``, ``service``, ``comfyui``, ``cli``).
        setup_error: why the front end could not make a model adapter (every request then gets ``on_error``).
        lock: the lock that serializes model calls; guards sharing one pipeline must share it (the service's
            guards for per-key policies do). Default: a lock of this core's own.
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
        lock: Any = None,
    ) -> None:
        self.policy = load_policy(policy)
        self.source = source
        self.lock = lock if lock is not None else threading.RLock()
        self.scorer: Scorer | None = None
        self.setup_error: Exception | None = setup_error
        try:
            if setup_error is not None:
                raise setup_error
            weights = self.policy.score_weights(calibration)
            self.scorer = make_scorer(model, **self.policy.scoring.scorer_kwargs(weights))
        except Exception as error:  # an unscorable model is an error decision on every call, not a crash
            self.setup_error = error
        adapter = self.scorer.adapter if self.scorer is not None else None
        if adapter is not None:
            self._check_rungs_apply(adapter)
        self.model_class = adapter.model_class if adapter is not None else type(model).__name__
        self.model_id = model_id or (adapter.model_id if adapter is not None else None) or self.model_class
        self.recorder = RequestRecorder(self.policy, path=audit_path, model_id=self.model_id,
                                        model_class=self.model_class, source=source)
        self.monitor = CalibrationMonitor(self.policy, emit=self.recorder.event)
        self.calibrations = CalibrationInForce(
            mode=self.policy.calibration, policy_file=self.policy.calibration_path, override=calibration,
            scorer=self.scorer, needed=self.policy.uses_relative_thresholds or self.policy.scoring.adaptive,
            on_loaded=self._calibration_taken,
        )
        self.spans = SpanSubject(self.policy, str(self.model_id), source)
        try:
            self.recorder.logger  # noqa: B018 - open the log now so a bad path shows up at once, as a warning
        except Exception as error:
            warnings.warn(f"memguard: {error}; requests will follow on_error ({self.policy.on_error})", stacklevel=3)

    def _check_rungs_apply(self, adapter: Any) -> None:
        """A rewrite rule whose every rung cannot run on this model is a policy error, said at once."""
        if getattr(adapter, "classifier_free_guidance", True):  # adapters that do not say (ComfyUI's) can guide
            return
        for index, rule in enumerate(self.policy.rules):
            if rule.action == "rewrite" and rule.rewrite is not None and set(rule.rewrite.rungs) == {
                    "guidance_schedule"}:
                source = str(self.policy.source) if self.policy.source is not None else f"policy {self.policy.name}"
                raise PolicyError(source, [(f"rules[{index}].rewrite", (
                    f"guidance_schedule does not apply to {adapter.model_class}: it is guidance-distilled (no "
                    "classifier-free guidance to schedule); add prompt_embedding or initial_noise to the ladder"))])

    @property
    def audit(self) -> AuditLogger:
        """The audit logger (opened on first use, and retried on each request while it cannot be)."""
        return self.recorder.logger

    @property
    def hashes_prompts(self) -> bool:
        """Whether prompt text must stay out of logs (the policy does not log prompts in plain text)."""
        return self.policy.audit.prompt != "plain"

    # ------------------------------------------------------------------ calibration

    @property
    def calibration(self) -> CalibrationProfile | None:
        """The calibration the policy's relative thresholds use (``CalibrationInForce.profile``)."""
        return self.calibrations.profile()

    def use_calibration(self, calibration: CalibrationProfile | str | os.PathLike) -> CalibrationProfile | None:
        """Switch to another calibration (a profile or its file), checked against this model now and audited
        with the one it replaces; raises ``CalibrationError`` and keeps the current one if it does not fit."""
        return self.calibrations.use(calibration)

    def _calibration_taken(self, profile: CalibrationProfile, origin: Origin, label: str | None,
                           previous: str | None) -> str | None:
        """A profile is taken into use: the fit checks start on it, and a ``calibration_loaded`` record says so."""
        problem = self.monitor.start(profile, pipe=getattr(self.scorer.adapter, "pipe", None) if self.scorer else None,
                                     automatic=origin == "auto")
        if problem is None:
            self.recorder.calibration_loaded(profile.id, origin=origin, path=label, previous=previous)
        return problem

    def _calibration_or_error(self) -> tuple[CalibrationProfile | None, str | None]:
        if not self.policy.uses_relative_thresholds:
            return None, None
        try:
            calibration = self.calibrations.profile()
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
        mode: Mode = "check",
        request_id: str | None = None,
        context: Mapping[str, Any] | None = None,
        unscorable: str | None = None,
    ) -> tuple[GuardReport, TextConditioning | None]:
        """Decide each prompt and write its decision record; returns the report and the conditioning scored
        (reusable for generation). ``prompts`` entries are None where only ``cond`` is known; ``unscorable`` says
        why the front end knows the request cannot be scored (its prompts then get ``on_error``, audited)."""
        request = Submission(list(prompts), cond, dict(encode_options or {}), request_id, dict(context or {}),
                             unscorable)
        (report,), conds = self.judge_many([request], mode=mode)
        return report, conds[0]

    def judge_many(
        self, requests: Sequence[Submission], *, mode: Mode = "check"
    ) -> tuple[list[GuardReport], list[TextConditioning | None]]:
        """Decide many callers' prompts in one batched scoring pass, each with its own request id, prompt indices
        and records (the service's micro-batching). Never raises for a prompt it could not judge: that prompt gets
        the policy's ``on_error`` decision, audited like any other."""
        prompts = sum(len(r.prompts) for r in requests)
        with check_span(self.spans, requests=len(requests), prompts=prompts, mode=mode) as current:
            started = time.perf_counter()
            try:
                decided = self._decide(requests)
            except Exception as error:  # a bug or a failure outside scoring: still a decision, still audited
                message = f"judging failed: {type(error).__name__}: {error}"
                decided = [(self._all_errors(r.prompts, {}, message), r.cond) for r in requests]
            scoring_ms = ms_since(started)
            reports = [
                GuardReport(request_id=request.request_id or new_request_id(), decisions=decisions, mode=mode,
                            latency_scoring_ms=scoring_ms, context=dict(request.context),
                            prompts=list(request.prompts), encode_options=dict(request.encode_options))
                for request, (decisions, _) in zip(requests, decided)
            ]
            self._write_all_decisions(reports, [request.prompts for request in requests])
            for report in reports:
                self.monitor.observe(report.decisions)
            finish_check(current, [r.request_id for r in reports], [d for r in reports for d in r.decisions],
                         audited=not any(r.audit_error for r in reports))
        return reports, [cond for _, cond in decided]

    def _decide(self, requests: Sequence[Submission]) -> list[tuple[list[Decision], TextConditioning | None]]:
        """Decisions (and the conditioning scored) per request; the prompts of requests that arrive as text with
        the same encode options are encoded and scored together in batches."""
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
        results: dict[int, tuple[list[Decision], TextConditioning | None]] = {}
        groups: dict[str, list[int]] = {}
        for position, request in enumerate(requests):
            if request.unscorable is not None:
                results[position] = (self._all_errors(request.prompts, listed[position], request.unscorable), None)
                continue
            key = "cond" + str(position) if request.cond is not None else repr(sorted(request.encode_options.items()))
            groups.setdefault(key, []).append(position)
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
                    score_span(self.spans, len(texts), self.scorer.profile.name):
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
                    with decide_span(self.spans, i) as current:
                        decision = self._decide_one(prompt, by_flat[starts[k] + i], i, calibration, calibration_error)
                        decisions[i] = self._explained(decision, prompt, request.encode_options)
                        finish_decide(current, decisions[i])
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
            calibration = self.calibrations.profile()
            return decision_limits(self.policy, calibration) if calibration is not None else None
        except Exception as error:  # the decisions report the calibration problem; scoring just takes every draw
            log_event("adaptive_limits_unavailable", level="warning", error=f"{type(error).__name__}: {error}")
            return None

    def _decide_one(
        self, prompt: str | None, score: MemorizationScore, index: int, calibration: CalibrationProfile | None,
        calibration_error: str | None,
    ) -> Decision:
        if calibration_error is not None:
            return decide_on_error(self.policy, index, calibration_error, score=score)
        try:
            return decide(self.policy, score, prompt or "", calibration, prompt_index=index)
        except CalibrationError as error:
            return decide_on_error(self.policy, index, str(error), score=score)

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
        nothing. Raises ``ScoringError`` when the model cannot be scored."""
        if self.scorer is None:
            raise ScoringError(f"the guard cannot score this model: {self.setup_error}")
        with self.lock, redacted_library_logs(self.scorer.adapter, self.hashes_prompts):
            return explain_prompt(self.scorer, prompt, method=method or self.policy.explain.method, samples=samples,
                                  encode_options=encode_options)

    def _all_errors(self, prompts: Sequence[str | None], decided: dict[int, Decision], error: str) -> list[Decision]:
        """Every prompt not already decided by the lists gets the ``on_error`` decision."""
        return [decided.get(i) or decide_on_error(self.policy, i, error) for i in range(len(prompts))]

    def _write_all_decisions(self, reports: Sequence[GuardReport], prompts: Sequence[Sequence[str | None]]) -> None:
        """Write-ahead for a whole batch of requests (the service's micro-batch): every request's decision records,
        flushed to disk with one ``fsync`` at the end (``AuditLogger.batch``) instead of one per request. The batch
        is on disk before ``judge_many`` returns, so nothing acts on a record that is not; a flush that fails turns
        every decision of the batch into ``on_error``, as an unwritable record does."""
        try:
            batch = self.recorder.logger.batch()
        except Exception:  # the log cannot be opened: each request finds that out (and says so) on its own
            batch = contextlib.nullcontext()
        try:
            with batch:
                for report, each in zip(reports, prompts):
                    self._write_decisions(report, each)
        except Exception as error:
            message = f"audit log not writable: {type(error).__name__}: {error}"
            for report in reports:
                if report.audit_error is None:
                    self._not_audited(report, message, stacklevel=5)

    def _write_decisions(self, report: GuardReport, prompts: Sequence[str | None]) -> None:
        """Write-ahead: one decision record per prompt. If the log cannot take them, every prompt gets the
        ``on_error`` decision instead (so a fail-closed policy generates nothing it could not record)."""
        measurement = self.scorer.measurement() if self.scorer is not None else None
        try:
            report.records = self.recorder.decisions(
                report.request_id, report.decisions, prompts, outcome="checked" if report.mode == "check" else
                "pending", latency_scoring_ms=report.latency_scoring_ms, context=report.context,
                measurement=measurement)
        except AuditUnavailable as error:
            self._not_audited(report, str(error), stacklevel=6)

    def _not_audited(self, report: GuardReport, message: str, *, stacklevel: int) -> None:
        """``report``'s decisions could not be recorded: each becomes the policy's ``on_error`` decision."""
        report.audit_error = message
        report.records = {}
        report.decisions = [
            decide_on_error(self.policy, d.prompt_index, message, score=d.score) for d in report.decisions
        ]
        warnings.warn(f"memguard: request {report.request_id} not audited: {message}", stacklevel=stacklevel)
        log_event("audit_unwritable", level="error", request_id=report.request_id, error=message)

    # ------------------------------------------------------------------ the whole request

    def generate(
        self,
        prompts: Sequence[str | None],
        *,
        generator: Generator | None,
        cond: TextConditioning | None = None,
        encode_options: Mapping[str, Any] | None = None,
        images_per_prompt: int = 1,
        request_id: str | None = None,
        context: Mapping[str, Any] | None = None,
        unscorable: str | None = None,
    ) -> tuple[GuardReport, Release]:
        """One guarded generation, judge -> act -> conclude: returns the report and what was released.
        ``unscorable`` says why the front end knows the request cannot be scored (``judge``)."""
        with request_span(self.spans, len(prompts)):
            report, scored = self.judge(prompts, cond=cond, encode_options=encode_options, mode="generate",
                                        request_id=request_id, context=context, unscorable=unscorable)
            return report, self.act(report, scored, generator, images_per_prompt=images_per_prompt)

    def act(
        self, report: GuardReport, cond: TextConditioning | None, generator: Generator | None, *,
        images_per_prompt: int = 1,
    ) -> Release:
        """Carry out ``report``'s decisions (made by ``judge`` in ``generate`` mode) and write the outcome records.

        ``cond`` is the conditioning ``judge`` returned (one row per prompt). ``generator`` generates for the
        rewrite ladder, its verification and the release; None where the front end generates elsewhere (a
        conditioning node): then prompts pass on as decided, and a rewrite that needs verification takes its
        fallback. Returns what was released.
        """
        plan = report.plan(self.policy)
        if plan.blocked_whole:
            return self._refuse(report)
        started = time.perf_counter()
        state: LadderState | None = None
        if cond is not None and any(report.decisions[i].action == "rewrite" for i in plan.generate):
            state = self._rewrite(report, cond, generator, images_per_prompt)
            plan = report.plan(self.policy)
            if plan.blocked_whole:
                return self._refuse(report, latency_generation_ms=ms_since(started))
        if generator is None:
            self._conclude(report, plan, latency_generation_ms=ms_since(started))
            return Release(cond=_released_conditioning(cond, state, report))
        try:
            with generate_span(self.spans, report.request_id, len(plan.generate)):
                result = self._release(report, cond, state, generator, images_per_prompt)
        except BaseException as error:
            plan = report.plan(self.policy)
            outcomes: dict[int, Outcome] = dict.fromkeys(plan.generate, "failed") | dict.fromkeys(plan.dropped,
                                                                                                   "dropped")
            for index in plan.generate:
                report.errors.setdefault(index, error_info(error))
            self._write_outcomes(report, outcomes, ms_since(started))
            raise
        if result is None:
            return self._refuse(report, latency_generation_ms=ms_since(started))
        self._conclude(report, report.plan(self.policy), latency_generation_ms=ms_since(started))
        return Release(output=result.output, cond=_released_conditioning(cond, state, report))

    def _rewrite(
        self, report: GuardReport, cond: TextConditioning, generator: Generator | None, per: int
    ) -> LadderState | None:
        """The rewrite ladders of the call's ``rewrite`` prompts; any failure on the way is their fallback."""
        kept = list(report.plan(self.policy).generate)
        by_index = {d.prompt_index: d for d in report.decisions}
        asked = [i for i in kept if by_index[i].action == "rewrite"]
        with rewrite_span(self.spans, report.request_id, len(asked)) as current:
            if self.scorer is None:
                return None
            try:
                with self.lock, redacted_library_logs(self.scorer.adapter, self.hashes_prompts):
                    latents = None
                    if generator is not None:
                        noise = generator.initial_noise()
                        latents = noise[[i * per + k for i in kept for k in range(per)]]
                    decided, state = run_ladder(
                        self.scorer, self.policy, [by_index[i] for i in kept], cond.select(kept), latents,
                        images_per_prompt=per, generate=generator, prompts=kept,
                        threshold=lambda verify: self._verification_threshold(verify, generator),
                        seed=self.policy.scoring.noise_seed, results=report.mitigations,
                        texts=[report.prompts[i] if i < len(report.prompts) else None for i in kept],
                        encode_options=report.encode_options,
                    )
            except Exception as error:
                message = f"rewrite failed: {type(error).__name__}: {error}"
                log_event("rewrite_failed", level="warning", request_id=report.request_id,
                          error=type(error).__name__)
                for index in asked:
                    by_index[index] = self._fall_back(by_index[index], message)
                    report.errors[index] = error_info(error)
                report.decisions = [by_index[d.prompt_index] for d in report.decisions]
                finish_rewrite(current, [report.mitigations[i] for i in asked if i in report.mitigations],
                               report.decisions)
                return None
            for decision in decided:
                result = report.mitigations.get(decision.prompt_index)
                if result is not None and decision.mitigation is None:
                    decision = decision.model_copy(update={"mitigation": result})
                by_index[decision.prompt_index] = decision
            report.decisions = [by_index[d.prompt_index] for d in report.decisions]
            finish_rewrite(current, [report.mitigations[i] for i in sorted(report.mitigations)], report.decisions)
        state.prompts = kept
        return state

    def _fall_back(self, decision: Decision, message: str) -> Decision:
        """A rewrite that could not be carried out: the rule's fallback, else the policy's ``on_error``."""
        settings = decision.rewrite
        if settings is None:
            return decide_on_error(self.policy, decision.prompt_index, message, score=decision.score)
        return decision.model_copy(update={"action": settings.fallback,
                                           "reason": f"{decision.reason}; {message}; fallback: {settings.fallback}"})

    def _verification_threshold(self, verify: VerifySettings, generator: Generator | None) -> float:
        """The probe-similarity threshold ``verify`` asks for: absolute, or read off the verification calibration
        (the calibration profile's own, else measured once with ``generator`` at its call settings)."""
        if verify.max_similarity is not None:
            return verify.max_similarity
        measure = None
        if generator is not None and self.scorer is not None:
            def measure():
                return auto_verification(self.scorer, generator, verify)
        key = (verify.probes, verify.probe_steps, *generation_settings(generator))
        verification = self.calibrations.verification(key, measure)
        if (verification.probes, verification.probe_steps) != (verify.probes, verify.probe_steps):
            raise CalibrationMismatch(
                f"the verification calibration was measured with {verification.probes} probes of "
                f"{verification.probe_steps} steps; the policy asks for {verify.probes} of {verify.probe_steps}"
            )
        return verification.threshold_at_fpr(verify.above_fpr, verify.against)

    def _release(
        self, report: GuardReport, cond: TextConditioning | None, state: LadderState | None, generator: Generator,
        per: int,
    ) -> GenerationResult | None:
        """Generate what the plan releases; a rewritten image is checked again before it goes out. A failure of a
        job that holds rewritten prompts gives them their fallback and tries once more without them; None when
        the call ends up refused."""
        for attempt in range(2):
            plan = report.plan(self.policy)
            if plan.blocked_whole:
                return None
            job, rewritten = self._release_job(report, plan, cond, state, per)
            reuse = state is not None and state.last is not None and list(plan.generate) == state.prompts
            try:
                with self.lock, redacted_library_logs(getattr(self.scorer, "adapter", None), self.hashes_prompts):
                    result = state.last if reuse else generator(job)
            except Exception as error:
                if attempt or not rewritten:
                    raise
                message = f"generating the rewritten image failed: {type(error).__name__}: {error}"
                self._fall_back_after_release(report, state, rewritten, message, error)
                continue
            failed = state.still_verified(result, job.prompts, per) if state is not None and rewritten else []
            if not failed:
                return result
            message = "a verified rewrite did not pass verification again when generated for release"
            self._fall_back_after_release(report, state, failed, message, None)
        return None

    def _release_job(
        self, report: GuardReport, plan: BatchPlan, cond: TextConditioning | None, state: LadderState | None,
        per: int,
    ) -> tuple[GenerationJob, list[int]]:
        """The release job of ``plan`` and the prompts in it that carry a verified rewrite."""
        keep = list(plan.generate)
        if state is None:
            rows = cond.select(keep) if cond is not None else None
            return GenerationJob(cond=rows, latents=None, images_per_prompt=per, prompts=keep, kind="release",
                                 keep_latents=False), []
        positions = [state.prompts.index(i) for i in keep]
        images = [p * per + k for p in positions for k in range(per)]
        guidance = {new * per + k: state.guidance[p * per + k] for new, p in enumerate(positions)
                    for k in range(per) if p * per + k in state.guidance}
        rewritten = [i for i in keep if (r := report.mitigations.get(i)) is not None and r.verified]
        job = GenerationJob(cond=state.cond.select(positions), latents=state.latents[images], images_per_prompt=per,
                            prompts=keep, guidance=guidance, kind="release", keep_latents=bool(rewritten))
        return job, rewritten

    def _fall_back_after_release(self, report: GuardReport, state: LadderState | None, prompts: Sequence[int],
                                 message: str, error: BaseException | None) -> None:
        """The rewritten ``prompts`` could not be released: their fallback, and their original inputs back."""
        by_index = {d.prompt_index: d for d in report.decisions}
        for index in prompts:
            by_index[index] = self._fall_back(by_index[index], message)
            report.errors[index] = error_info(error if error is not None else message)
            if index in report.mitigations:
                report.mitigations[index].verified = False
                report.mitigations[index].released = None
                report.mitigations[index].note = message
            if state is not None:
                state.restore(state.prompts.index(index))
        report.decisions = [by_index[d.prompt_index] for d in report.decisions]

    # ------------------------------------------------------------------ concluding

    def _refuse(self, report: GuardReport, latency_generation_ms: float | None = None) -> Release:
        """The call generates nothing: every prompt's outcome is ``withheld`` or ``blocked`` (``block_mode``)."""
        report.blocked = True
        report.generated = []
        report.dropped = [d.prompt_index for d in report.decisions]
        report.withheld = self.policy.block_mode == "withhold"
        outcome: Outcome = "withheld" if report.withheld else "blocked"
        self._write_outcomes(report, dict.fromkeys(report.dropped, outcome), latency_generation_ms)
        return Release()

    def _conclude(self, report: GuardReport, plan: BatchPlan, latency_generation_ms: float | None) -> None:
        """What was generated: dropped, rewritten (released after verification) or generated, per prompt."""
        report.generated, report.dropped = list(plan.generate), list(plan.dropped)
        outcomes: dict[int, Outcome] = {}
        for decision in report.decisions:
            index = decision.prompt_index
            rewrite = report.mitigations.get(index)
            if index in plan.dropped:
                outcomes[index] = "dropped"
            elif rewrite is not None and rewrite.verified and decision.action == "rewrite":
                outcomes[index] = "rewritten"
            else:
                outcomes[index] = "generated"
        self._write_outcomes(report, outcomes, latency_generation_ms)

    def _write_outcomes(self, report: GuardReport, outcomes: Mapping[int, Outcome],
                        latency_generation_ms: float | None) -> None:
        """One outcome record per prompt, chained to its decision record. The decision was on disk before anything
        was done, so a log that fails now does not undo the action: the report says so and a warning is raised."""
        report.outcomes.update(outcomes)
        report.latency_generation_ms = latency_generation_ms
        try:
            self.recorder.outcomes(report.request_id, report.decisions, outcomes, written=report.records,
                                   rewrites=report.mitigations, latency_generation_ms=latency_generation_ms,
                                   errors=report.errors, context=report.context)
        except AuditUnavailable as failure:
            report.audit_error = str(failure)
            warnings.warn(f"memguard: request {report.request_id}: {report.audit_error}", stacklevel=4)
            log_event("audit_unwritable", level="error", request_id=report.request_id, error=str(failure))

    def close(self) -> None:
        """Close the audit log (reopened if the core is used again)."""
        self.recorder.close()

    def __repr__(self) -> str:
        return f"GuardCore({self.model_class}, policy={self.policy.name!r} v{self.policy.version})"


def _released_conditioning(cond: TextConditioning | None, state: LadderState | None,
                           report: GuardReport) -> TextConditioning | None:
    """``cond`` with the rows of released rewrites replaced by their rewritten embeddings."""
    if cond is None or state is None:
        return cond
    out = cond.clone()
    for position, index in enumerate(state.prompts):
        rewrite = report.mitigations.get(index)
        if rewrite is None or not rewrite.met or report.decisions[index].action != "rewrite":
            continue
        out.embeds[index] = state.cond.embeds[position].to(out.embeds.device, out.embeds.dtype)
        if out.pooled is not None and state.cond.pooled is not None:
            out.pooled[index] = state.cond.pooled[position].to(out.pooled.device, out.pooled.dtype)
    return out
