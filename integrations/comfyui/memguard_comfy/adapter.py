"""memguard's score computed from ComfyUI's MODEL and CLIP objects, one adapter per model family.

Every adapter calls the model the way ComfyUI's own samplers do: the conditioning goes through the model's
``extra_conds`` (SDXL's ``adm`` vector of pooled text and size embeddings, SD3's and FLUX's pooled ``y``,
FLUX's ``guidance``), and ``BaseModel.apply_model(x, sigma, ...)`` takes a noise level ``sigma`` (not a
timestep) and returns the denoised ``x0``. The adapters turn that back into the space docs/scoring.md defines
the score in, so the formulas stay in ``guard.scoring``:

- **SD 1.x / 2.x and SDXL** (``ModelSamplingDiscrete`` with EPS or V_PREDICTION): the scorer's DDIM timesteps
  (981 and 41) become ``sigma = sqrt((1 - a_t) / a_t)`` through the model's own sampling object; the unit-variance
  sample is fed as ``x = x_t * sqrt(sigma^2 + 1)``, and ``eps = (x - x0) / sigma`` whatever the model predicts.
- **SD3 / SD3.5** (``ModelSamplingDiscreteFlow``) and **FLUX.1** (``ModelSamplingFlux``; schnell:
  ``ModelSamplingDiscreteFlow``): velocity ``v = (x - x0) / sigma`` on the unscaled noise. The two noise levels
  are those of diffusers' ``FlowMatchEulerDiscreteScheduler`` set as the diffusers pipeline's ``__call__`` sets it
  for 50 steps at the native size: a static shift is the model's sampling shift (as patched, e.g. by
  ``ModelSamplingSD3``: a resolution-independent setting, like a diffusers scheduler config); FLUX's dynamic shift
  ``mu`` is computed at the native size as ``FluxPipeline`` computes it, not read from a ``ModelSamplingFlux``
  patch (which workflows set from the generation resolution: the score must not drift with it). FLUX's packing
  into 2x2 patches is done by ComfyUI's own model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from guard.scoring import ModelAdapter, TextConditioning, UnsupportedPipelineError, scoring_timesteps
from guard.scoring.adapters import weights_digest

__all__ = [
    "ComfyUIDiscreteAdapter",
    "ComfyUIFlowAdapter",
    "ComfyUIFluxAdapter",
    "ComfyUIModelAdapter",
    "ComfyUISD3Adapter",
    "ComfyUISDXLAdapter",
    "SizeConditioning",
    "assumed_native",
    "cat_token_lengths",
    "comfy_adapter",
    "comfy_family",
    "conditioning_from_comfy",
    "native_latent_size",
]

# Prediction classes of ``comfy.model_sampling`` whose output ``apply_model`` turns into x0 with
# ``x = x0 + sigma * eps`` on a discrete 1000-step DDPM schedule, and the flow one (x0 = x - sigma * v).
_DISCRETE_PREDICTIONS = ("EPS", "V_PREDICTION")
_OTHER_PREDICTIONS = ("EDM", "CONST", "X0", "IMG_TO_IMG", "COSMOS_RFLOW")
_FLOW_SAMPLINGS = ("ModelSamplingFlux", "ModelSamplingDiscreteFlow")

#: ComfyUI ``model_base`` class -> family. SD 1.x/2.x checkpoints are plain ``BaseModel``s; subclasses such as
#: ``SDXL_instructpix2pix``, ``SDXLRefiner`` or ``Chroma`` (a FLUX derivative) are other models and are refused.
_FAMILIES = {"BaseModel": "sd", "SDXL": "sdxl", "SD3": "sd3", "Flux": "flux"}

#: What ComfyUI does not record about a model: the resolution it was trained at. When the node's ``latent_size`` is
#: 0, the detection latent's side is assumed from what the model does say (its family and prediction type), and
#: the report says so: 512 px for SD 1.x and SD 2.x-base (eps), 768 px for SD 2.x v-prediction, 1024 px for SDXL,
#: SD3 and FLUX (latent sides at the x8 VAE factor all of them use).
_ASSUMED_NATIVE: dict[Any, tuple[int, str]] = {
    ("sd", "EPS"): (64, "512 px, SD 1.x / SD 2.x-base"),
    ("sd", "V_PREDICTION"): (96, "768 px, SD 2.x-v"),
    "sdxl": (128, "1024 px, SDXL"),
    "sd3": (128, "1024 px, SD3"),
    "flux": (128, "1024 px, FLUX.1"),
}

#: FLUX.1-dev's ``__call__`` default guidance scale: the guidance input of the score (docs/scoring.md).
FLUX_GUIDANCE = 3.5
#: FLUX.1's scheduler config for the resolution-dependent shift (``calculate_shift``): mu goes linearly from
#: ``base_shift`` at 256 image tokens to ``max_shift`` at 4096 (1.15 at the native 1024 px, ComfyUI's default).
FLUX_SHIFT = {"base_seq_len": 256, "max_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


def _mro_names(obj: Any) -> list[str]:
    return [cls.__name__ for cls in type(obj).__mro__]


def _prediction_kind(model_sampling: Any) -> str:
    for name in _mro_names(model_sampling):
        if name in _DISCRETE_PREDICTIONS or name in _OTHER_PREDICTIONS:
            return name
    return type(model_sampling).__name__


def comfy_family(model: Any) -> str | None:
    """``sd``, ``sdxl``, ``sd3`` or ``flux`` for a ComfyUI MODEL of a family memguard scores, else None."""
    base = getattr(model, "model", None)
    return _FAMILIES.get(type(base).__name__) if base is not None else None


def native_latent_size(base_model: Any, kind: str, family: str = "sd") -> int:
    """The detection latent's side when the workflow does not set one (see ``assumed_native``)."""
    return assumed_native(kind, family)[0]


