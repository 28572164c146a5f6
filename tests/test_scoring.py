import math

import pytest
import torch
from reference_score import reference_score

from guard import NonFiniteScoreError, Scorer, UnsupportedPipelineError, score_prompts
from guard.scoring import detection_noise, scoring_timesteps

PROMPTS = [
    "a red cat on the beach",
    "portrait of an old man with a hat, oil painting",
    "green mountain river at night",
    "a dog",
    "watercolor city street in the morning",
]

CASES = {
    "sd1": ("sd_pipe", "eps", (1.0, 2.0)),
    "sd2-eps": ("sd2_pipe", "eps", (1.0, 0.1)),
    "sd2-native": ("sd2_pipe", "native", (1.0, 0.1)),
    "sdxl": ("sdxl_pipe", "eps", (1.0, 1.0)),
}


_REFERENCE: dict = {}


def plain_scores(pipe, case, samples):
    """The plain formula's results, computed once per model and sample count."""
    if (case, samples) not in _REFERENCE:
        _, space, weights = CASES[case]
        _REFERENCE[case, samples] = [
            reference_score(pipe, prompt, samples=samples, weights=weights, space=space) for prompt in PROMPTS
        ]
    return _REFERENCE[case, samples]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("samples", [1, 4])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_fast_path_matches_plain_formula(request, case, samples, batch_size):
    fixture, space, weights = CASES[case]
    pipe = request.getfixturevalue(fixture)
    scorer = Scorer(pipe, samples=samples, batch_size=batch_size, prediction_space=space)
    first = scorer.score(PROMPTS)
    again = scorer.score(PROMPTS[::-1])[::-1]  # second pass is served from the unconditional cache
    for result, cached, prompt, plain in zip(first, again, PROMPTS, plain_scores(pipe, case, samples)):
        norm, cos, score, timesteps = plain
        assert (result.t_hi, result.t_lo) == timesteps == (981, 41)
        assert result.samples == samples and result.seed == 51 and result.prompt == prompt
        for got in (result, cached):
            assert got.norm == pytest.approx(norm, abs=1e-5, rel=1e-5)
            assert got.cos == pytest.approx(cos, abs=1e-5)
            assert got.score == pytest.approx(score, abs=1e-5, rel=1e-5)


def test_native_and_eps_space_agree_on_the_norm_for_v_prediction(sd2_pipe):
    eps = Scorer(sd2_pipe, prediction_space="eps").score(PROMPTS)
    native = Scorer(sd2_pipe, prediction_space="native").score(PROMPTS)
    for a, b in zip(eps, native):
        assert b.norm == pytest.approx(a.norm, rel=0.006)  # 1 / (1 - alpha_bar(981)) ~ 1.005
        assert b.norm != a.norm


def test_unconditional_predictions_are_cached_per_settings(sd_pipe):
    scorer = Scorer(sd_pipe, batch_size=8)
    calls = []
    original = scorer.adapter.predict

    def counting_predict(sample, timesteps, cond):
        calls.append(sample.shape[0])
        return original(sample, timesteps, cond)

    scorer.adapter.predict = counting_predict
    scorer.score(PROMPTS)
    assert calls == [2, 2 * len(PROMPTS)]  # one unconditional call (t_hi + t_lo), one call for all prompts
    calls.clear()
    scorer.score(PROMPTS[:2])
    assert calls == [4]  # cache hit: only the conditional rows
    scorer.clear_cache()
    calls.clear()
    scorer.score(PROMPTS[:1])
    assert calls == [2, 2]


def test_precomputed_embeddings_give_the_same_scores(sd_pipe, sdxl_pipe):
    for pipe in (sd_pipe, sdxl_pipe):
        scorer = Scorer(pipe)
        cond = scorer.encode(PROMPTS)
        from_embeddings = scorer.score_conditioning(cond, PROMPTS)
        from_text = scorer.score(PROMPTS)
        assert [r.score for r in from_embeddings] == pytest.approx([r.score for r in from_text], abs=1e-6)


def test_same_seed_same_scores_and_user_rng_untouched(sd_pipe):
    generator = torch.Generator("cpu").manual_seed(1234)
    generator_state = generator.get_state().clone()
    global_state = torch.get_rng_state().clone()
    a = score_prompts(sd_pipe, PROMPTS)
    b = score_prompts(sd_pipe, PROMPTS)
    assert [r.score for r in a] == [r.score for r in b]
    assert torch.equal(generator.get_state(), generator_state)
    assert torch.equal(torch.get_rng_state(), global_state)
    other_seed = score_prompts(sd_pipe, PROMPTS, seed=7)
    assert [r.score for r in other_seed] != [r.score for r in a]
    assert all(r.seed == 7 for r in other_seed)


