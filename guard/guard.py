"""``Guard``: a diffusers pipeline whose every call is judged (``GuardCore``) before it generates."""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .actions import BatchPlan, MemorizationBlocked, warn_for
from .actions.guidance import scheduled_guidance
from .actions.verification import GenerationRequest, GenerationResult
from .audit import AuditLogger
from .audit.record import Outcome
from .calibration import CalibrationProfile
from .core import GuardCore, GuardReport, ms_since
from .policy import Decision, Policy, decide_on_error
from .redaction import redacted_library_logs
from .scoring import Explanation, PipelineAdapter, Scorer, TextConditioning, validate_prompts
from .telemetry import generate_span

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

    def explain(self, prompt: str, *, method: str | None = None, samples: int | None = None,
                **encode_options: Any) -> Explanation:
        """Which words of ``prompt`` drive its memorization score: a weight per word (``Explanation.top()``,
        ``describe()``), by the policy's ``explain.method`` (occlusion unless it says gradient) on all the scorer's
        noise draws. Decides and audits nothing; a policy's ``explain: on_block`` puts explanations in decisions."""
        return self.core.explain(prompt, method=method, samples=samples, encode_options=encode_options)

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
        plan = report.plan(self.policy)
        if plan.blocked_whole:
            return self._refuse(report)
        started = time.perf_counter()
        rewriting = any(d.action == "rewrite" and d.prompt_index in plan.generate for d in report.decisions)
        try:
            with generate_span(self.core, report, len(plan.generate)):
                if rewriting and cond is not None and adapter is not None:
                    output = self._generate_with_ladder(report, arguments, cond, len(prompts))
                    plan = report.plan(self.policy)
                else:
                    with self.core.lock, redacted_library_logs(self.pipe, self.core.hashes_prompts):
                        output = self.pipe(**self._generation_arguments(arguments, plan, cond))
        except BaseException as error:
            self.core.conclude(report, dict.fromkeys(plan.generate, "failed") | dict.fromkeys(plan.dropped, "dropped"),
                               latency_generation_ms=ms_since(started), error=error)
            raise
        if output is None:  # the rewrites' fallbacks block the call
            return self._refuse(report)
        report.generated, report.dropped = list(plan.generate), list(plan.dropped)
        self.core.conclude(report, {d.prompt_index: _outcome(d, plan, report) for d in report.decisions},
                           latency_generation_ms=ms_since(started))
        warn_for([d for d in report.decisions if d.prompt_index in plan.generate])
        if isinstance(output, tuple):
            return (*output, report)
        return GuardedOutput(images=getattr(output, "images", None), memguard=report, output=output)

    def _generate_with_ladder(
        self, report: GuardReport, arguments: dict[str, Any], cond: TextConditioning, batch: int
    ) -> Any:
        """Generate a call with rewrites: the ladder's generations, then the release. Returns the pipeline
        output to release, or None when the rewrites' fallbacks block the call."""
        adapter = self._pipeline_adapter
        per = arguments.get("num_images_per_prompt") or 1
        kept = list(report.plan(self.policy).generate)
        with self.core.lock:
            noise = adapter.prepare_latents(arguments, batch)
        generation = PipelineGeneration(self.pipe, adapter, arguments, kept, noise.shape[1:], lock=self.core.lock,
                                        redact=self.core.hashes_prompts)
        images = [i * per + k for i in kept for k in range(per)]
        state = self.core.rewrite(
            report, cond.select(kept), noise[images], generate=generation, images_per_prompt=per,
            guidance_available=generation.guidance_unavailable(),
        )
        plan = report.plan(self.policy)
        if plan.blocked_whole:
            return None
        if state.last is not None and list(plan.generate) == kept:
            return state.last.output
        rows = [kept.index(i) for i in plan.generate]
        remap = {position * per + k: state.guidance[row * per + k] for position, row in enumerate(rows)
                 for k in range(per) if row * per + k in state.guidance}
        result = generation(GenerationRequest(
            cond=state.cond.select(rows), latents=state.latents[[r * per + k for r in rows for k in range(per)]],
            images_per_prompt=per, rows=rows, guidance=remap,
        ))
        failed = {kept[k] for k in state.still_verified(result, rows, per)}
        if failed:  # never seen; but a release is only made of images that were checked
            message = "a verified rewrite did not pass verification again when generated for release"
            report.decisions = [decide_on_error(self.policy, d.prompt_index, message, score=d.score)
                                if d.prompt_index in failed else d for d in report.decisions]
            return None
        return result.output

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
        self, arguments: dict[str, Any], plan: BatchPlan, cond: TextConditioning | None
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
        latents = generation.get("latents")
        if isinstance(latents, torch.Tensor) and latents.shape[0] == batch * per_prompt and plan.dropped:
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


