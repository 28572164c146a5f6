"""SD3 / SD3.5, FLUX.1 (dev, schnell), PixArt-alpha and PixArt-Sigma: the score as docs/scoring.md defines it,
and the generation side the guard relies on (the pipeline's own branches, schedule, latents and errors)."""

import logging
import math

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, FluxPipeline
from reference_score_flow import reference_score_flow

from guard import Scorer, UnsupportedPipelineError, score_prompts
from guard.scoring.adapters import (
    FluxAdapter,
    PixArtAdapter,
    StableDiffusion3Adapter,
    adapter_for,
)
from guard.scoring.profiles import get_profile
from guard.testing import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

PROMPTS = ["a red cat on the beach", "portrait of an old man with a hat, oil painting", "green river at night"]
#: The prompts of the exactness test (two, so a batch of 4 holds several prompts and a batch of 1 does not).
SCORED = PROMPTS[:2]

#: FluxPipeline hard-codes a 128 x 128 native latent (4096 tokens); the exactness tests lower it on their own
#: copies so they run in seconds on a CPU. The stock size is exercised by the schedule and scan-path tests.
FAST_FLUX_SAMPLE_SIZE = 16

BUILDERS = {
    "sd3": lambda: tiny_sd3_pipeline(seed=3),
    "sd3-no-t5": lambda: tiny_sd3_pipeline(seed=4, three_encoders=False),
    "flux-dev": lambda: tiny_flux_pipeline(seed=5),
    "flux-schnell": lambda: tiny_flux_pipeline(seed=6, guidance_embeds=False),
    "pixart-alpha": lambda: tiny_pixart_pipeline("alpha", seed=7),
    "pixart-sigma": lambda: tiny_pixart_pipeline("sigma", seed=8),
}
CASES = list(BUILDERS)
ADAPTERS = {
    "sd3": StableDiffusion3Adapter, "sd3-no-t5": StableDiffusion3Adapter, "flux-dev": FluxAdapter,
    "flux-schnell": FluxAdapter, "pixart-alpha": PixArtAdapter, "pixart-sigma": PixArtAdapter,
}
#: Encode options a call may carry, per family (checked to reach the embeddings the guard generates from).
CALL_OPTIONS = {
    "sd3": {"prompt_3": "a dog in the snow", "clip_skip": 1, "max_sequence_length": 40},
    "sd3-no-t5": {"prompt_2": "a dog", "max_sequence_length": 40},
    "flux-dev": {"prompt_2": "a dog in the snow", "max_sequence_length": 40},
    "flux-schnell": {"max_sequence_length": 40},
    "pixart-alpha": {"clean_caption": False, "max_sequence_length": 50},
    "pixart-sigma": {"max_sequence_length": 60},
}
#: A non-native size per family (PixArt's resolution binning maps it to one of its bins).
OTHER_SIZE = {
    "sd3": (128, 192), "sd3-no-t5": (128, 192), "flux-dev": (96, 160), "flux-schnell": (96, 160),
    "pixart-alpha": (1000, 1500), "pixart-sigma": (200, 300),
}