def assumed_native(kind: str, family: str = "sd") -> tuple[int, str]:
    """The latent side a model is assumed to have been trained at, and what that assumption is, from the model's
    family and prediction type (ComfyUI records no training resolution): so scores and calibrations do not drift
    with the resolution a workflow generates at."""
    if family in _ASSUMED_NATIVE:
        return _ASSUMED_NATIVE[family]
    return _ASSUMED_NATIVE.get(("sd", kind), _ASSUMED_NATIVE[("sd", "EPS")])


def conditioning_from_comfy(conditioning: Sequence[Sequence[Any]]) -> TextConditioning:
    """The token embeddings (and pooled output, if any) of the first entry of a ComfyUI CONDITIONING list
    (``[[tensor, dict], ...]``)."""
    if not conditioning:
        raise ValueError("the CONDITIONING input is empty")
    embeds = conditioning[0][0]
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
        raise ValueError(f"expected a [batch, tokens, dim] tensor in CONDITIONING, got {type(embeds).__name__}")
    pooled = conditioning[0][1].get("pooled_output") if len(conditioning[0]) > 1 else None
    return TextConditioning(embeds, pooled if isinstance(pooled, torch.Tensor) else None)


def _repeat_to(embeds: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat the token axis up to ``length`` (a multiple): cross-attention over a key sequence repeated
    k times gives exactly the same output, which is how ComfyUI itself batches prompts of 77 and 154 tokens."""
    return embeds.repeat(1, length // embeds.shape[1], 1)


def cat_token_lengths(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``[1, L_i, D]`` embeddings of different token lengths along the batch axis."""
    length = math.lcm(*[part.shape[1] for part in parts])
    return torch.cat([_repeat_to(part, length) for part in parts])


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's size conditioning, in pixels, as ``CLIPTextEncodeSDXL`` puts it into a conditioning entry and
    ``model_base.SDXL.encode_adm`` reads it (diffusers' ``time_ids``: original size, crop, target size)."""

    width: int
    height: int
    crop_w: int = 0
    crop_h: int = 0
    target_width: int = 0
    target_height: int = 0

    KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")

    @classmethod
    def native(cls, side_px: int) -> SizeConditioning:
        """Original = target = the native resolution, crop (0, 0): the definition's default."""
        return cls(side_px, side_px, 0, 0, side_px, side_px)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], native_px: int) -> SizeConditioning | None:
        """The sizes a conditioning entry carries (None if it carries none), completed as ``encode_adm`` completes
        them: crop 0, target = original size; a missing original size is the native one."""
        if not any(key in options for key in cls.KEYS):
            return None
        width = int(options.get("width", native_px))
        height = int(options.get("height", native_px))
        return cls(width, height, int(options.get("crop_w", 0)), int(options.get("crop_h", 0)),
                   int(options.get("target_width", width)), int(options.get("target_height", height)))

    def as_kwargs(self) -> dict[str, int]:
        return {key: int(getattr(self, key)) for key in self.KEYS}