class PipelineGeneration:
    """The rewrite ladder's generations for one guarded call (``guard.actions.verification.Generate``).

    Each request runs the pipeline with the caller's arguments, the request's embeddings, initial noise and
    per-row guidance schedule, and returns the output with the final latents (read as the scheduler steps
    them, so the caller's own callbacks are untouched). Before each generation the caller's generator is
    put back into the state it had after the call's noise was drawn, so stochastic samplers see the same
    draws as an unguarded call; probes get a private generator and leave the caller's alone.
    """

    def __init__(
        self,
        pipe: Any,
        adapter: PipelineAdapter,
        arguments: dict[str, Any],
        kept: list[int],
        latent_shape: Any,
        *,
        lock: Any = None,
        redact: bool = True,
    ) -> None:
        self.pipe = pipe
        self.adapter = adapter
        self.arguments = arguments
        self.kept = kept
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.redact = redact
        defaults = inspect.signature(pipe.__call__).parameters
        self.steps = int(arguments.get("num_inference_steps") or defaults["num_inference_steps"].default)
        scale = arguments.get("guidance_scale")
        self.guidance_scale = float(scale if scale is not None else defaults["guidance_scale"].default)
        self._generator_states = _generator_states(arguments.get("generator"))

    def guidance_unavailable(self) -> str | None:
        """Why this call's guidance cannot be scheduled (None when it can)."""
        if not self.adapter.classifier_free_guidance:
            return f"{self.adapter.model_class} is guidance-distilled: its calls have no classifier-free guidance"
        if self.guidance_scale <= 1.0:
            return "the call's guidance_scale is <= 1: there is no classifier-free guidance to schedule"
        return None

    def __call__(self, request: GenerationRequest) -> GenerationResult:
        adapter, pipe = self.adapter, self.pipe
        rows = list(request.rows) if request.rows is not None else list(range(len(request.cond)))
        indices = [self.kept[r] for r in rows]
        arguments = dict(self.arguments)
        arguments.update(adapter.generation_arguments(request.cond))
        batch = len(self.kept)
        for name in ("negative_prompt", "negative_prompt_2", "negative_prompt_3"):
            value = self.arguments.get(name)
            if isinstance(value, list) and len(value) != len(indices):
                arguments[name] = [value[i] for i in indices] if len(value) >= max(indices) + 1 else value
        for name in ("negative_prompt_embeds", "negative_pooled_prompt_embeds", "negative_prompt_attention_mask"):
            value = self.arguments.get(name)
            if isinstance(value, torch.Tensor) and value.shape[0] >= batch and value.shape[0] != len(indices):
                arguments[name] = value[indices]
        arguments["num_images_per_prompt"] = request.images_per_prompt
        arguments["latents"] = adapter.latents_argument(request.latents.to(adapter.device, adapter.embeds_dtype()))
        if request.steps is not None:
            arguments["num_inference_steps"] = request.steps
        if request.probe:
            arguments.update(output_type="latent", return_dict=True)
            for name in ("callback_on_step_end", "callback", "callback_steps"):
                arguments.pop(name, None)
            arguments["generator"] = torch.Generator(adapter.device).manual_seed(0)
        else:
            _restore_generators(arguments.get("generator"), self._generator_states)
        with self.lock, redacted_library_logs(pipe, self.redact):
            arguments = adapter.per_image_arguments(arguments)  # SD3/FLUX: embeddings per image
        scheduler = pipe.scheduler
        with self.lock, redacted_library_logs(pipe, self.redact), \
                _final_latents(scheduler) as captured, scheduled_guidance(
                    adapter.denoiser, rows=request.guidance, images=request.latents.shape[0],
                    guidance_scale=self.guidance_scale, schedule=lambda: getattr(scheduler, "timesteps", None)):
            output = pipe(**arguments)
        latents = adapter.unpack_latents(captured["latents"], arguments).float()
        return GenerationResult(output=None if request.probe else output, latents=latents)


@contextlib.contextmanager
def _final_latents(scheduler: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Records what the scheduler's ``step`` returns; the last record is the call's final latents."""
    captured: dict[str, torch.Tensor] = {}
    original = scheduler.step

    def step(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        captured["latents"] = out[0] if isinstance(out, tuple) else out.prev_sample
        return out

    scheduler.step = step
    try:
        yield captured
    finally:
        del scheduler.step


def _generator_states(generator: Any) -> list[torch.Tensor] | None:
    generators = generator if isinstance(generator, list) else [generator]
    if not all(isinstance(g, torch.Generator) for g in generators):
        return None
    return [g.get_state() for g in generators]


def _restore_generators(generator: Any, states: list[torch.Tensor] | None) -> None:
    if states is None:
        return
    for g, state in zip(generator if isinstance(generator, list) else [generator], states):
        g.set_state(state)


def _outcome(decision: Decision, plan: BatchPlan, report: GuardReport) -> Outcome:
    if decision.prompt_index in plan.dropped:
        return "dropped"
    mitigation = report.mitigations.get(decision.prompt_index)
    if mitigation is not None and mitigation.verified and decision.action == "rewrite":
        return "rewritten"
    return "generated"