def test_detection_noise_follows_the_device_independent_convention():
    noise = detection_noise((4, 8, 8), samples=3, seed=51, dtype=torch.bfloat16)
    expected = torch.randn((3, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(51), dtype=torch.float32)
    assert noise.dtype == torch.bfloat16
    assert torch.equal(noise, expected.to(torch.bfloat16))


def test_timesteps_come_from_the_scheduler_config(sd_pipe):
    assert scoring_timesteps(sd_pipe.scheduler.config, 50) == (981, 41)
    trailing = dict(sd_pipe.scheduler.config, timestep_spacing="trailing", steps_offset=0)
    from diffusers import DDIMScheduler

    reference = DDIMScheduler.from_config(trailing)
    reference.set_timesteps(25)
    assert scoring_timesteps(trailing, 25) == (int(reference.timesteps[0]), int(reference.timesteps[-3]))
    assert scoring_timesteps(trailing, 25)[0] == 999


def test_profile_weights_can_be_overridden(sd_pipe):
    default = Scorer(sd_pipe).score(PROMPTS[:2])
    custom = Scorer(sd_pipe, profile={"g_norm": 3.0, "g_cos": -1.0}).score(PROMPTS[:2])
    named = Scorer(sd_pipe, profile="sd2").score(PROMPTS[:2])
    for d, c, n in zip(default, custom, named):
        assert d.profile == "sd1" and (d.g_norm, d.g_cos) == (1.0, 2.0)
        assert c.score == pytest.approx(3.0 * d.norm - d.cos)
        assert n.profile == "sd2" and n.score == pytest.approx(d.norm + 0.1 * d.cos)
    with pytest.raises(ValueError, match="unknown model profile 'sd9'"):
        Scorer(sd_pipe, profile="sd9")


def test_auto_profile_follows_the_model_family(sd_pipe, sd2_pipe, sdxl_pipe):
    assert [Scorer(p).profile.name for p in (sd_pipe, sd2_pipe, sdxl_pipe)] == ["sd1", "sd2", "sdxl"]


def test_bad_prompts_get_clear_errors(sd_pipe):
    with pytest.raises(ValueError, match="prompts is empty"):
        score_prompts(sd_pipe, [])
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a string, got int"):
        score_prompts(sd_pipe, ["a cat", 3])
    with pytest.raises(TypeError, match="got NoneType"):
        score_prompts(sd_pipe, None)


def test_empty_prompt_is_scored_with_a_warning(sd_pipe):
    (result,) = score_prompts(sd_pipe, [""])
    assert math.isfinite(result.score)
    assert result.norm == pytest.approx(0.0, abs=1e-4)  # "" is the unconditional prompt itself
    assert any("empty prompt" in w for w in result.warnings)


def test_overlong_prompt_is_truncated_with_a_warning(sd_pipe):
    long_prompt = " ".join(["red cat"] * 20)
    short, long = score_prompts(sd_pipe, ["red cat", long_prompt])
    assert long.truncated and not short.truncated
    assert any("truncated" in w for w in long.warnings)
    assert not short.warnings


def test_single_string_is_one_prompt(sd_pipe):
    (result,) = score_prompts(sd_pipe, "a red cat")
    assert result.prompt == "a red cat"


def test_non_finite_score_is_an_error(sd_pipe):
    scorer = Scorer(sd_pipe)
    original = scorer.adapter.predict
    scorer.adapter.predict = lambda s, t, c: original(s, t, c) * float("nan")
    with pytest.raises(NonFiniteScoreError, match="non-finite memorization score for prompt 'a cat'"):
        scorer.score(["a cat"])


def test_pipeline_without_unconditional_branch_is_rejected():
    from diffusers import UNet2DConditionModel

    from guard.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    pipe.unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 32})
    with pytest.raises(UnsupportedPipelineError, match="no unconditional branch"):
        Scorer(pipe)


def test_pipeline_without_unet_or_unknown_prediction_is_rejected(sd_pipe):
    class TransformerPipeline:
        transformer = object()
        scheduler = sd_pipe.scheduler

    with pytest.raises(UnsupportedPipelineError, match="not a model family memguard can score"):
        Scorer(TransformerPipeline())

    from guard.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type="sample")
    with pytest.raises(UnsupportedPipelineError, match="predicts 'sample'"):
        Scorer(pipe)


def test_reduced_precision_unet_reduces_in_float32():
    from guard.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    full = score_prompts(pipe, PROMPTS[:3])
    pipe.to(torch.bfloat16)
    half = score_prompts(pipe, PROMPTS[:3])
    for f, h in zip(full, half):
        assert isinstance(h.score, float) and math.isfinite(h.score)
        assert h.norm == pytest.approx(f.norm, rel=0.05)


def test_execution_device_memo_follows_placement_changes(monkeypatch):
    from guard.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    scorer = Scorer(pipe)
    assert scorer.adapter.device == pipe._execution_device
    monkeypatch.setattr(type(pipe), "_execution_device", property(lambda self: torch.device("meta")))
    assert scorer.adapter.device.type == "cpu"  # placement unchanged: memoized answer
    pipe.unet._hf_hook = object()  # what accelerate's offloading attaches
    assert scorer.adapter.device.type == "meta"
    assert scorer.adapter.dtype == torch.float32
    pipe.unet.to(torch.bfloat16)
    assert scorer.adapter.dtype == torch.bfloat16
