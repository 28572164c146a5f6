"""``Guard``: a diffusers pipeline whose every call is judged (``GuardCore``) before it generates."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .actions import BatchPlan, MemorizationBlocked, warn_for
from .audit import AuditLogger
from .audit.record import Outcome
from .calibration import CalibrationProfile
from .core import GuardCore, GuardReport, ms_since
from .policy import Decision, Policy
from .redaction import redacted_library_logs
from .scoring import PipelineAdapter, Scorer, TextConditioning, validate_prompts

__all__ = ["Guard", "GuardedOutput"]

#: Keywords diffusers pipelines take through ``**kwargs`` (deprecated callbacks); any other unknown one is refused.
_PIPELINE_KWARGS = ("callback", "callback_steps")


@dataclass
class GuardedOutput:
    """What a guarded call returns: the images (as the pipeline returned them) and the guard's report.

    ``output`` is the pipeline's own output object (``None`` when the request was withheld), for fields
    beyond ``images``.
    """

    images: Any
    memguard: GuardReport
    output: Any = None

    @property
    def nsfw_content_detected(self) -> Any:
        return getattr(self.output, "nsfw_content_detected", None)

    @property
    def withheld(self) -> bool:
        return self.memguard.withheld


#: Kept for callers of 0.1, whose withheld results had this name.
WithheldOutput = GuardedOutput


class Guard:
    """Wraps a diffusers text-to-image pipeline so that every call is judged before generation.

    >>> with Guard(pipe, policy="strict") as guard:
    ...     out = guard(prompt="a watercolor fox", num_inference_steps=30)
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
        policy: str | os.PathLike | Policy | Mapping[str, Any] = "balanced",
        *,
        audit_path: str | os.PathLike | None = None,
        calibration: CalibrationProfile | str | os.PathLike | None = None,
        model_id: str | None = None,
        source: str = "python",
    ) -> None:
        self.pipe = pipe
        self.core = GuardCore(
            pipe, policy, audit_path=audit_path, calibration=calibration, model_id=model_id, source=source
        )
        self._call_signature = inspect.signature(pipe.__call__) if callable(pipe) else None
        if self._call_signature is not None:
            self.__signature__ = self._call_signature

    # ------------------------------------------------------------------ the core's state, read-only

    @property
    def policy(self) -> Policy:
        return self.core.policy

    @property
    def scorer(self) -> Scorer | None:
        return self.core.scorer

    @property
    def setup_error(self) -> Exception | None:
        return self.core.setup_error

    @property
    def audit(self) -> AuditLogger:
        return self.core.audit

    @property
    def calibration(self) -> CalibrationProfile | None:
        return self.core.calibration

    @property
    def model_id(self) -> str:
        return self.core.model_id

    @property
    def model_class(self) -> str:
        return self.core.model_class

    @property
    def _pipeline_adapter(self) -> PipelineAdapter | None:
        adapter = self.scorer.adapter if self.scorer is not None else None
        return adapter if isinstance(adapter, PipelineAdapter) else None

    # ------------------------------------------------------------------ verdicts

    def check(self, prompt: str, **encode_options: Any) -> Decision:
        """The policy's verdict for one prompt, audited, without generating."""
        return self.check_many([prompt], **encode_options)[0]

    def check_many(self, prompts: Sequence[str], **encode_options: Any) -> list[Decision]:
        """Verdicts for many prompts, scored in batches and each audited; nothing is generated."""
        report, _ = self.core.judge(validate_prompts(prompts), encode_options=encode_options, mode="check")
        return report.decisions

    # ------------------------------------------------------------------ generating

    def __call__(self, *args: Any, **kwargs: Any) -> GuardedOutput | tuple:
        """Call the pipeline as usual; the guard judges and audits first.

        Takes exactly the pipeline's arguments and refuses what the pipeline would refuse, before
        anything is scored. Returns a ``GuardedOutput`` (with ``return_dict=False``, the pipeline's tuple
        with the ``GuardReport`` appended). Raises ``MemorizationBlocked`` when the policy blocks, or
        returns a ``GuardedOutput`` without images if its ``block_mode`` is ``withhold``.
        """
        arguments = self._bind(args, kwargs)
        prompts, cond = self._request_prompts(arguments)
        adapter = self._pipeline_adapter
        encode_options = adapter.encode_options(arguments) if adapter is not None else {}
        report, cond = self.core.judge(prompts, cond=cond, encode_options=encode_options, mode="generate")
        noise: torch.Tensor | None = None
        if cond is not None and adapter is not None and not report.plan(self.policy).blocked_whole:
            per_prompt = arguments.get("num_images_per_prompt") or 1
            cond, noise = self.core.rewrite(
                report, cond, images_per_prompt=per_prompt,
                initial_noise=lambda: adapter.prepare_latents(arguments, len(prompts)),
            )
        plan = report.plan(self.policy)
        if plan.blocked_whole:
            return self._refuse(report)
        report.generated, report.dropped = list(plan.generate), list(plan.dropped)
        generation = self._generation_arguments(arguments, plan, cond, noise)
        started = time.perf_counter()
        try:
            with self.core.lock, redacted_library_logs(self.pipe, self.core.hashes_prompts):
                output = self.pipe(**generation)
        except BaseException as error:
            self.core.conclude(report, dict.fromkeys(report.generated, "failed") | dict.fromkeys(plan.dropped,
                               "dropped"), latency_generation_ms=ms_since(started), error=error)
            raise
        self.core.conclude(report, {d.prompt_index: _outcome(d, plan, report) for d in report.decisions},
                           latency_generation_ms=ms_since(started))
        warn_for([d for d in report.decisions if d.prompt_index in plan.generate])
        if isinstance(output, tuple):
            return (*output, report)
        return GuardedOutput(images=getattr(output, "images", None), memguard=report, output=output)

    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, checked against the pipeline's own contract."""
        if self._call_signature is None:
            raise TypeError(f"{self.model_class} is not a callable pipeline; use Guard.check for verdicts only")
        arguments = dict(self._call_signature.bind_partial(*args, **kwargs).arguments)
        extra = arguments.pop("kwargs", None) or {}
        unknown = sorted(set(extra) - set(_PIPELINE_KWARGS))
        if unknown:
            raise TypeError(f"{type(self.pipe).__name__}.__call__() got an unexpected keyword argument {unknown[0]!r}")
        arguments.update(extra)
        adapter = self._pipeline_adapter
        if adapter is not None:
            adapter.check_call(arguments)
        return arguments

    def _request_prompts(self, arguments: dict[str, Any]) -> tuple[list[str | None], TextConditioning | None]:
        prompt = arguments.get("prompt")
        if prompt is not None:
            return validate_prompts(prompt), None
        embeds = arguments.get("prompt_embeds")
        if embeds is None:
            raise ValueError("provide `prompt` or `prompt_embeds`")
        cond = TextConditioning(embeds, arguments.get("pooled_prompt_embeds"), arguments.get("prompt_attention_mask"))
        return [None] * embeds.shape[0], cond

    def _generation_arguments(
        self, arguments: dict[str, Any], plan: BatchPlan, cond: TextConditioning | None, noise: torch.Tensor | None
    ) -> dict[str, Any]:
        generation = dict(arguments)
        keep = list(plan.generate)
        batch = len(plan.generate) + len(plan.dropped)
        adapter = self._pipeline_adapter
        if cond is not None and adapter is not None:
            generation.update(adapter.generation_arguments(cond.select(keep)))
        for name in ("negative_prompt", "negative_prompt_2", "negative_prompt_3"):
            if isinstance(generation.get(name), list) and len(generation[name]) == batch:
                generation[name] = [generation[name][i] for i in keep]
        for name in ("negative_prompt_embeds", "negative_pooled_prompt_embeds", "negative_prompt_attention_mask"):
            value = generation.get(name)
            if isinstance(value, torch.Tensor) and value.shape[0] == batch:
                generation[name] = value[keep]
        per_prompt = generation.get("num_images_per_prompt") or 1
        if noise is not None:  # the call's own noise, unpacked, with rewritten rows replaced
            if plan.dropped:
                noise = noise[[i * per_prompt + k for i in keep for k in range(per_prompt)]]
            generation["latents"] = adapter.latents_argument(noise)
        elif isinstance(generation.get("latents"), torch.Tensor):
            latents = generation["latents"]
            if latents.shape[0] == batch * per_prompt and plan.dropped:
                generation["latents"] = latents[[i * per_prompt + k for i in keep for k in range(per_prompt)]]
        if adapter is not None and cond is not None and arguments.get("prompt") is not None:
            with self.core.lock, redacted_library_logs(self.pipe, self.core.hashes_prompts):
                generation = adapter.per_image_arguments(generation)  # SD3/FLUX: embeddings per image
        return generation

    def _refuse(self, report: GuardReport) -> GuardedOutput:
        report.blocked = True
        report.dropped = [d.prompt_index for d in report.decisions]
        withhold = self.policy.block_mode == "withhold"
        report.withheld = withhold
        outcome: Outcome = "withheld" if withhold else "blocked"
        self.core.conclude(report, {d.prompt_index: outcome for d in report.decisions})
        if withhold:
            return GuardedOutput(images=[], memguard=report)
        raise MemorizationBlocked(report)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Close the audit log (it reopens if the guard is used again)."""
        self.core.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Guard({self.model_class}, policy={self.policy.name!r} v{self.policy.version})"


def _outcome(decision: Decision, plan: BatchPlan, report: GuardReport) -> Outcome:
    if decision.prompt_index in plan.dropped:
        return "dropped"
    mitigation = report.mitigations.get(decision.prompt_index)
    if mitigation is not None and mitigation.met:
        return "rewritten"
    return "generated"
