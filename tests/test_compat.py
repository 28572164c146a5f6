"""The private parts of diffusers and accelerate memguard relies on (``guard/compat.py``) are still there.

Each test names the function of ``guard.compat`` that would break, so an upgrade that removes or renames one of
them fails here, loudly, instead of deep inside a guarded call.
"""

from __future__ import annotations

import inspect

import pytest
import torch


@pytest.mark.parametrize("name,parameters", [
    ("_pack_latents", ["latents", "batch_size", "num_channels_latents", "height", "width"]),
    ("_unpack_latents", ["latents", "height", "width", "vae_scale_factor"]),
    ("_prepare_latent_image_ids", ["batch_size", "height", "width", "device", "dtype"]),
])
def test_flux_latent_helpers_exist_with_the_signatures_compat_calls(name, parameters):
    from diffusers import FluxPipeline

    method = getattr(FluxPipeline, name, None)
    assert method is not None, f"guard.compat.flux_*: diffusers' FluxPipeline.{name} is gone"
    assert list(inspect.signature(method).parameters) == parameters, f"FluxPipeline.{name} changed its signature"


def test_flux_pack_and_unpack_round_trip():
    from diffusers import FluxPipeline

    from guard.compat import flux_pack, flux_unpack

    pipe = FluxPipeline.__new__(FluxPipeline)
    latents = torch.randn(2, 16, 8, 6)
    packed = flux_pack(pipe, latents)
    assert packed.shape == (2, 4 * 3, 64)
    assert torch.equal(flux_unpack(pipe, packed, 8 * 8, 6 * 8, 8), latents)


def test_pixart_text_preprocessing_exists():
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    for cls in (PixArtAlphaPipeline, PixArtSigmaPipeline):
        method = getattr(cls, "_text_preprocessing", None)
        assert method is not None, f"guard.compat.pixart_text_preprocessing: {cls.__name__}._text_preprocessing is gone"
        assert "clean_caption" in inspect.signature(method).parameters


def test_execution_device_and_offload_hooks(sd_pipe):
    from diffusers import DiffusionPipeline

    from guard.compat import execution_device, offload_hooks

    assert isinstance(inspect.getattr_static(DiffusionPipeline, "_execution_device", None), property), (
        "guard.compat.execution_device: DiffusionPipeline._execution_device is gone")
    assert execution_device(sd_pipe) == torch.device("cpu")
    before = offload_hooks(sd_pipe.unet)
    pytest.importorskip("accelerate")
    import copy

    offloaded = copy.deepcopy(sd_pipe)
    offloaded.enable_model_cpu_offload(device="cpu")
    assert offload_hooks(offloaded.unet) != before, ("guard.compat.offload_hooks: enable_model_cpu_offload no longer "
                                                    "sets _hf_hook or _diffusers_hook, so placement memos go stale")


@pytest.mark.parametrize("kind", ["sd", "pixart"])
def test_final_latents_are_read_through_the_step_callback(sd_pipe, kind):
    """What verification reads: the latents the last denoising step returns, through the public callbacks."""
    from guard.compat import final_latents_arguments

    if kind == "pixart":
        from guard.testing import tiny_pixart_pipeline

        pipe = tiny_pixart_pipeline()
    else:
        pipe = sd_pipe
    arguments = {"prompt": "a red cat", "num_inference_steps": 3, "output_type": "latent",
                 "generator": torch.Generator().manual_seed(0)}
    captured: dict = {}
    seen: list[int] = []
    if kind == "sd":
        arguments["callback_on_step_end"] = lambda p, step, t, kw: seen.append(step) or {}
    plain = pipe(**{**arguments, "generator": torch.Generator().manual_seed(0)}).images
    out = pipe(**{**arguments, **final_latents_arguments(pipe, arguments, captured)}).images
    assert torch.equal(captured["latents"], plain) and torch.equal(out, plain)
    if kind == "sd":
        assert seen == [0, 1, 2, 0, 1, 2]  # the caller's own callback still runs, in both calls
