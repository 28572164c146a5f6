"""The two adapter interfaces: what the score needs from a model, and what the guard needs from a pipeline.

``ModelAdapter`` is all the score's formulas (``guard.scoring.scorer``) ever talk to, so a new model
family, or another runtime such as ComfyUI, plugs in by implementing one class. ``PipelineAdapter`` adds
what a front end needs to generate with a diffusers pipeline exactly as the pipeline itself would.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...compat import execution_device, offload_hooks
from ..conditioning import TextConditioning
from ..errors import UnsupportedPipelineError

#: The spaces a score can be measured in. ``eps``: noise prediction (any discrete-time model);
#: ``native``: the model's own output (reproduces the reference code for v-prediction models);
#: ``velocity``: rectified-flow models' own output (docs/scoring.md: flow models are scored in velocity space).
SCORE_SPACES = ("eps", "native", "velocity")


class ModelAdapter(ABC):
    """The handful of operations the memorization score needs from a model."""

    model_class: str
    model_id: str
    #: ``sd1``, ``sd2``, ``sdxl``, ``sd3``, ``flux``, ``pixart``, ...: how the model is scored and profiled.
    family: str
    #: ``epsilon``, ``v_prediction`` or ``flow`` (velocity of rectified flow).
    prediction_type: str
    default_profile: str
    #: The unpacked latent shape ``(C, H, W)`` at the model's native size.
    latent_shape: tuple[int, int, int]
    #: Scale of the initial noise (discrete schedulers' ``init_noise_sigma``; 1 for flow models).
    init_noise_sigma: float = 1.0
    #: Whether token position 0 of ``embeds`` is a CLIP BOS token (SD, SDXL, SD3), which carries no prompt
    #: content and which embedding mitigation leaves alone; T5-only embeddings (FLUX, PixArt) have none.
    leading_bos: bool = True

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @abstractmethod
    def scoring_timesteps(self, inference_steps: int) -> tuple[float, float]:
        """``(t_hi, t_lo)``: the timestep labels the model is called with at the two scoring steps."""

    @abstractmethod
    def encode(self, prompts: Sequence[str], **encode_kwargs: Any) -> TextConditioning:
        """Conditional embeddings of ``prompts``, exactly as the model's pipeline would compute them."""

    @abstractmethod
    def unconditional(self) -> TextConditioning:
        """The unconditional branch the score compares against (batch of one)."""

    @abstractmethod
    def predict(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        """The model's raw output for unpacked latents ``[B, C, H, W]``; one timestep label per row."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A stable id of the weights and the schedule, for caching and checking calibrations per model."""

    def score_space(self, requested: str = "auto") -> str:
        """The space scores are measured in, for a policy's ``prediction_space`` (``auto``, ``eps``, ``native``)."""
        if requested == "auto":
            return "eps"
        if requested not in ("eps", "native"):
            raise UnsupportedPipelineError(f"{self.model_class} cannot be scored in {requested!r} space")
        return requested

    def to_score_space(
        self, raw: torch.Tensor, sample: torch.Tensor, timestep: float, space: str
    ) -> torch.Tensor:
        """``raw`` (from ``predict`` on ``sample`` at ``timestep``) in the score's space; float32 in, float32 out."""
        return raw

    def norm_scale(self, space: str, timestep: float) -> float:
        """A constant factor on the guidance norm at ``timestep`` (the reference's v-prediction norm)."""
        return 1.0

    def cache_token(self) -> object:
        """Identity of the underlying network, so cached predictions are never reused across models."""
        return id(self)


def _has_default(parameter: inspect.Parameter) -> bool:
    return parameter.default is not inspect.Parameter.empty


def weights_digest(module: torch.nn.Module, values_per_tensor: int = 256) -> str:
    """Hash of every parameter's name, shape and first values: cheap, and distinct across fine-tunes."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in module.named_parameters():
            digest.update(name.encode())
            digest.update(str(tuple(param.shape)).encode())
            head = param.detach().reshape(-1)[:values_per_tensor].to("cpu", torch.float32)
            digest.update(head.numpy().tobytes())
    return digest.hexdigest()


def schedule_json(config: Mapping[str, Any], keys: Sequence[str]) -> str:
    """The parts of a scheduler config that change the score, as canonical JSON."""
    return json.dumps({k: config.get(k) for k in keys}, sort_keys=True, default=str)


class PipelineAdapter(ModelAdapter):
    """A diffusers text-to-image pipeline: the score's needs, plus generating exactly as the pipeline would.

    Subclasses name the pipeline's denoiser (``denoiser``) and implement ``encode``/``unconditional``/
    ``predict``; the generation side below works from the pipeline's own ``__call__`` defaults,
    ``check_inputs`` and ``prepare_latents``.
    """

    #: Text-encoder attributes of the pipeline that the fingerprint covers.
    text_encoders: tuple[str, ...] = ("text_encoder",)
    #: ``__call__`` arguments that carry prompt text (replaced by embeddings when the guard generates).
    prompt_arguments: tuple[str, ...] = ("prompt",)
    #: Whether a call with ``guidance_scale > 1`` runs the denoiser on an [unconditional; conditional] batch.
    classifier_free_guidance: bool = True

    def __init__(self, pipe: Any, denoiser: torch.nn.Module) -> None:
        self.pipe = pipe
        self.denoiser = denoiser
        self.model_class = type(pipe).__name__
        self.model_id = str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path") or "")
        self._fingerprint: str | None = None
        self._placement_memo: tuple[tuple, tuple[torch.device, torch.dtype]] | None = None

    # ------------------------------------------------------------------ placement

    @property
    def device(self) -> torch.device:
        """The pipeline's execution device (offloading aware), memoized while its placement is unchanged.

        Finding the execution device (``guard.compat.execution_device``) walks every submodule looking for offload
        hooks, which costs milliseconds per call on a full-size model; the placement signature is a handful of
        attribute reads.
        """
        return self._placement()[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._placement()[1]

    def _placement(self) -> tuple[torch.device, torch.dtype]:
        signature = self._placement_signature()
        if self._placement_memo is None or self._placement_memo[0] != signature:
            self._placement_memo = (signature, (execution_device(self.pipe), self.denoiser.dtype))
        return self._placement_memo[1]

    def _placement_signature(self) -> tuple:
        signature = []
        for module in self.pipe.components.values():
            if isinstance(module, torch.nn.Module):
                first = next(module.parameters(), None)
                signature.append((id(module), None if first is None else (first.device, first.dtype),
                                  *offload_hooks(module)))
        return tuple(signature)

    # ------------------------------------------------------------------ identity

    def schedule_identity(self) -> str:
        """What of the scheduler changes the score (subclasses list the keys)."""
        return ""

    def fingerprint(self) -> str:
        """Family, native latent shape, schedule, and the weights of the denoiser and text encoders.

        Configs are not hashed whole: a newer diffusers fills in new default keys, which must not make
        every saved calibration look like another model's.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256(f"{self.family}:{self.prediction_type}:{self.latent_shape}".encode())
            digest.update(self.schedule_identity().encode())
            for name in self.text_encoders:
                encoder = getattr(self.pipe, name, None)
                if isinstance(encoder, torch.nn.Module):
                    digest.update(name.encode() + weights_digest(encoder).encode())
            digest.update(weights_digest(self.denoiser).encode())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def cache_token(self) -> object:
        return id(self.denoiser)

    # ------------------------------------------------------------------ text

    def truncated(self, prompts: Sequence[str], tokenizers: Sequence[tuple[str, int | None]] = ()) -> list[bool]:
        """Per prompt, whether any of ``tokenizers`` (attribute, max length) cuts it off."""
        flags = [False] * len(prompts)
        for tokenizer_name, limit in tokenizers:
            tokenizer = getattr(self.pipe, tokenizer_name, None)
            if tokenizer is None:
                continue
            texts = list(prompts)
            if hasattr(self.pipe, "maybe_convert_prompt"):
                texts = self.pipe.maybe_convert_prompt(texts, tokenizer)
            ids = tokenizer(texts, truncation=False, padding=False).input_ids
            most = limit if limit is not None else tokenizer.model_max_length
            flags = [flag or len(row) > most for flag, row in zip(flags, ids)]
        return flags

    def encode_options(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The ``encode`` options a pipeline call implies (``clip_skip``, LoRA scale, ...), so the
        embeddings scored are those the pipeline would generate from."""
        return {}

    def generation_arguments(self, cond: TextConditioning) -> dict[str, Any]:
        """``__call__`` arguments that hand ``cond`` to the pipeline instead of prompt text."""
        arguments: dict[str, Any] = {name: None for name in self.prompt_arguments}
        arguments["prompt_embeds"] = cond.embeds
        if cond.pooled is not None:
            arguments["pooled_prompt_embeds"] = cond.pooled
        if cond.mask is not None:
            arguments["prompt_attention_mask"] = cond.mask
        return arguments

    def per_image_arguments(self, generation: Mapping[str, Any]) -> dict[str, Any]:
        """The final ``__call__`` arguments once the guard's embeddings (one row per prompt) replace prompt text.

        Unchanged here: SD, SDXL and PixArt repeat given ``prompt_embeds`` ``num_images_per_prompt`` times
        themselves. Families whose ``__call__`` takes given embeddings as one row per image override it.
        """
        return dict(generation)

    # ------------------------------------------------------------------ the pipeline's own call contract

    def call_signature(self) -> inspect.Signature:
        return inspect.signature(self.pipe.__call__)

    def default_size(self) -> tuple[int, int]:
        """The pipeline's default ``(height, width)`` in pixels (its native size)."""
        scale = int(getattr(self.pipe, "vae_scale_factor", 8))
        return self.latent_shape[1] * scale, self.latent_shape[2] * scale

    def call_size(self, arguments: Mapping[str, Any]) -> tuple[Any, Any]:
        """The ``(height, width)`` in pixels the call checks and draws its latents at: the caller's, else the
        default size (PixArt's resolution binning changes it)."""
        height, width = self.default_size()
        return arguments.get("height") or height, arguments.get("width") or width

    def latents_argument(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked initial latents ``[rows, C, h, w]`` as ``__call__``'s ``latents=`` takes them (FLUX packs)."""
        return latents

    def unpack_latents(self, latents: torch.Tensor, arguments: Mapping[str, Any]) -> torch.Tensor:
        """The sampler's latents (as the scheduler steps them) as ``[rows, C, h, w]`` for the call's size."""
        return latents

    def check_call(self, arguments: Mapping[str, Any]) -> None:
        """Raise what the pipeline itself would raise for these arguments, before anything is scored.

        Runs the pipeline's own ``check_inputs`` with ``arguments`` completed by ``__call__``'s defaults
        (and the default size), and rejects a non-positive ``num_images_per_prompt``, which pipelines only
        notice deep inside as a reshape error.
        """
        per_prompt = arguments.get("num_images_per_prompt", 1)
        if per_prompt is not None and (not isinstance(per_prompt, int) or per_prompt < 1):
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {per_prompt!r}")
        check = getattr(self.pipe, "check_inputs", None)
        if check is None:
            return
        values = {
            name: parameter.default
            for name, parameter in self.call_signature().parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }
        values.update(arguments)
        values["height"], values["width"] = self.call_size(arguments)
        accepted = inspect.signature(check).parameters
        check(**{name: values.get(name) for name in accepted if name in values or not _has_default(accepted[name])})

    def call_latent_shape(self, arguments: Mapping[str, Any]) -> tuple[int, int, int]:
        """The unpacked ``(C, h, w)`` of a call's images at its size, as the pipeline's own ``prepare_latents``
        shapes them (one throwaway draw of one image from a private generator)."""
        given = arguments.get("latents")
        if isinstance(given, torch.Tensor):
            return tuple(self.unpack_latents(given, arguments).shape[1:])
        height, width = self.call_size(arguments)
        probe = self._draw_latents(1, int(height), int(width), torch.Generator("cpu").manual_seed(0))
        return tuple(int(v) for v in probe.shape[1:])

    def prepare_latents(self, arguments: Mapping[str, Any], batch: int) -> torch.Tensor:
        """The call's un-scaled initial noise ``[batch * images_per_prompt, C, h, w]``, drawn by the
        pipeline's own ``prepare_latents`` from the caller's generator, as the call itself would draw it.

        The pipeline multiplies given ``latents`` by ``init_noise_sigma`` again, so passing these back as
        ``latents=`` (through ``latents_argument``) reproduces the call bit for bit when that is 1 (DDIM, PNDM,
        DPM-Solver, flow schedulers) and to rounding otherwise.
        """
        given = arguments.get("latents")
        if isinstance(given, torch.Tensor):
            return given
        per_prompt = arguments.get("num_images_per_prompt") or 1
        height, width = self.call_size(arguments)
        self._set_timesteps(arguments)
        latents = self._draw_latents(batch * per_prompt, int(height), int(width), arguments.get("generator"))
        sigma = float(getattr(self.pipe.scheduler, "init_noise_sigma", 1.0))
        return latents if sigma == 1.0 else latents / sigma

    def _set_timesteps(self, arguments: Mapping[str, Any]) -> None:
        """Set the timesteps as the call will before it draws latents: schedulers such as Euler derive
        ``init_noise_sigma`` from them. Flow pipelines draw latents without scheduler state."""
        if self.prediction_type == "flow":
            return
        steps = arguments.get("num_inference_steps") or self.call_signature().parameters["num_inference_steps"].default
        retrieve = getattr(sys.modules.get(type(self.pipe).__module__), "retrieve_timesteps", None)
        if retrieve is not None:
            retrieve(self.pipe.scheduler, steps, self.device, arguments.get("timesteps"), arguments.get("sigmas"))
        else:
            self.pipe.scheduler.set_timesteps(steps, device=self.device)

    def _draw_latents(self, rows: int, height: int, width: int, generator: Any) -> torch.Tensor:
        """Initial latents as the pipeline's ``prepare_latents`` draws them (unpacked ``[rows, C, h, w]``)."""
        return self.pipe.prepare_latents(
            rows, self.latent_shape[0], height, width, self.embeds_dtype(), self.device, generator, None
        )

    def embeds_dtype(self) -> torch.dtype:
        """The dtype of the pipeline's prompt embeddings, which its initial latents are drawn in."""
        for name in reversed(self.text_encoders):
            encoder = getattr(self.pipe, name, None)
            if isinstance(encoder, torch.nn.Module):
                return encoder.dtype
        return self.denoiser.dtype
