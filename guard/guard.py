"""``Guard``: a diffusers pipeline whose every call is judged (``GuardCore``) before it generates."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .actions import warn_for
from .actions.generation import GenerationJob, GenerationResult
from .actions.guidance import scheduled_guidance
from .audit import AuditLogger
from .calibration import CalibrationProfile
from .compat import final_latents_arguments
from .core import GuardCore, GuardReport
from .policy import Decision, Policy
from .redaction import redacted_library_logs
from .scoring import (
    Explanation,
    PipelineAdapter,
    Scorer,
    TextConditioning,
    UnsupportedPipelineError,
    validate_prompts,
)

__all__ = ["Guard", "GuardedOutput", "PipelineGenerator"]

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
        calibration: a ``CalibrationProfile``, its file, or a mode in the policy's words (``"auto"``,
            ``"auto-strict"``, ``"off"``), overriding the policy's ``calibration``.
        model_id: the model's name in audit records (default: the pipeline's ``name_or_path``).
        source: the front end's name in audit records.
        lock: serializes model calls; guards sharing one pipeline share it (default: the guard's own).

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
        lock: Any = None,
    ) -> None:
        self.pipe = pipe
        self.core = GuardCore(
            pipe, policy, audit_path=audit_path, calibration=calibration, model_id=model_id, source=source, lock=lock
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
        returns a ``GuardedOutput`` without images if its ``block_mode`` is ``withhold``. The pipeline's own
        exceptions on an ordinary generation propagate (after a ``failed`` outcome record).
        """
        arguments = self._bind(args, kwargs)
        prompts, cond = self._request_prompts(arguments)
        adapter = self._pipeline_adapter
        encode_options = adapter.encode_options(arguments) if adapter is not None else {}
        generator = PipelineGenerator(self.pipe, adapter, arguments, len(prompts), lock=self.core.lock,
                                      redact=self.core.hashes_prompts)
        report, release = self.core.generate(prompts, generator=generator, cond=cond, encode_options=encode_options,
                                             images_per_prompt=arguments.get("num_images_per_prompt") or 1)
        report.raise_for_block()
        output = release.output
        if report.blocked:
            return GuardedOutput(images=[], memguard=report)
        warn_for([d for d in report.decisions if d.prompt_index in report.generated])
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