_PIPES: dict = {}
_REFERENCE: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread_and_quiet_pixart():
    """One intra-op thread: these models are too small to gain from more, and on a shared machine extra
    threads only contend (10x slower). PixArt logs on every encode that bs4/ftfy are missing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logger = logging.getLogger("diffusers.pipelines.pixart_alpha")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)
    torch.set_num_threads(threads)


def fast(pipe):
    if isinstance(pipe, FluxPipeline):
        pipe.default_sample_size = FAST_FLUX_SAMPLE_SIZE
    return pipe


def get_pipe(case):
    if case not in _PIPES:
        _PIPES[case] = fast(BUILDERS[case]())
    return _PIPES[case]


def plain_scores(case, samples):
    if (case, samples) not in _REFERENCE:
        pipe = get_pipe(case)
        profile = get_profile(adapter_for(pipe).default_profile)
        weights = (profile.g_norm, profile.g_cos)
        _REFERENCE[case, samples] = [
            reference_score_flow(pipe, prompt, samples=samples, weights=weights) for prompt in SCORED
        ]
    return _REFERENCE[case, samples]


def generator(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def first_step_calls(pipe, **call):
    """The keyword arguments and outputs of the transformer calls of the first step of ``pipe(**call)``
    (one call; two for FLUX's true-CFG path). Two steps are run: PixArt-alpha's one-step path indexes
    DPM-Solver's output wrongly in diffusers 0.42."""
    calls = capture_transformer_calls(pipe, num_inference_steps=2, **call)
    return calls[: len(calls) // 2]


def capture_transformer_calls(pipe, **call):
    """The keyword arguments and outputs of every transformer call during ``pipe(**call)``."""
    calls = []

    def record(module, args, kwargs, output):
        calls.append(({**dict(zip(("hidden_states",), args)), **kwargs}, output[0]))

    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        pipe(output_type="latent", **call)
    finally:
        handle.remove()
    return calls


def loop_labels(pipe, **call):
    """The timestep label of every transformer call of ``pipe(**call)``; the transformer is replaced by a
    stub that returns zeros, since the labels do not depend on its output."""
    transformer, labels = pipe.transformer, []

    def stub(hidden_states, *args, **kwargs):
        labels.append(kwargs["timestep"].clone())
        out = torch.zeros_like(hidden_states)
        if out.ndim == 4 and transformer.config.out_channels == 2 * transformer.config.in_channels:
            out = torch.cat([out, out], dim=1)
        return (out,)

    transformer.forward = stub
    try:
        pipe(output_type="latent", **call)
    finally:
        del transformer.forward
    return labels


# ---------------------------------------------------------------------------------------------- the score


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("samples", [1, 4])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_fast_path_matches_plain_implementation(case, samples, batch_size):
    pipe = get_pipe(case)
    scorer = Scorer(pipe, samples=samples, batch_size=batch_size)
    first = scorer.score(SCORED)
    again = scorer.score(SCORED[::-1])[::-1]  # the second pass is served from the unconditional cache
    assert isinstance(scorer.adapter, ADAPTERS[case])
    flow = not case.startswith("pixart")
    assert scorer.prediction_space == ("velocity" if flow else "eps")
    for result, cached, prompt, plain in zip(first, again, SCORED, plain_scores(case, samples)):
        norm, cos, score, labels = plain
        assert (result.t_hi, result.t_lo) == labels
        assert result.samples == samples and result.seed == 51 and result.prompt == prompt
        assert result.profile == scorer.adapter.family == case.split("-")[0]
        for got in (result, cached):
            assert got.norm == pytest.approx(norm, abs=1e-5, rel=1e-5)
            assert got.cos == pytest.approx(cos, abs=1e-5)
            assert got.score == pytest.approx(score, abs=1e-5, rel=1e-5)


def test_native_shapes_and_labels_follow_the_design():
    assert get_pipe("sd3").default_sample_size == 32
    assert adapter_for(get_pipe("sd3")).latent_shape == (4, 32, 32)
    stock_flux = tiny_flux_pipeline()
    assert adapter_for(stock_flux).latent_shape == (4, 128, 128)  # FLUX: 128 x vae_scale_factor px, 4096 tokens
    assert adapter_for(stock_flux).default_size() == (1024, 1024)
    for case in ("pixart-alpha", "pixart-sigma"):
        assert Scorer(get_pipe(case)).t_hi == 999 and Scorer(get_pipe(case)).t_lo == 41  # docs/scoring.md
    sd3 = adapter_for(get_pipe("sd3"))
    s_hi, s_lo = sd3.scoring_sigmas(50)
    assert (s_hi * 1000, s_lo * 1000) == pytest.approx(sd3.scoring_timesteps(50))
    assert s_hi == 1.0 and 0 < s_lo < 0.2


@pytest.mark.parametrize("case", CASES)
def test_branches_are_what_the_pipelines_call_feeds_the_transformer(case):
    """u is the pipeline's own unconditional branch for "", c the prompt's, at the first step."""
    pipe, prompt = get_pipe(case), PROMPTS[0]
    adapter = adapter_for(pipe)
    call = {"prompt": prompt, "generator": generator()}
    if case.startswith("flux"):
        call.update(negative_prompt="", true_cfg_scale=2.0)  # FLUX's only unconditional branch
    elif case.startswith("sd3"):
        call.update(negative_prompt="")
    calls = first_step_calls(pipe, **call)
    with torch.no_grad():  # as the pipeline's __call__
        uncond, cond = adapter.unconditional(), adapter.encode([prompt])
    if case.startswith("flux"):
        (cond_kwargs, _), (uncond_kwargs, _) = calls
        for kwargs, branch in ((cond_kwargs, cond), (uncond_kwargs, uncond)):
            assert torch.equal(kwargs["encoder_hidden_states"], branch.embeds)
            assert torch.equal(kwargs["pooled_projections"], branch.pooled)
        guidance = cond_kwargs["guidance"]
        assert (guidance is None) == (case == "flux-schnell")
        if guidance is not None:
            assert torch.equal(guidance, torch.full([1], 3.5))
    else:
        ((kwargs, _),) = calls
        embeds = kwargs["encoder_hidden_states"]
        assert torch.equal(embeds[:1], uncond.embeds) and torch.equal(embeds[1:], cond.embeds)
        if case.startswith("sd3"):
            pooled = kwargs["pooled_projections"]
            assert torch.equal(pooled[:1], uncond.pooled) and torch.equal(pooled[1:], cond.pooled)
        else:
            mask = kwargs["encoder_attention_mask"]
            assert torch.equal(mask[:1], uncond.mask) and torch.equal(mask[1:], cond.mask)
            assert uncond.mask.sum() == 1 and cond.mask.sum() > 1  # "" is just </s>


@pytest.mark.parametrize("case", CASES)
def test_adapter_calls_the_transformer_as_the_pipeline_loop_does(case):
    """Same latents, label and branches as the loop's first step give the loop's own output."""
    pipe, prompt = get_pipe(case), PROMPTS[1]
    adapter = adapter_for(pipe)
    call = {"prompt": prompt, "generator": generator(3)}
    if case.startswith("flux"):
        call.update(negative_prompt="", true_cfg_scale=2.0)
    calls = first_step_calls(pipe, **call)
    with torch.no_grad():
        branches = [adapter.encode([prompt]), adapter.unconditional()]
    if case.startswith("flux"):
        for (kwargs, output), branch in zip(calls, branches):
            latent = adapter.unpack(kwargs["hidden_states"], *adapter.latent_shape[1:])
            with torch.no_grad():
                ours = adapter.predict(latent, kwargs["timestep"], branch)
            assert torch.equal(ours, adapter.unpack(output, *adapter.latent_shape[1:]))
        return
    ((kwargs, output),) = calls
    from guard.scoring.conditioning import TextConditioning

    with torch.no_grad():
        ours = adapter.predict(
            kwargs["hidden_states"], kwargs["timestep"], TextConditioning.cat([branches[1], branches[0]])
        )
    expected = output[:, : adapter.latent_shape[0]]
    assert ours.shape == expected.shape
    assert torch.equal(ours, expected)
    if case == "pixart-alpha":
        added = kwargs["added_cond_kwargs"]
        assert added["resolution"].tolist() == [[1024.0, 1024.0]] * 2 and added["aspect_ratio"].tolist() == [[1.0]] * 2


@pytest.mark.parametrize("case", [*CASES, "flux-dev-stock", "flux-schnell-stock"])
def test_scoring_labels_are_the_loops_labels_at_steps_0_and_47(case):
    """A 50-step call at native size passes the transformer t_hi at step 0 and t_lo at step 47."""
    if case.endswith("-stock"):
        pipe = tiny_flux_pipeline(guidance_embeds=case.startswith("flux-dev"))  # FluxPipeline's own 128 x 128
    else:
        pipe = get_pipe(case)
    if case.startswith("pixart"):
        # PixArt is scored on a DDIM schedule built from its scheduler config, not on its DPM-Solver.
        pipe = type(pipe)(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
        pipe.set_progress_bar_config(disable=True)
    scorer = Scorer(pipe)
    labels = loop_labels(pipe, prompt=PROMPTS[0], num_inference_steps=50, generator=generator())
    assert len(labels) == 50
    assert (scorer.t_hi, scorer.t_lo) == (labels[0][0].item(), labels[47][0].item())
    if case.endswith("-stock"):
        assert scorer.adapter.latent_shape[1:] == (128, 128)


# ---------------------------------------------------------------------------------------------- generation side


@pytest.mark.parametrize("case", CASES)
def test_generation_from_the_scored_embeddings_is_bit_identical(case):
    """The guard's transparency promise: an allowed prompt's image is the plain call's, bit for bit."""
    pipe, prompt = get_pipe(case), PROMPTS[2]
    adapter = adapter_for(pipe)
    call = {"num_inference_steps": 2, "output_type": "latent", **CALL_OPTIONS[case]}
    plain = pipe(prompt=prompt, generator=generator(11), **call).images
    with torch.no_grad():
        cond = adapter.encode([prompt], **adapter.encode_options({"prompt": prompt, **call}))
    guarded = {**call, **adapter.generation_arguments(cond)}
    assert guarded["prompt"] is None and "prompt_embeds" in guarded
    assert torch.equal(pipe(generator=generator(11), **guarded).images, plain)
    assert adapter.encode([prompt]).embeds.shape != cond.embeds.shape  # the call's max_sequence_length was used


@pytest.mark.parametrize("case", CASES)
def test_prepare_latents_is_the_pipelines_own_draw(case):
    pipe = get_pipe(case)
    adapter = adapter_for(pipe)
    height, width = OTHER_SIZE[case]
    call = {"prompt": PROMPTS[:2], "num_images_per_prompt": 2, "height": height, "width": width,
            "num_inference_steps": 2}
    theirs, ours = generator(5), generator(5)
    calls = capture_transformer_calls(pipe, generator=theirs, **call)
    drawn = adapter.prepare_latents({**call, "generator": ours}, batch=2)
    assert torch.equal(theirs.get_state(), ours.get_state())
    first = calls[0][0]["hidden_states"]
    if case.startswith("flux"):
        first = adapter.unpack(first, *drawn.shape[2:])
    assert drawn.shape[0] == 4 and drawn.shape[1] == adapter.latent_shape[0]
    assert torch.equal(first[:4], drawn)  # CFG pipelines batch [uncond, cond]: the first half is the draw
    if case.startswith("pixart"):
        assert (drawn.shape[2] * 8, drawn.shape[3] * 8) != (height, width)  # binned, as the call bins
    # passing them back as latents= reproduces the call
    again = pipe(output_type="latent", generator=generator(99), latents=adapter.latents_argument(drawn), **call)
    plain = pipe(output_type="latent", generator=generator(5), **call)
    assert torch.equal(again.images, plain.images)
    assert torch.equal(adapter.prepare_latents({**call, "latents": adapter.latents_argument(drawn)}, 2), drawn)


@pytest.mark.parametrize("case", CASES)
def test_check_call_raises_the_pipelines_own_errors(case):
    pipe = get_pipe(case)
    adapter = adapter_for(pipe)
    adapter.check_call({"prompt": "a cat"})
    adapter.check_call({"prompt": "a cat", **CALL_OPTIONS[case]})
    arguments = {**adapter.generation_arguments(adapter.encode(["a cat"])), "prompt": "a cat"}
    with pytest.raises(ValueError, match="Cannot forward both `prompt`") as ours:
        adapter.check_call(arguments)
    with pytest.raises(ValueError) as theirs:
        pipe(**arguments)
    assert str(ours.value) == str(theirs.value)
    if case.startswith("sd3"):
        with pytest.raises(ValueError, match="divisible by 16"):
            adapter.check_call({"prompt": "a cat", "height": 100})
    if case.startswith("pixart"):
        adapter.check_call({"prompt": "a cat", "height": 100, "width": 100})  # binned to a valid size first
        with pytest.raises(ValueError, match="divisible by 8"):
            adapter.check_call({"prompt": "a cat", "height": 100, "use_resolution_binning": False})


def test_encode_flags_truncated_prompts():
    long_prompt = " ".join(["red cat"] * 30)
    for case in ("sd3", "flux-dev", "pixart-sigma"):
        adapter = adapter_for(get_pipe(case))
        short, long = adapter.encode(["red cat", long_prompt], max_sequence_length=20).truncated
        assert long and not short


# ---------------------------------------------------------------------------------------------- dtypes, loading


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_scores_are_finite_and_reduced_in_float32(case):
    reference = Scorer(get_pipe(case)).score(PROMPTS)
    pipe = fast(BUILDERS[case]()).to(torch.bfloat16)
    scorer = Scorer(pipe)
    assert scorer.adapter.dtype == torch.bfloat16
    norm, cos = scorer.statistics(scorer.encode(PROMPTS))
    assert norm.dtype == cos.dtype == torch.float32
    for got, full in zip(scorer.score(PROMPTS), reference):
        assert all(math.isfinite(value) for value in (got.norm, got.cos, got.score))
        assert got.norm == pytest.approx(full.norm, rel=0.08)  # random tiny models: bf16 moves them ~3%
        assert got.cos == pytest.approx(full.cos, abs=0.08)
    if case.startswith("flux"):  # FLUX's loop rounds the label in the latents' dtype before dividing by 1000
        labels = loop_labels(pipe, prompt=PROMPTS[0], num_inference_steps=50, generator=generator())
        assert (scorer.t_hi, scorer.t_lo) == (labels[0][0].item(), labels[47][0].item())
        assert scorer.t_lo != Scorer(get_pipe(case)).t_lo


@pytest.mark.parametrize("case", CASES)
def test_scan_path_loads_saved_pipelines_and_scores_them_the_same(case, tmp_path):
    """``memguard scan --model DIR`` scores ``from_pretrained(DIR)``: at the pipeline's stock native size."""
    from guard.loading import load_pipeline

    pipe = BUILDERS[case]()
    pipe.save_pretrained(tmp_path)
    prompts = PROMPTS[:1] if case.startswith("flux") else PROMPTS
    in_memory = score_prompts(pipe, prompts)
    if case == "sd3-no-t5":
        loaded = load_pipeline(tmp_path, device="cpu")  # diffusers alone needs text_encoder_3=None passed again
    else:
        loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is type(pipe) and loaded.transformer.dtype == torch.float32
    assert [r.score for r in score_prompts(loaded, prompts)] == pytest.approx(
        [r.score for r in in_memory], abs=1e-5, rel=1e-5
    )


# ---------------------------------------------------------------------------------------------- dispatch, spaces


def test_adapter_for_dispatches_on_transformer_and_pipeline():
    for case, adapter_class in ADAPTERS.items():
        adapter = adapter_for(get_pipe(case))
        assert type(adapter) is adapter_class
        assert adapter.default_profile == adapter.family
        assert "calibrate before relying on it" in get_profile(adapter.default_profile).description
    from diffusers import FluxImg2ImgPipeline

    flux = get_pipe("flux-dev")
    img2img = FluxImg2ImgPipeline(**{k: v for k, v in flux.components.items() if k in (
        "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")})
    with pytest.raises(UnsupportedPipelineError, match="FluxImg2ImgPipeline .*scores FluxPipeline"):
        adapter_for(img2img)

    class UnknownTransformer(torch.nn.Module):
        pass

    class OtherPipeline:
        transformer = UnknownTransformer()

    with pytest.raises(UnsupportedPipelineError, match="OtherPipeline \\(UnknownTransformer\\) is not a model family"):
        Scorer(OtherPipeline())


def test_flow_models_are_scored_in_velocity_space():
    pipe = get_pipe("sd3")
    assert Scorer(pipe, prediction_space="native").prediction_space == "velocity"
    assert Scorer(pipe, prediction_space="velocity").prediction_space == "velocity"
    with pytest.raises(UnsupportedPipelineError, match="flow models are scored in velocity space"):
        Scorer(pipe, prediction_space="eps")
    with pytest.raises(UnsupportedPipelineError, match="velocity"):
        Scorer(get_pipe("pixart-sigma"), prediction_space="velocity")
    adapter = adapter_for(get_pipe("flux-dev"))
    assert adapter.init_noise_sigma == 1.0 and adapter.prediction_type == "flow"
    assert Scorer(get_pipe("pixart-alpha"), prediction_space="native").score(PROMPTS[:1])[0].score == pytest.approx(
        Scorer(get_pipe("pixart-alpha")).score(PROMPTS[:1])[0].score
    )  # eps models: native is eps


def test_fingerprints_differ_across_families_and_encoders():
    prints = {case: adapter_for(get_pipe(case)).fingerprint() for case in CASES}
    assert len(set(prints.values())) == len(CASES)
    assert adapter_for(fast(BUILDERS["sd3"]())).fingerprint() == prints["sd3"]
