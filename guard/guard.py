"""``Guard``: score every text-to-image call before generation, decide by policy, act, audit."""

from __future__ import annotations

import dataclasses
import inspect
import os
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .actions import BatchPlan, GuardReport, MemorizationBlocked, plan_batch, warn_for
from .audit import AuditLogger, AuditWriteError, new_request_id
from .calibrator import auto_calibration
from .policy import (
    CalibrationError,
    CalibrationMissing,
    CalibrationProfile,
    Decision,
    Policy,
    decide,
    decide_on_error,
    load_policy,
    match_lists,
)
from .scoring import MemorizationScore, Scorer, TextConditioning, validate_prompts
from .scoring.profiles import ProfileLike


@dataclasses.dataclass
class WithheldOutput:
    """Returned instead of the pipeline's output when a blocked request is withheld rather than raised."""

    images: list
    memguard: GuardReport
    nsfw_content_detected: None = None


class Guard:
    """Wraps a diffusers text-to-image pipeline so that every call is judged before generation.

    >>> guard = Guard(pipe, policy="strict")
    >>> out = guard(prompt="a watercolor fox", num_inference_steps=30)
    >>> out.images[0], out.memguard.decisions[0].action

    Args:
        pipe: the pipeline; a ``guard.scoring.ModelAdapter`` also works for ``check`` alone.
        policy: a shipped policy name (``"strict"``, ``"balanced"``, ``"monitor"``), a YAML path,
            a mapping or a ``Policy``.
        audit_path: where audit records go; overrides ``$MEMGUARD_AUDIT_PATH`` and the policy.
        calibration: a ``CalibrationProfile`` or its file, overriding the policy's ``calibration``.
        model_id: the model's name in audit records (default: the pipeline's ``name_or_path``).

    Pipelines are not thread-safe, so calls through one guard are serialized; audit records from
    any number of threads and processes stay intact and chained.
    """

    def __init__(
        self,
        pipe: Any,
        policy: str | os.PathLike | Policy | dict = "balanced",
        *,
        audit_path: str | os.PathLike | None = None,
        calibration: CalibrationProfile | str | os.PathLike | None = None,
        model_id: str | None = None,
    ) -> None:
        self.pipe = pipe
        self.policy = load_policy(policy)
        self._lock = threading.RLock()
        self._calibration_override = calibration
        self._calibration: CalibrationProfile | None = None
        self.scorer: Scorer | None = None
        self.setup_error: Exception | None = None
        settings = self.policy.scoring
        try:
            self.scorer = Scorer(
                pipe,
                samples=settings.samples,
                seed=settings.noise_seed,
                inference_steps=settings.inference_steps,
                profile=self._profile_spec(),
                prediction_space=settings.prediction_space,
                batch_size=settings.batch_size or 16,
            )
        except Exception as error:  # an unscorable model is an error decision on every call, not a crash
            self.setup_error = error
        adapter = self.scorer.adapter if self.scorer is not None else None
        self.model_class = adapter.model_class if adapter is not None else type(pipe).__name__
        self.model_id = model_id or (adapter.model_id if adapter is not None else None) or self.model_class
        self._audit_path = audit_path
        self._audit: AuditLogger | None = None
        try:
            self.audit  # noqa: B018 - open the log now so a bad path shows up at once, as a warning
        except AuditWriteError as error:
            warnings.warn(f"memguard: {error}; requests will follow on_error ({self.policy.on_error})", stacklevel=2)
        self._call_signature = _call_signature(pipe)
        if self._call_signature is not None:
            self.__signature__ = self._call_signature

    @property
    def audit(self) -> AuditLogger:
        """The audit logger; opened on first use, and retried on each request while it cannot be."""
        if self._audit is None:
            self._audit = AuditLogger.for_policy(
                self.policy, path=self._audit_path, model_id=self.model_id, model_class=self.model_class
            )
        return self._audit

    def _profile_spec(self) -> ProfileLike | None:
        profile = self.policy.profile
        if profile == "auto":
            return None
        if isinstance(profile, str):
            return profile
        return {"name": "policy", "g_norm": profile.g_norm, "g_cos": profile.g_cos}

    # ------------------------------------------------------------------ calibration

    @property
    def calibration(self) -> CalibrationProfile | None:
        """The calibration the policy's relative thresholds use (computed or loaded on first use)."""
        with self._lock:
            if self._calibration is None:
                self._calibration = self._load_calibration()
            return self._calibration

    def _load_calibration(self) -> CalibrationProfile | None:
        override = self._calibration_override
        if isinstance(override, CalibrationProfile):
            return override
        if override is not None:
            return CalibrationProfile.load(override)
        if self.policy.calibration_path is not None:
            return CalibrationProfile.load(self.policy.calibration_path)
        if self.policy.calibration == "auto" and self.policy.uses_relative_thresholds and self.scorer is not None:
            return auto_calibration(self.scorer)
        return None

    # ------------------------------------------------------------------ deciding

    def check(self, prompt: str, **encode_kwargs: Any) -> Decision:
        """The policy's verdict for one prompt, audited, without generating."""
        return self.check_many([prompt], **encode_kwargs)[0]

    def check_many(self, prompts: Sequence[str], **encode_kwargs: Any) -> list[Decision]:
        """Verdicts for many prompts, scored in batches and each audited; nothing is generated."""
        prompts = validate_prompts(prompts)
        request_id = new_request_id()
        started = time.perf_counter()
        decisions, _ = self.decide(prompts, encode_kwargs=encode_kwargs)
        scoring_ms = _ms_since(started)
        return self._audit_or_fail(
            request_id, decisions, prompts, outcome=lambda d: "checked", latency_scoring_ms=scoring_ms
        )

    def decide(
        self,
        prompts: Sequence[str | None],
        *,
        cond: TextConditioning | None = None,
        encode_kwargs: dict[str, Any] | None = None,
    ) -> tuple[list[Decision], TextConditioning | None]:
        """Decide each prompt (lists, score, rules); never raises for scoring problems: they become
        ``on_error`` decisions. Returns the decisions and the conditioning used, for generation."""
        decisions: dict[int, Decision] = {}
        for index, prompt in enumerate(prompts):
            listed = match_lists(self.policy, prompt, index) if prompt is not None else None
            if listed is not None:
                decisions[index] = listed
        if self.scorer is None:
            return self._all_errors(prompts, decisions, f"the guard cannot score this model: {self.setup_error}"), cond
        try:
            with self._lock:
                if cond is None:
                    cond = self.scorer.encode(list(prompts), **(encode_kwargs or {}))
                pending = [i for i in range(len(prompts)) if i not in decisions]
                scores = (
                    self.scorer.score_conditioning(cond.select(pending), [prompts[i] for i in pending], strict=False)
                    if pending
                    else []
                )
        except Exception as error:
            return self._all_errors(prompts, decisions, f"scoring failed: {type(error).__name__}: {error}"), cond
        calibration, calibration_error = self._calibration_or_error()
        for index, score in zip(pending, scores):
            decisions[index] = self._decide_one(prompts[index], score, index, calibration, calibration_error)
        return [decisions[i] for i in range(len(prompts))], cond

    def _all_errors(self, prompts: Sequence[str | None], decided: dict[int, Decision], error: str) -> list[Decision]:
        """Every prompt not already decided by the lists gets the ``on_error`` decision."""
        return [decided.get(i) or decide_on_error(self.policy, i, error) for i in range(len(prompts))]

    def _calibration_or_error(self) -> tuple[CalibrationProfile | None, str | None]:
        if not self.policy.uses_relative_thresholds:
            return None, None
        try:
            calibration = self.calibration
        except Exception as error:
            return None, str(CalibrationMissing(f"calibration unavailable: {error}"))
        if calibration is None:
            return None, str(CalibrationMissing(f"policy {self.policy.name!r} has no calibration for this model"))
        return calibration, None

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

    # ------------------------------------------------------------------ generating

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the pipeline as usual; the guard scores, decides and audits first.

        Returns the pipeline's output with ``.memguard`` (a ``GuardReport``) attached; with
        ``return_dict=False`` the report is appended to the returned tuple. Raises
        ``MemorizationBlocked`` when the policy blocks (or returns ``WithheldOutput`` if its
        ``block_mode`` is ``withhold``).
        """
        if self._call_signature is None:
            raise TypeError(f"{self.model_class} is not a callable pipeline; use Guard.check for verdicts only")
        arguments = dict(self._call_signature.bind_partial(*args, **kwargs).arguments)
        arguments.update(arguments.pop("kwargs", {}) or {})
        request_id = new_request_id()
        prompts, cond = self._request_prompts(arguments)
        started = time.perf_counter()
        decisions, cond = self.decide(prompts, cond=cond, encode_kwargs=self._encode_kwargs(arguments))
        report = GuardReport(request_id=request_id, decisions=decisions, latency_scoring_ms=_ms_since(started))
        plan = plan_batch(self.policy, decisions)
        if not plan.blocked_whole and cond is not None:
            decisions, plan = self._rewrite(decisions, plan, cond, arguments, report)
            report.decisions = decisions
        if plan.blocked_whole:
            return self._refuse(report, prompts)
        report.generated, report.dropped = list(plan.generate), list(plan.dropped)
        generation_args = self._generation_arguments(arguments, plan, cond)
        started = time.perf_counter()
        with self._lock:
            output = self.pipe(**generation_args)
        report.latency_generation_ms = _ms_since(started)
        report.decisions = self._audit_or_fail(
            request_id, decisions, prompts,
            outcome=lambda d: _outcome(d, plan, report),
            latency_scoring_ms=report.latency_scoring_ms,
            latency_generation_ms=report.latency_generation_ms,
            extras=lambda d: _mitigation_extras(report, d.prompt_index),
            report=report,
        )
        warn_for([d for d in decisions if d.prompt_index in plan.generate])
        if isinstance(output, tuple):
            return (*output, report)
        output.memguard = report
        return output

    def _request_prompts(self, arguments: dict[str, Any]) -> tuple[list[str | None], TextConditioning | None]:
        prompt = arguments.get("prompt")
        if prompt is not None:
            return validate_prompts(prompt), None
        embeds = arguments.get("prompt_embeds")
        if embeds is None:
            raise ValueError("provide `prompt` or `prompt_embeds`")
        return [None] * embeds.shape[0], TextConditioning(embeds, arguments.get("pooled_prompt_embeds"))

    @staticmethod
    def _encode_kwargs(arguments: dict[str, Any]) -> dict[str, Any]:
        """The arguments the pipeline itself would pass to ``encode_prompt``, so the embeddings are the same."""
        encode: dict[str, Any] = {}
        if arguments.get("clip_skip") is not None:
            encode["clip_skip"] = arguments["clip_skip"]
        attention_kwargs = arguments.get("cross_attention_kwargs") or {}
        if attention_kwargs.get("scale") is not None:
            encode["lora_scale"] = attention_kwargs["scale"]
        if arguments.get("prompt_2") is not None:
            encode["prompt_2"] = arguments["prompt_2"]
        return encode

    def _generation_arguments(
        self, arguments: dict[str, Any], plan: BatchPlan, cond: TextConditioning | None
    ) -> dict[str, Any]:
        generation = dict(arguments)
        keep = list(plan.generate)
        batch = len(plan.generate) + len(plan.dropped)
        if cond is not None:
            kept = cond.select(keep)
            generation.pop("prompt_2", None)  # the embeddings already hold it; pipelines refuse both
            generation.update(prompt=None, prompt_embeds=kept.embeds)
            if kept.pooled is not None:
                generation["pooled_prompt_embeds"] = kept.pooled
        for name in ("negative_prompt", "negative_prompt_2"):
            if isinstance(generation.get(name), list) and len(generation[name]) == batch:
                generation[name] = [generation[name][i] for i in keep]
        for name in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            value = generation.get(name)
            if isinstance(value, torch.Tensor) and value.shape[0] == batch:
                generation[name] = value[keep]
        per_prompt = generation.get("num_images_per_prompt") or 1
        latents = generation.get("latents")
        if isinstance(latents, torch.Tensor) and latents.shape[0] == batch * per_prompt and plan.dropped:
            rows = [i * per_prompt + k for i in keep for k in range(per_prompt)]
            generation["latents"] = latents[rows]
        return generation

    def _rewrite(
        self,
        decisions: list[Decision],
        plan: BatchPlan,
        cond: TextConditioning,
        arguments: dict[str, Any],
        report: GuardReport,
    ) -> tuple[list[Decision], BatchPlan]:
        """Apply the ``rewrite`` action; a rewrite that misses its target takes the rule's fallback."""
        rewrites = [d for d in decisions if d.action == "rewrite" and d.prompt_index in plan.generate]
        if not rewrites:
            return decisions, plan
        from .actions.mitigation import apply_rewrites

        decisions = apply_rewrites(self, decisions, rewrites, cond, arguments, report)
        return decisions, plan_batch(self.policy, decisions)

    def _refuse(self, report: GuardReport, prompts: Sequence[str | None]) -> Any:
        report.blocked = True
        report.dropped = [d.prompt_index for d in report.decisions]
        withhold = self.policy.block_mode == "withhold"
        report.withheld = withhold
        self._audit_or_fail(
            report.request_id, report.decisions, prompts,
            outcome=lambda d: "withheld" if withhold else "blocked",
            latency_scoring_ms=report.latency_scoring_ms,
            extras=lambda d: _mitigation_extras(report, d.prompt_index),
            refusing=True,
        )
        if withhold:
            return WithheldOutput(images=[], memguard=report)
        raise MemorizationBlocked(report)

    # ------------------------------------------------------------------ auditing

    def _audit_or_fail(
        self,
        request_id: str,
        decisions: list[Decision],
        prompts: Sequence[str | None],
        *,
        outcome: Any,
        latency_scoring_ms: float | None = None,
        latency_generation_ms: float | None = None,
        extras: Any = None,
        report: GuardReport | None = None,
        refusing: bool = False,
    ) -> list[Decision]:
        """Write one record per decision; if the log cannot be written, the request follows ``on_error``."""
        try:
            for decision in decisions:
                self.audit.log_decision(
                    decision,
                    prompt=prompts[decision.prompt_index],
                    outcome=outcome(decision),
                    latency_scoring_ms=latency_scoring_ms,
                    latency_generation_ms=latency_generation_ms,
                    extras=extras(decision) if extras else None,
                    request_id=request_id,
                )
        except (AuditWriteError, OSError) as error:
            message = f"audit log not writable: {error}"
            if refusing:
                warnings.warn(f"memguard: request {request_id} refused but not audited: {message}", stacklevel=3)
                return decisions
            fallback = [decide_on_error(self.policy, d.prompt_index, message, score=d.score) for d in decisions]
            if self.policy.on_error != "block":
                warn_for(fallback)
                return fallback
            report = report or GuardReport(request_id=request_id, decisions=fallback)
            report.decisions, report.blocked, report.generated = fallback, True, []
            raise MemorizationBlocked(report) from error
        return decisions

    def __repr__(self) -> str:
        return f"Guard({self.model_class}, policy={self.policy.name!r} v{self.policy.version})"


def _call_signature(pipe: Any) -> inspect.Signature | None:
    """The pipeline's own call signature, so the guard can be called exactly like it."""
    if not callable(pipe):
        return None
    return inspect.signature(pipe.__call__)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


def _outcome(decision: Decision, plan: BatchPlan, report: GuardReport) -> str:
    if decision.prompt_index in plan.dropped:
        return "dropped"
    mitigation = report.mitigations.get(decision.prompt_index)
    if mitigation is not None and mitigation.met:
        return "rewritten"
    return "generated"


def _mitigation_extras(report: GuardReport, index: int) -> dict[str, Any] | None:
    result = report.mitigations.get(index)
    return None if result is None else {"mitigation": result.to_dict()}