class PipelineGenerator:
    """A diffusers pipeline as the core's ``Generator``, at the settings of one guarded call.

    ``release`` jobs run the pipeline with the caller's arguments for the job's prompts (their negative prompts,
    their latents), the job's embeddings, initial noise and guidance schedule: the caller's generator is put back
    into the state the unguarded call would have it in (before the call's noise was drawn when the pipeline draws
    it again, after it when the job brings its own), so an allowed prompt's image is bit-identical and stochastic
    samplers see the same draws. ``internal`` jobs (probes, calibrations) keep only the call's settings (steps,
    guidance, size, ...), use a private generator and leave the caller's callbacks, generator and output alone.
    Final latents are read through the pipeline's step-end callback (chained after the caller's own).

    Without an adapter (a model the guard cannot score), only the caller's own call can be run: a release job of
    the caller's prompts under ``on_error: allow``.
    """

    def __init__(self, pipe: Any, adapter: PipelineAdapter | None, arguments: dict[str, Any], batch: int, *,
                 lock: Any = None, redact: bool = True) -> None:
        self.pipe = pipe
        self.adapter = adapter
        self.arguments = arguments
        self.batch = batch
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.redact = redact
        defaults = inspect.signature(pipe.__call__).parameters
        steps = defaults.get("num_inference_steps")
        self.steps = int(arguments.get("num_inference_steps") or (steps.default if steps is not None else 50))
        scale = arguments.get("guidance_scale")
        default_scale = defaults.get("guidance_scale")
        self.guidance_scale = float(scale if scale is not None else
                                    (default_scale.default if default_scale is not None else 1.0))
        self._states_before = _generator_states(arguments.get("generator"))
        self._states_after: list[torch.Tensor] | None = None
        self._noise: torch.Tensor | None = None
        self._shape: tuple[int, int, int] | None = None

    @property
    def guidance_unavailable(self) -> str | None:
        """Why this call's guidance cannot be scheduled (None when it can)."""
        if self.adapter is None:
            return "the model cannot be scored here"
        if not self.adapter.classifier_free_guidance:
            return f"{self.adapter.model_class} is guidance-distilled: its calls have no classifier-free guidance"
        if self.guidance_scale <= 1.0:
            return "the call's guidance_scale is <= 1: there is no classifier-free guidance to schedule"
        return None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The unpacked ``(C, h, w)`` of the call's images, as the pipeline draws them at the call's size."""
        if self._shape is None:
            self._shape = tuple(int(v) for v in self._require_adapter().call_latent_shape(self.arguments))
        return self._shape

    def initial_noise(self) -> torch.Tensor:
        """The call's own initial noise, drawn once by the pipeline's ``prepare_latents`` from the caller's
        generator (or the caller's ``latents``)."""
        if self._noise is None:
            with self.lock:
                self._noise = self._require_adapter().prepare_latents(self.arguments, self.batch)
            self._states_after = _generator_states(self.arguments.get("generator"))
        return self._noise

    def _require_adapter(self) -> PipelineAdapter:
        if self.adapter is None:
            raise UnsupportedPipelineError(f"{type(self.pipe).__name__} cannot be scored, so it cannot be rewritten")
        return self.adapter

    def __call__(self, job: GenerationJob) -> GenerationResult:
        if job.kind == "internal" or job.cond is not None or job.latents is not None or job.keep_latents:
            self._require_adapter()
        arguments = self._release_arguments(job) if job.kind == "release" else self._internal_arguments(job)
        adapter = self.adapter
        if job.cond is not None:
            arguments.update(adapter.generation_arguments(job.cond))
        arguments["num_images_per_prompt"] = job.images_per_prompt
        if job.steps is not None:
            arguments["num_inference_steps"] = job.steps
        generator = arguments.get("generator")
        if job.latents is not None:
            arguments["latents"] = adapter.latents_argument(job.latents.to(adapter.device, adapter.embeds_dtype()))
            if job.kind == "release":
                _restore_generators(generator, self._states_after or self._states_before)
        elif job.kind == "release":
            _restore_generators(generator, self._states_before)
        if adapter is not None and job.cond is not None:
            with self.lock, redacted_library_logs(self.pipe, self.redact):
                arguments = adapter.per_image_arguments(arguments)  # SD3/FLUX: embeddings per image
        captured: dict[str, torch.Tensor] = {}
        if job.keep_latents:
            arguments.update(final_latents_arguments(self.pipe, arguments, captured))
        with self.lock, redacted_library_logs(self.pipe, self.redact), scheduled_guidance(
                adapter.denoiser if adapter is not None else None, rows=job.guidance,
                images=job.rows * job.images_per_prompt, guidance_scale=self.guidance_scale,
                schedule=lambda: getattr(self.pipe.scheduler, "timesteps", None)):
            output = self.pipe(**arguments)
        latents = None
        if job.keep_latents:
            latents = adapter.unpack_latents(captured["latents"], arguments).float().cpu()
        return GenerationResult(output=output if job.kind == "release" else None, latents=latents)

    def _release_arguments(self, job: GenerationJob) -> dict[str, Any]:
        """The caller's arguments for the job's prompts (all of the call's when they are all of them)."""
        arguments = dict(self.arguments)
        keep = list(job.prompts) if job.prompts is not None else list(range(self.batch))
        if keep == list(range(self.batch)):
            return arguments
        per = self.arguments.get("num_images_per_prompt") or 1
        for name in _PER_PROMPT_TEXT:
            value = arguments.get(name)
            if isinstance(value, list) and len(value) == self.batch:
                arguments[name] = [value[i] for i in keep]
        for name in _PER_PROMPT_TENSORS:
            value = arguments.get(name)
            if isinstance(value, torch.Tensor) and value.shape[0] == self.batch:
                arguments[name] = value[keep]
        latents = arguments.get("latents")
        if isinstance(latents, torch.Tensor) and latents.shape[0] == self.batch * per:
            arguments["latents"] = latents[[i * per + k for i in keep for k in range(per)]]
        return arguments

    def _internal_arguments(self, job: GenerationJob) -> dict[str, Any]:
        """The call's settings only: the negative prompts of the caller's prompts the job names (none for other
        rows), a private generator, no callback of the caller's, final latents without decoding."""
        arguments = {name: value for name, value in self.arguments.items() if name not in _REQUEST_ARGUMENTS
                     and name not in _PER_PROMPT_TEXT and name not in _PER_PROMPT_TENSORS}
        if job.prompts is not None:
            caller = self._release_arguments(job)
            for name in (*_PER_PROMPT_TEXT, *_PER_PROMPT_TENSORS):
                if name.startswith("negative_") and caller.get(name) is not None:
                    arguments[name] = caller[name]
        arguments.update(output_type="latent", return_dict=True,
                         generator=torch.Generator(self._require_adapter().device).manual_seed(0))
        return arguments


#: Per-prompt arguments of a call, selected by the job's prompts.
_PER_PROMPT_TEXT = ("prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3")
_PER_PROMPT_TENSORS = ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                       "negative_pooled_prompt_embeds", "negative_prompt_attention_mask")
#: What belongs to the caller's request rather than to the call's settings.
_REQUEST_ARGUMENTS = ("latents", "generator", "output_type", "return_dict", "callback_on_step_end",
                      "callback_on_step_end_tensor_inputs", "callback", "callback_steps", "num_images_per_prompt",
                      "ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image",
                      "negative_ip_adapter_image_embeds")


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