class ComfyUIModelAdapter(ModelAdapter):
    """What every family shares: the MODEL (a ``ModelPatcher``) and CLIP, placement, text encoding through
    ComfyUI's CLIP, conditioning through the model's ``extra_conds``, identity. Use ``comfy_adapter`` to get
    the adapter of a model's family.

    Args:
        model: ComfyUI's MODEL, a ``comfy.model_patcher.ModelPatcher``.
        clip: ComfyUI's CLIP, used to encode prompts (calibration captions) and the empty prompt "" (the
            reference unconditional branch). May be ``None`` when ``unconditional`` is given.
        unconditional: embeddings to use instead of the family's "" branch (e.g. the workflow's negative
            conditioning, when the operator asks for it).
        latent_size: latent side of the detection noise; default: the model's native size.
        model_id: the model's name in audit records.
    """

    family: str
    #: Whether the family's denoiser takes the pooled text embedding (SDXL, SD3, FLUX).
    uses_pooled = False

    def __init__(
        self,
        model: Any,
        clip: Any = None,
        *,
        unconditional: TextConditioning | None = None,
        latent_size: int | None = None,
        model_id: str | None = None,
    ) -> None:
        self.patcher = model
        self.base_model = getattr(model, "model", None)
        if self.base_model is None or not hasattr(self.base_model, "apply_model"):
            raise UnsupportedPipelineError(f"{type(model).__name__} is not a ComfyUI MODEL (ModelPatcher)")
        self.clip = clip
        self._unconditional = unconditional
        if clip is None and unconditional is None:
            raise UnsupportedPipelineError("connect a CLIP (to encode the empty prompt) or use the negative branch")
        if self.uses_pooled and unconditional is not None and unconditional.pooled is None:
            raise UnsupportedPipelineError(
                f"the negative conditioning has no pooled_output, which {self.family} models need"
            )
        config = getattr(self.base_model, "model_config", None)
        self.unet_config: dict[str, Any] = dict(getattr(config, "unet_config", {}) or {})
        self.model_class = f"ComfyUI/{type(config if config is not None else self.base_model).__name__}"
        self.model_id = model_id or self.model_class
        self.sampling = self.model_sampling()
        self.sampling_kind = _prediction_kind(self.sampling)
        channels = int(getattr(getattr(self.base_model, "latent_format", None), "latent_channels", 4))
        self._check_inputs(channels)
        if latent_size:
            side = int(latent_size)
            self.latent_source = f"detection latent {side}x{side} (the node's latent_size)"
        else:
            side, assumption = assumed_native(self.sampling_kind, _FAMILIES.get(type(self.base_model).__name__, "sd"))
            self.latent_source = (f"detection latent {side}x{side} assumed ({assumption}: ComfyUI does not record a "
                                  "model's training resolution; set latent_size if it differs)")
        self.latent_shape = (channels, side, side)
        self._fingerprint: str | None = None

    def reading(self) -> list[str]:
        """What the score took from the model and what it assumed, for the node's report."""
        latent_format = type(getattr(self.base_model, "latent_format", None)).__name__
        return [f"read from the model: {type(self.base_model).__name__}, {type(self.sampling).__name__} with "
                f"{self.sampling_kind} predictions, latent format {latent_format} ({self.latent_shape[0]} channels)",
                self.latent_source]

    def _check_inputs(self, channels: int) -> None:
        """Refuse models that need more than text (inpainting and edit models take a concatenated image)."""
        in_channels = self.unet_config.get("in_channels")
        concat = tuple(getattr(self.base_model, "concat_keys", ()) or ())
        if concat or (in_channels is not None and int(in_channels) != channels):
            raise UnsupportedPipelineError(
                f"{self.model_class} takes {in_channels} input channels for {channels} latent channels (an inpainting "
                "or image-conditioned model): the memorization score is defined for text-to-image models"
            )

    def model_sampling(self) -> Any:
        """The model's sampling object as the sampler will use it: object patches (``ModelSamplingSD3``,
        ``ModelSamplingFlux``, ``ModelSamplingDiscrete`` nodes) included, without loading the model."""
        getter = getattr(self.patcher, "get_model_object", None)
        return getter("model_sampling") if callable(getter) else self.base_model.model_sampling

    # ------------------------------------------------------------------ placement

    def load(self) -> None:
        """Place the model as ComfyUI's samplers do (patches such as LoRAs and sampling patches applied, VRAM
        managed). Called before every model call: another node may have unloaded it since."""
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.patcher])

    @property
    def device(self) -> torch.device:
        return torch.device(getattr(self.patcher, "load_device", "cpu"))

    @property
    def dtype(self) -> torch.dtype:
        manual = getattr(self.base_model, "manual_cast_dtype", None)
        return manual if manual is not None else self.base_model.get_dtype()

    # ------------------------------------------------------------------ text

    def encode_one(self, text: str) -> TextConditioning:
        """One prompt through ComfyUI's CLIP, as ``CLIPTextEncode`` encodes it (tokens and pooled output)."""
        tokens = self.clip.tokenize(text)
        embeds, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        return TextConditioning(embeds, pooled if isinstance(pooled, torch.Tensor) else None)

    def encode(self, prompts: Sequence[str], **encode_kwargs: Any) -> TextConditioning:
        if self.clip is None:
            raise UnsupportedPipelineError("no CLIP connected: prompts cannot be encoded")
        if encode_kwargs:
            raise TypeError(f"ComfyUI's CLIP takes no encode options here, got {sorted(encode_kwargs)}")
        return self.join([self.encode_one(text) for text in prompts])

    def join(self, rows: Sequence[TextConditioning]) -> TextConditioning:
        """Rows of possibly different token lengths as one batch this family's ``predict`` takes, keeping the
        pooled outputs the family uses (others are dropped: nothing optimises or carries what is unused)."""
        if not rows:
            raise ValueError("no conditioning rows")
        embeds = cat_token_lengths([row.embeds for row in rows])
        return TextConditioning(embeds, self._pooled(rows))

    def _pooled(self, rows: Sequence[TextConditioning]) -> torch.Tensor | None:
        if not self.uses_pooled:
            return None
        if any(row.pooled is None for row in rows):
            raise ValueError(
                f"a {self.family} conditioning entry has no pooled_output: encode the prompt with this model's CLIP "
                "(CLIPTextEncode or the family's own text-encode node)"
            )
        return torch.cat([row.pooled for row in rows])

    def unconditional(self) -> TextConditioning:
        if self._unconditional is not None:
            return self.join([self._unconditional.select([0])])
        return self.join([self.encode_one("")])

    # ------------------------------------------------------------------ the model call

    def _transformer_options(self) -> dict[str, Any]:
        options = dict(getattr(self.patcher, "model_options", {}) or {})
        return dict(options.get("transformer_options", {}) or {})

    def _model_conds(self, noise: torch.Tensor, cond: TextConditioning, **extra: Any) -> dict[str, Any]:
        """The keyword inputs of ``apply_model`` as ComfyUI's sampler builds them from a conditioning entry:
        ``extra_conds`` (the model's own ``encode_adm`` etc.), each processed to the batch size."""
        batch = noise.shape[0]
        if cond.embeds.shape[0] != batch:
            raise ValueError(f"{cond.embeds.shape[0]} embeddings for {batch} samples")
        params: dict[str, Any] = {"cross_attn": cond.embeds, "device": noise.device, "noise": noise, **extra}
        if cond.pooled is not None:
            params["pooled_output"] = cond.pooled
        conds = self.base_model.extra_conds(**params)
        if "c_concat" in conds:
            raise UnsupportedPipelineError(f"{self.model_class} needs an image input (c_concat)")
        return {name: value.process_cond(batch_size=batch, device=noise.device, area=None).cond
                for name, value in conds.items()}

    def _apply(self, x: torch.Tensor, sigma: torch.Tensor, cond: TextConditioning, **extra: Any) -> torch.Tensor:
        """Denoised x0 (float32) of the model at noise levels ``sigma`` for ComfyUI-convention inputs ``x``."""
        self.load()
        conds = self._model_conds(x, cond, **extra)
        return self.base_model.apply_model(x, sigma, transformer_options=self._transformer_options(), **conds).float()

    # ------------------------------------------------------------------ identity

    def identity(self) -> list[str]:
        """What besides the weights changes the score: schedule, sizes, guidance (subclasses add theirs)."""
        config = repr(sorted((str(k), repr(v)) for k, v in self.unet_config.items()))
        return [self.model_class, self.family, self.sampling_kind, type(self.sampling).__name__, config,
                repr(self.latent_shape)]

    def fingerprint(self) -> str:
        """Weights (as patched and placed), configs, schedule and the unconditional choice."""
        if self._fingerprint is None:
            self.load()
            digest = hashlib.sha256("\n".join(self.identity()).encode())
            digest.update(weights_digest(self.base_model.diffusion_model).encode())
            encoder = getattr(self.clip, "cond_stage_model", None)
            if isinstance(encoder, torch.nn.Module):
                digest.update(weights_digest(encoder).encode())
            digest.update(b"uncond:" + (b"negative" if self._unconditional is not None else b"empty"))
            if self._unconditional is not None:
                digest.update(self._unconditional.embeds.detach().float().cpu().numpy().tobytes())
                if self._unconditional.pooled is not None:
                    digest.update(self._unconditional.pooled.detach().float().cpu().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def cache_token(self) -> object:
        uncond = None if self._unconditional is None else id(self._unconditional.embeds)
        return (id(self.base_model.diffusion_model), id(self.clip), uncond, id(self.sampling))


class ComfyUIDiscreteAdapter(ComfyUIModelAdapter):
    """SD 1.x / 2.x style models (``BaseModel`` with EPS or V_PREDICTION discrete sampling, no ``adm`` input):
    eps predictions at the scorer's DDIM timesteps; u = "" through the CLIP."""

    prediction_type = "epsilon"
    family = "sd1"

    def __init__(self, model: Any, clip: Any = None, **kwargs: Any) -> None:
        super().__init__(model, clip, **kwargs)
        if self.sampling_kind not in _DISCRETE_PREDICTIONS or not hasattr(self.sampling, "num_timesteps"):
            raise UnsupportedPipelineError(
                f"{self.model_class} uses {self.sampling_kind} sampling ({type(self.sampling).__name__}): the "
                "memorization score of a UNet model is defined for discrete-time eps- or v-prediction sampling"
            )
        self._check_adm()
        if self.family == "sd1" and self.sampling_kind == "V_PREDICTION":
            self.family = "sd2"
        self.default_profile = self.family

    def _check_adm(self) -> None:
        if int(getattr(self.base_model, "adm_channels", 0) or 0) > 0:
            raise UnsupportedPipelineError(
                f"{self.model_class} needs extra (adm) conditioning this adapter does not build (unCLIP-style models)"
            )

    def scoring_timesteps(self, inference_steps: int) -> tuple[int, int]:
        """DDIM, leading spacing, ``steps_offset=1`` over the model's training steps (SD's own scheduler)."""
        config = {
            "num_train_timesteps": int(self.sampling.num_timesteps),
            "timestep_spacing": "leading",
            "steps_offset": 1,
            "set_alpha_to_one": False,
            "clip_sample": False,
        }
        return scoring_timesteps(config, inference_steps)

    def _extra(self) -> dict[str, Any]:
        """Family inputs of ``extra_conds`` besides the text (SDXL: the size conditioning)."""
        return {}

    def predict(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        """eps at integer ``timesteps`` for unit-variance ``sample`` rows, through ComfyUI's ``apply_model``."""
        sampling = self.sampling
        sigma = sampling.sigma(timesteps.to(sampling.sigmas.device)).to(sample.device, torch.float32)
        scale = (sigma**2 + 1.0).sqrt().view(-1, 1, 1, 1)
        x_in = sample.float() * scale
        denoised = self._apply(x_in, sigma, cond, **self._extra())
        return (x_in - denoised) / sigma.view(-1, 1, 1, 1)

    def identity(self) -> list[str]:
        sigmas = self.sampling.sigmas.detach().float().cpu().numpy().tobytes()
        return [*super().identity(), hashlib.sha256(sigmas).hexdigest()]


class ComfyUISDXLAdapter(ComfyUIDiscreteAdapter):
    """SDXL (``model_base.SDXL``: SDXL, SSD-1B, Vega, KOALA configs), EPS or V_PREDICTION.

    The ``adm`` input is built by the model's own ``encode_adm`` from the pooled text and the size conditioning:
    ``size`` (a workflow's ``CLIPTextEncodeSDXL`` sizes), else the native size (original = target = 8 x the
    detection latent side, crop 0). u is what diffusers' SDXL pipeline uses with ``force_zeros_for_empty_prompt``
    (SDXL's default): zero token and pooled embeddings, shaped as the CLIP's encoding of "", at the same sizes.
    """

    family = "sdxl"
    uses_pooled = True

    def __init__(self, model: Any, clip: Any = None, *, size: SizeConditioning | None = None, **kwargs: Any) -> None:
        super().__init__(model, clip, **kwargs)
        self.size = size if size is not None else SizeConditioning.native(8 * self.latent_shape[1])
        self.size_source = "workflow" if size is not None else "native"

    def _check_adm(self) -> None:
        """SDXL's adm is exactly what ``encode_adm`` builds; nothing to refuse."""

    def _extra(self) -> dict[str, Any]:
        return self.size.as_kwargs()

    def unconditional(self) -> TextConditioning:
        if self._unconditional is not None:
            return super().unconditional()
        empty = self.encode_one("")
        if empty.pooled is None:
            raise UnsupportedPipelineError("the CLIP gives no pooled output for \"\": is it an SDXL CLIP?")
        return TextConditioning(torch.zeros_like(empty.embeds), torch.zeros_like(empty.pooled))

    def identity(self) -> list[str]:
        return [*super().identity(), f"size:{self.size.as_kwargs()}"]

    def cache_token(self) -> object:
        return (super().cache_token(), self.size)


class ComfyUIFlowAdapter(ComfyUIModelAdapter):
    """Rectified-flow families (SD3, FLUX): velocity space, unscaled noise, and the two noise levels of diffusers'
    ``FlowMatchEulerDiscreteScheduler`` set as the family's diffusers pipeline sets it for the requested number
    of steps, with the shift of the model's own sampling object.

    Token lengths are not made equal by repetition here (joint attention would see the repeats): rows are padded
    and carry a mask, and ``predict`` calls the model once per token length, as ComfyUI's sampler does for
    conditionings it cannot concatenate.
    """

    prediction_type = "flow"
    init_noise_sigma = 1.0
    uses_pooled = True

    def __init__(self, model: Any, clip: Any = None, **kwargs: Any) -> None:
        super().__init__(model, clip, **kwargs)
        names = _mro_names(self.sampling)
        if self.sampling_kind != "CONST" or not any(name in names for name in _FLOW_SAMPLINGS):
            raise UnsupportedPipelineError(
                f"{self.model_class} uses {self.sampling_kind} sampling ({type(self.sampling).__name__}): "
                f"{self.family} models are scored with rectified-flow sampling (ModelSamplingDiscreteFlow or "
                "ModelSamplingFlux with CONST predictions)"
            )
        self.default_profile = self.family
        self.dynamic_shift = "ModelSamplingFlux" in names
        #: The static shift, or with dynamic shifting the ``mu`` of the native size (see ``native_mu``).
        self.shift = self.native_mu() if self.dynamic_shift else float(self.sampling.shift)
        #: ``model_sampling.timestep(sigma) = sigma * multiplier`` (ModelSamplingFlux: multiplier 1).
        self.multiplier = float(getattr(self.sampling, "multiplier", 1.0)) if not self.dynamic_shift else 1.0
        self._schedule: dict[int, tuple[float, float]] = {}

    def native_mu(self) -> float:
        """FluxPipeline's ``mu`` at the native size: ``calculate_shift`` of the detection latent's token count
        (2x2 patches) with FLUX.1's scheduler config; 1.15 at 1024 px."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        tokens = (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)
        c = FLUX_SHIFT
        return float(calculate_shift(tokens, c["base_seq_len"], c["max_seq_len"], c["base_shift"], c["max_shift"]))

    # ------------------------------------------------------------------ schedule

    def score_space(self, requested: str = "auto") -> str:
        if requested in ("auto", "native", "velocity"):
            return "velocity"
        raise UnsupportedPipelineError(
            f"{self.model_class} is a rectified-flow model, scored in velocity space (in eps space the guidance "
            "vector (1 - s)(v_c - v_u) vanishes at the first step); use prediction_space 'auto' or 'native'"
        )

    def _scheduler(self) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if self.dynamic_shift:
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True, **{
                "base_shift": FLUX_SHIFT["base_shift"], "max_shift": FLUX_SHIFT["max_shift"],
                "base_image_seq_len": FLUX_SHIFT["base_seq_len"], "max_image_seq_len": FLUX_SHIFT["max_seq_len"]})
        # ModelSamplingDiscreteFlow's table has one sigma per training step, as the scheduler's config counts them
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(len(self.sampling.sigmas)), shift=self.shift)

    def _set_timesteps(self, scheduler: Any, inference_steps: int) -> None:
        """As the family's pipeline calls ``retrieve_timesteps`` at the native size."""
        raise NotImplementedError

    def scoring_sigmas(self, inference_steps: int) -> tuple[float, float]:
        """``(s_hi, s_lo)``: the first and third-from-last of the call's noise levels (``sigmas[0]``,
        ``sigmas[steps - 3]``)."""
        if inference_steps < 3:
            raise ValueError(
                f"inference_steps must be at least 3 to have a third-from-last step, got {inference_steps}"
            )
        if inference_steps not in self._schedule:
            scheduler = self._scheduler()
            self._set_timesteps(scheduler, inference_steps)
            sigmas = scheduler.sigmas
            self._schedule[inference_steps] = (float(sigmas[0]), float(sigmas[inference_steps - 3]))
        return self._schedule[inference_steps]

    def scoring_timesteps(self, inference_steps: int) -> tuple[float, float]:
        """The timestep labels ComfyUI's model receives at the two noise levels (``sigma * multiplier``: SD3
        ``1000 s``, FLUX ``s``), which are also the labels diffusers' pipelines pass their transformers."""
        s_hi, s_lo = self.scoring_sigmas(inference_steps)
        labels = torch.tensor([s_hi, s_lo], dtype=torch.float32) * self.multiplier
        return float(labels[0]), float(labels[1])

    # ------------------------------------------------------------------ text

    def join(self, rows: Sequence[TextConditioning]) -> TextConditioning:
        """Rows right-padded with zeros to the longest, with a mask of the real tokens (see the class)."""
        if not rows:
            raise ValueError("no conditioning rows")
        lengths = [int(row.embeds.shape[1]) for row in rows]
        longest = max(lengths)
        if all(length == longest for length in lengths):
            return TextConditioning(torch.cat([row.embeds for row in rows]), self._pooled(rows))
        padded, masks = [], []
        for row, length in zip(rows, lengths):
            embeds = row.embeds
            padded.append(torch.nn.functional.pad(embeds, (0, 0, 0, longest - length)))
            mask = torch.zeros(embeds.shape[0], longest, dtype=torch.long, device=embeds.device)
            mask[:, :length] = 1
            masks.append(mask)
        return TextConditioning(torch.cat(padded), self._pooled(rows), torch.cat(masks))

    # ------------------------------------------------------------------ predictions

    def _extra(self) -> dict[str, Any]:
        return {}

    def predict(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        """Velocity at timestep labels ``timesteps`` (sigma = label / multiplier) for unscaled ``sample`` rows."""
        sigma = (timesteps.to(sample.device, torch.float32) / self.multiplier).view(-1)
        x = sample.float()
        if cond.mask is None:
            denoised = self._apply(x, sigma, cond, **self._extra())
            return (x - denoised) / sigma.view(-1, 1, 1, 1)
        lengths = cond.mask.sum(dim=1).tolist()
        order: list[int] = []
        outputs: list[torch.Tensor] = []
        for length in sorted(set(lengths)):
            rows = [i for i, value in enumerate(lengths) if value == length]
            order.extend(rows)
            part = TextConditioning(cond.embeds[rows, : int(length)],
                                    None if cond.pooled is None else cond.pooled[rows])
            denoised = self._apply(x[rows], sigma[rows], part, **self._extra())
            outputs.append((x[rows] - denoised) / sigma[rows].view(-1, 1, 1, 1))
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return torch.cat(outputs)[inverse.to(sample.device)]

    def identity(self) -> list[str]:
        return [*super().identity(), f"shift:{self.shift!r} dynamic:{self.dynamic_shift} mult:{self.multiplier!r}"]


class ComfyUISD3Adapter(ComfyUIFlowAdapter):
    """SD3 / SD3.5 (``model_base.SD3``, ``ModelSamplingDiscreteFlow``, shift 3 unless patched). The schedule is
    ``StableDiffusion3Pipeline``'s: the scheduler's own 50 timesteps, shifted. u = "" through the CLIP (the
    pipeline's own negative branch for "": token and pooled embeddings)."""

    family = "sd3"

    def __init__(self, model: Any, clip: Any = None, **kwargs: Any) -> None:
        super().__init__(model, clip, **kwargs)
        if self.dynamic_shift:
            raise UnsupportedPipelineError(
                f"{self.model_class} is an SD3 model with FLUX's resolution-dependent sampling (a ModelSamplingFlux "
                "patch): SD3's score is defined with its static shift (ModelSamplingDiscreteFlow / ModelSamplingSD3)"
            )

    def _set_timesteps(self, scheduler: Any, inference_steps: int) -> None:
        scheduler.set_timesteps(inference_steps)


class ComfyUIFluxAdapter(ComfyUIFlowAdapter):
    """FLUX.1 (``model_base.Flux``): dev (``ModelSamplingFlux``, guidance input) and schnell
    (``ModelSamplingDiscreteFlow``, no guidance input). The schedule is ``FluxPipeline``'s: sigmas
    ``linspace(1, 1/N, N)``, time-shifted with the native size's mu (dev: 1.15 at 1024 px, whatever
    ``ModelSamplingFlux`` patch the workflow sets for its generation resolution) or shifted statically (schnell:
    its sampling's shift, 1). Dev is called with guidance 3.5 (the pipeline's default), for the prompt and for
    u = "" alike; the workflow's own guidance is not used, so scores stay comparable. Latents are packed into
    2x2 patches by ComfyUI's model itself."""

    family = "flux"

    def __init__(self, model: Any, clip: Any = None, **kwargs: Any) -> None:
        super().__init__(model, clip, **kwargs)
        self.guidance: float | None = FLUX_GUIDANCE if bool(self.unet_config.get("guidance_embed", False)) else None

    def _set_timesteps(self, scheduler: Any, inference_steps: int) -> None:
        import numpy as np

        sigmas = np.linspace(1.0, 1 / inference_steps, inference_steps)
        scheduler.set_timesteps(sigmas=sigmas, mu=self.shift if self.dynamic_shift else None)

    def _extra(self) -> dict[str, Any]:
        return {"guidance": self.guidance}

    def identity(self) -> list[str]:
        return [*super().identity(), f"guidance:{self.guidance!r}"]


def comfy_adapter(
    model: Any,
    clip: Any = None,
    *,
    unconditional: TextConditioning | None = None,
    latent_size: int | None = None,
    model_id: str | None = None,
    size: SizeConditioning | None = None,
) -> ComfyUIModelAdapter:
    """The adapter for a ComfyUI MODEL's family, recognised by its ``model_base`` class (and checked against its
    sampling class); ``UnsupportedPipelineError`` naming what is accepted otherwise. ``size`` is SDXL's size
    conditioning (ignored by other families)."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "apply_model"):
        raise UnsupportedPipelineError(f"{type(model).__name__} is not a ComfyUI MODEL (ModelPatcher)")
    family = comfy_family(model)
    options = {"unconditional": unconditional, "latent_size": latent_size, "model_id": model_id}
    if family == "sdxl":
        return ComfyUISDXLAdapter(model, clip, size=size, **options)
    if family == "sd3":
        return ComfyUISD3Adapter(model, clip, **options)
    if family == "flux":
        return ComfyUIFluxAdapter(model, clip, **options)
    if family == "sd":
        return ComfyUIDiscreteAdapter(model, clip, **options)
    config = type(getattr(base, "model_config", None)).__name__
    raise UnsupportedPipelineError(
        f"ComfyUI model {type(base).__name__} ({config}) is not a family memguard scores: the node accepts SD 1.x/2.x "
        "(BaseModel, eps or v), SDXL (SDXL, SSD-1B, Vega, KOALA), SD3/SD3.5 and FLUX.1 dev/schnell models"
    )
