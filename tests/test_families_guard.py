"""SD3 / SD3.5, FLUX.1 (dev, schnell), PixArt-alpha and PixArt-Sigma through every front end: the Guard's
transparency (bit-identical images when allowed), rewrites, reduced precision, model offloading, a saved
pipeline under the shipped strict policy, ``memguard scan``/``calibrate`` and the HTTP service.

The score itself is checked against a plain implementation in ``test_flow_families.py``.
"""

from __future__ import annotations

import json
import logging
import math
import warnings

import pytest
import torch
from click.testing import CliRunner
from diffusers import DiffusionPipeline, FluxPipeline

import guard.calibration.making as making
from guard import Guard, Scorer, score_prompts, verify_log
from guard.actions.mitigation import mitigate_prompt_embedding
from guard.calibration import CalibrationProfile
from guard.cli import main
from guard.loading import load_pipeline
from guard.scoring.adapters import adapter_for
from guard.testing import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

CAT, DOG, CITY = "a red cat on the beach", "a small dog in the garden", "watercolor city street at night"
CAPTIONS = ["a red house", "a blue boat on the lake", "old man with a hat", "green tree in the forest",
            "a white horse on the beach"]

BUILDERS = {
    "sd3": lambda: tiny_sd3_pipeline(seed=3),
    "sd3-no-t5": lambda: tiny_sd3_pipeline(seed=4, three_encoders=False),
    "flux-dev": lambda: tiny_flux_pipeline(seed=5),
    "flux-schnell": lambda: tiny_flux_pipeline(seed=6, guidance_embeds=False),
    "pixart-alpha": lambda: tiny_pixart_pipeline("alpha", seed=7),
    "pixart-sigma": lambda: tiny_pixart_pipeline("sigma", seed=8),
}
CASES = list(BUILDERS)
FAMILY = {"sd3": "sd3", "sd3-no-t5": "sd3", "flux-dev": "flux", "flux-schnell": "flux", "pixart-alpha": "pixart",
          "pixart-sigma": "pixart"}

_PIPES: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread_and_quiet():
    """One intra-op thread (tiny models gain nothing from more); PixArt logs that bs4/ftfy are missing on every
    encode, and diffusers warns when a model is cast with ``.to(dtype)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logger = logging.getLogger("diffusers.pipelines.pixart_alpha")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)
    torch.set_num_threads(threads)


def build(case: str, dtype: torch.dtype | None = None):
    """A fresh pipeline; FLUX's hard-coded 128 x 128 native latent is lowered to 16 x 16 on in-memory copies
    (speed). Saved pipelines keep the stock size: ``from_pretrained`` restores it."""
    pipe = BUILDERS[case]()
    if isinstance(pipe, FluxPipeline):
        pipe.default_sample_size = 16
    if dtype is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.to(dtype)
    return pipe


def get_pipe(case: str):
    if case not in _PIPES:
        _PIPES[case] = build(case)
    return _PIPES[case]


def allow_all(**overrides):
    base = {"name": "test", "version": 1, "calibration": "off", "rules": [], "default": "allow"}
    base.update(overrides)
    return base


def rewrite_policy(method: str, target: float, gte: float, *, max_steps: int = 30, fallback: str = "block"):
    """One rung, unverified (``verify: null``): a met score target releases, an unmet one falls back."""
    rule = {"name": "rewrite-high", "when": {"score": {"gte": gte}}, "action": "rewrite",
            "rewrite": {"method": method, "target": {"score": target}, "max_steps": max_steps, "fallback": fallback,
                        "verify": None}}
    return allow_all(rules=[rule])


def negative_branch(case: str, negatives: list[str]) -> dict:
    """Per-prompt negative prompts, and for FLUX the true-CFG path that uses them (its only negative branch)."""
    if case.startswith("flux"):
        return {"negative_prompt": negatives, "true_cfg_scale": 2.0}
    return {"negative_prompt": negatives}


def generate(target, prompt, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "latent")
    return target(prompt=prompt, generator=torch.Generator("cpu").manual_seed(0), **kwargs)


def records(path, event=None):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if event is None or r["event"] == event]


# ---------------------------------------------------------------------------------------------- transparency


@pytest.mark.parametrize("case", CASES)
def test_allowed_prompts_give_bit_identical_images(case, tmp_path):
    """Two prompts, two images each, per-prompt negative prompts: the guard hands the pipeline its scored
    embeddings, and every image is the plain call's, bit for bit (SD3 and FLUX take given embeddings as one
    row per image: ``per_image_arguments``)."""
    pipe, log = get_pipe(case), tmp_path / "audit.jsonl"
    call = {"num_images_per_prompt": 2, **negative_branch(case, ["blurry", "dark"])}
    guarded = generate(Guard(pipe, allow_all(), audit_path=log), [CAT, DOG], **call)
    plain = generate(pipe, [CAT, DOG], **call)
    assert guarded.images.shape[0] == 4
    assert torch.equal(guarded.images, plain.images)
    assert guarded.memguard.actions == ["allow", "allow"] and guarded.memguard.generated == [0, 1]
    assert verify_log(log).ok


@pytest.mark.parametrize("case", CASES)
def test_drop_blocked_leaves_the_other_prompts_bit_identical(case, tmp_path):
    log = tmp_path / "audit.jsonl"
    guard = Guard(get_pipe(case), allow_all(batch="drop_blocked", lists={"always_block": [DOG]}), audit_path=log)
    out = generate(guard, [CAT, DOG, CITY], num_images_per_prompt=2,
                   **negative_branch(case, ["blurry", "dark", "noisy"]))
    plain = generate(get_pipe(case), [CAT, CITY], num_images_per_prompt=2, **negative_branch(case, ["blurry", "noisy"]))
    assert out.memguard.generated == [0, 2] and out.memguard.dropped == [1]
    assert torch.equal(out.images, plain.images)
    assert [r["outcome"] for r in records(log, "outcome")] == ["generated", "dropped", "generated"]


# ---------------------------------------------------------------------------------------------- rewrites


#: The rewrite tests' calls shorten the T5 sequence (cost), which also checks that a conditional branch of the
#: call's own length is scored against u of the default length (one model call each in ``Scorer.predictions``).
SHORT_T5 = {"max_sequence_length": 32}


@pytest.mark.parametrize("method", ["prompt_embedding", "initial_noise"])
@pytest.mark.parametrize("case", CASES)
def test_rewrite_changes_only_the_flagged_prompt(case, method, tmp_path):
    """Both methods apply to every family: the rewritten prompt's images change, the other prompt's stay
    bit-identical (initial_noise: the call's own noise from ``adapter.prepare_latents``, passed back through
    ``latents_argument``, packed for FLUX), and the audit says what was done."""
    pipe, log = get_pipe(case), tmp_path / "audit.jsonl"
    cat, dog = Scorer(pipe).score([CAT, DOG], **SHORT_T5)
    high = 0 if cat.score > dog.score else 1
    top = max(cat.score, dog.score)
    target = top - 0.01 * abs(top)
    if method == "initial_noise":  # below the score at the call's own noise too, so that the noise must change
        target = min(target, min(own_noise_scores(pipe, [CAT, DOG][high])) - 1e-3 * abs(top))
    guard = Guard(pipe, rewrite_policy(method, target, (cat.score + dog.score) / 2), audit_path=log)
    out = generate(guard, [CAT, DOG], num_images_per_prompt=2, **SHORT_T5)
    plain = generate(pipe, [CAT, DOG], num_images_per_prompt=2, **SHORT_T5)
    low = 1 - high
    assert out.memguard.actions[high] == "rewrite" and out.memguard.actions[low] == "allow"
    ladder = out.memguard.mitigations[high]
    assert ladder.method == method and ladder.met and not ladder.verified
    (rung,) = ladder.rungs
    assert rung.ran and all(m.met and m.score_after <= m.target for m in rung.optimisations)
    rows = {i: slice(2 * i, 2 * i + 2) for i in (0, 1)}
    assert torch.equal(out.images[rows[low]], plain.images[rows[low]])
    assert not torch.equal(out.images[rows[high]], plain.images[rows[high]])
    outcomes = records(log, "outcome")
    assert [r["outcome"] for r in outcomes] == ["generated", "generated"]  # "rewritten" says verified
    assert outcomes[high]["extras"]["mitigation"]["released"] == method
    assert outcomes[high]["extras"]["mitigation"]["verified"] is False
    assert verify_log(log).ok


@pytest.mark.parametrize("case", ["sd3", "flux-dev", "pixart-sigma"])
def test_verified_ladder_generates_probes_and_images_per_prompt(case, tmp_path):
    """The verified ladder on each family: probes (two images of one prompt, one embedding row per image on
    SD3/FLUX) and the released generation with ``num_images_per_prompt=2``; the other prompt stays
    bit-identical. FLUX is guidance-distilled, so its guidance rung is skipped and prompt_embedding releases."""
    pipe, log = get_pipe(case), tmp_path / "audit.jsonl"
    cat, dog = Scorer(pipe).score([CAT, DOG], **SHORT_T5)
    high = 0 if cat.score > dog.score else 1
    rule = {"name": "rewrite-high", "when": {"score": {"gte": max(cat.score, dog.score) - 1e-6}},
            "action": "rewrite", "rewrite": {"ladder": ["guidance_schedule", "prompt_embedding"], "max_steps": 2,
                                             "target": {"score": -1e9}, "verify": {"max_similarity": 1.0}}}
    out = generate(Guard(pipe, allow_all(rules=[rule]), audit_path=log), [CAT, DOG], num_images_per_prompt=2,
                   **SHORT_T5)
    plain = generate(pipe, [CAT, DOG], num_images_per_prompt=2, **SHORT_T5)
    ladder = out.memguard.mitigations[high]
    expected = "prompt_embedding" if case == "flux-dev" else "guidance_schedule"
    assert ladder.verified and ladder.released == expected
    assert len(ladder.rungs[-1].similarity) == 2  # one verdict per released image
    rows = {i: slice(2 * i, 2 * i + 2) for i in (0, 1)}
    assert torch.equal(out.images[rows[1 - high]], plain.images[rows[1 - high]])
    assert not torch.equal(out.images[rows[high]], plain.images[rows[high]])
    assert [r["outcome"] for r in records(log, "outcome")][high] == "rewritten"


def test_a_guidance_only_ladder_on_guidance_distilled_flux_is_a_policy_error(tmp_path):
    from guard.policy import PolicyError

    rule = {"name": "rw", "when": {"score": {"gte": 0.0}}, "action": "rewrite",
            "rewrite": {"method": "guidance_schedule", "target": {"score": 0.0}, "verify": {"max_similarity": 0.5}}}
    with pytest.raises(PolicyError, match=r"rules\[0\]\.rewrite: guidance_schedule does not apply to FluxPipeline"):
        Guard(get_pipe("flux-dev"), allow_all(rules=[rule]), audit_path=tmp_path / "a.jsonl")
    Guard(get_pipe("sd3"), allow_all(rules=[rule]), audit_path=tmp_path / "b.jsonl").close()  # SD3 has CFG


def own_noise_scores(pipe, prompt: str) -> list[float]:
    """The scores of ``prompt`` at the initial noise of its two images in ``generate(pipe, [CAT, DOG], ...)``."""
    scorer = Scorer(pipe)
    call = {"prompt": [CAT, DOG], "num_images_per_prompt": 2, "generator": torch.Generator("cpu").manual_seed(0)}
    noise = scorer.adapter.prepare_latents(call, 2).float()
    index = [CAT, DOG].index(prompt)
    with torch.no_grad():
        norm, cos = scorer.statistics_at(noise[2 * index : 2 * index + 2], scorer.encode([prompt], **SHORT_T5))
    return scorer.combine(norm, cos).tolist()


@pytest.mark.parametrize("case", CASES)
def test_prompt_embedding_optimises_what_the_family_conditions_on(case):
    """Token embeddings and the pooled embedding (SD3, FLUX) move; PixArt's attention mask passes through;
    only CLIP-first embeddings (SD3) have a BOS token at position 0 to leave alone (FLUX's and PixArt's are T5's,
    whose position 0 is the prompt's first word)."""
    scorer = Scorer(get_pipe(case))
    cond = scorer.encode([CAT])
    result = mitigate_prompt_embedding(scorer, cond, target=-1e6, max_steps=2)
    assert result.steps == 2 and result.score_after < result.score_before
    assert result.score_after == pytest.approx(scorer.score_conditioning(result.cond)[0].score, abs=1e-5)
    moved = (result.cond.embeds - cond.embeds.float()).abs().sum(dim=-1)[0]
    assert bool(moved[0] > 0) == (FAMILY[case] != "sd3")
    assert moved[1:].sum() > 0
    assert (cond.pooled is None) == (FAMILY[case] == "pixart")
    if cond.pooled is not None:
        assert not torch.equal(result.cond.pooled, cond.pooled.float())
    if cond.mask is not None:
        assert torch.equal(result.cond.mask, cond.mask)
    assert sum(p.grad is not None for p in scorer.adapter.denoiser.parameters()) == 0


# ---------------------------------------------------------------------------------------------- precision, offloading


#: Rewrites in reduced precision, one per family (cost: CPU bfloat16 is slow); both methods are covered.
REWRITTEN_IN_BF16 = {"sd3": "prompt_embedding", "flux-dev": "initial_noise", "pixart-sigma": "initial_noise"}


@pytest.mark.parametrize(("case", "dtype"), [(case, torch.bfloat16) for case in CASES]
                         + [(case, torch.float16) for case in REWRITTEN_IN_BF16])
def test_reduced_precision_generation_and_rewrites(case, dtype, tmp_path):
    """Half-precision pipelines: finite scores reduced in float32, bit-identical generation, and (bfloat16)
    rewrites optimising in float32 through the half-precision transformer."""
    pipe, log = build(case, dtype), tmp_path / "audit.jsonl"
    guard = Guard(pipe, allow_all(), audit_path=log)
    guarded = generate(guard, CAT)
    plain = generate(pipe, CAT)
    assert guarded.images.dtype == dtype and torch.equal(guarded.images, plain.images)
    score = guarded.memguard.decisions[0].score
    assert all(math.isfinite(v) for v in (score.norm, score.cos, score.score))
    norm, cos = guard.scorer.statistics(guard.scorer.encode([CAT]))
    assert norm.dtype == cos.dtype == torch.float32
    if dtype != torch.bfloat16 or case not in REWRITTEN_IN_BF16:
        return
    method = REWRITTEN_IN_BF16[case]
    rewriting = Guard(pipe, rewrite_policy(method, -1e6, -1e9, max_steps=1, fallback="warn"), audit_path=log)
    with pytest.warns(UserWarning, match="fallback: warn"):
        out = generate(rewriting, CAT)
    ladder = out.memguard.mitigations[0]
    assert ladder.released is None and ladder.steps == 1  # target unmet: the rule's fallback (warn) applied
    (mitigation,) = ladder.rungs[0].optimisations
    assert ladder.rungs[0].rung == method and mitigation.steps == 1
    assert math.isfinite(mitigation.score_after) and mitigation.score_after < mitigation.score_before
    assert out.images.dtype == dtype and torch.isfinite(out.images).all()


@pytest.mark.parametrize("case", CASES)
def test_model_cpu_offload(case, tmp_path):
    """``enable_model_cpu_offload`` installs accelerate's hooks; the adapter follows them (device, dtype,
    memo invalidated) and generation stays bit-identical. On a machine without an accelerator only
    ``device="cpu"`` offloading can be set up: the hooks run, but no weights actually move."""
    pipe = build(case)
    before = score_prompts(pipe, [CAT, DOG])
    guard = Guard(pipe, allow_all(), audit_path=tmp_path / "audit.jsonl")
    memo = guard.scorer.adapter._placement_signature()
    pipe.enable_model_cpu_offload(device="cpu")
    assert getattr(pipe.transformer, "_hf_hook", None) is not None
    assert guard.scorer.adapter._placement_signature() != memo
    assert guard.scorer.adapter.device == pipe._execution_device
    guarded = generate(guard, [CAT, DOG], num_images_per_prompt=2)
    plain = generate(pipe, [CAT, DOG], num_images_per_prompt=2)
    assert torch.equal(guarded.images, plain.images)
    for decision, reference in zip(guarded.memguard.decisions, before):
        assert decision.score.score == pytest.approx(reference.score, abs=1e-5)
    if case not in ("sd3", "flux-dev"):
        return
    method = "initial_noise" if case == "flux-dev" else "prompt_embedding"
    rewriting = Guard(pipe, rewrite_policy(method, -1e6, -1e9, max_steps=1, fallback="warn"),
                      audit_path=tmp_path / "audit.jsonl")
    with pytest.warns(UserWarning, match="fallback: warn"):  # a rewrite through the hooks (gradients, own noise)
        out = generate(rewriting, CAT)
    (mitigation,) = out.memguard.mitigations[0].rungs[0].optimisations
    assert mitigation.steps == 1 and mitigation.score_after < mitigation.score_before


# ---------------------------------------------------------------------------------------------- saved pipelines


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family saved with ``save_pretrained`` (stock native sizes, FLUX's 128 x 128 latent included)."""
    root = tmp_path_factory.mktemp("families")
    paths = {}
    for case, builder in BUILDERS.items():
        paths[case] = root / case
        builder().save_pretrained(paths[case])
    return paths


def load_saved(path, case):
    if case == "sd3-no-t5":  # diffusers needs text_encoder_3=None passed again; load_pipeline does it
        return load_pipeline(path, device="cpu")
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: What the strict policy's automatic calibration scores here instead of the 1,000 generic captions (cost: a
#: stock FLUX pipeline scores at its 128 x 128 native latent, 4096 tokens).
STAND_IN_CAPTIONS = [CAT, DOG]


@pytest.mark.parametrize("case", CASES)
def test_saved_pipeline_under_scan_and_the_strict_policy(case, saved, tmp_path, monkeypatch):
    """``memguard scan --model DIR`` and ``Guard(from_pretrained(DIR), "strict")`` at the stock native size:
    strict's relative thresholds make the guard calibrate itself on the generic captions (two stand-ins here),
    measuring exactly what the scan measures; the lower-scoring caption is below every strict threshold
    (all of them are the maximum of two captions) and is generated bit-identically."""
    prompts, out = tmp_path / "prompts.txt", tmp_path / "scores.jsonl"
    prompts.write_text("\n\n".join(STAND_IN_CAPTIONS) + "\n")
    result = CliRunner().invoke(main, ["scan", "--model", str(saved[case]), "--prompts", str(prompts),
                                       "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == STAND_IN_CAPTIONS
    assert {(r["profile"], r["prediction_space"], r["seed"], r["samples"]) for r in rows} == {
        (FAMILY[case], "eps" if FAMILY[case] == "pixart" else "velocity", 51, 1)}

    monkeypatch.setattr(making, "generic_captions", lambda: list(STAND_IN_CAPTIONS))
    pipe = load_saved(saved[case], case)
    assert type(pipe) is type(get_pipe(case))
    safe = min(rows, key=lambda row: row["score"])
    call = {"height": 128, "width": 128} if case.startswith("flux") else {}  # cost: FLUX's stock size is 1024 px
    with Guard(pipe, "strict", audit_path=tmp_path / "audit.jsonl") as guard:
        allowed = generate(guard, safe["prompt"], **call)
        calibration = guard.calibration
    assert calibration.profile == FAMILY[case] and calibration.prediction_space == rows[0]["prediction_space"]
    assert calibration.scores == pytest.approx(sorted(r["score"] for r in rows), abs=1e-5, rel=1e-5)
    (decision,) = allowed.memguard.decisions
    assert decision.rule == "default" and decision.action == "allow", decision.reason
    assert decision.calibration_id == calibration.id
    assert decision.score.score == pytest.approx(safe["score"], abs=1e-5, rel=1e-5)
    assert torch.equal(allowed.images, generate(pipe, safe["prompt"], **call).images)
    assert verify_log(tmp_path / "audit.jsonl").ok


def test_calibrate_cli_on_a_saved_flow_pipeline(saved, tmp_path):
    """``memguard calibrate`` on SD3: the profile is measured in velocity space with the sd3 weights, fitted
    weights are reported, and a guard with relative thresholds uses the profile."""
    nmem, mem = tmp_path / "nmem.txt", tmp_path / "mem.txt"
    nmem.write_text("\n".join(CAPTIONS + [CAT, DOG, CITY]) + "\n")
    mem.write_text("official fox wallpaper\nthe starry night\nred red red cat\nold old man\n")
    out = tmp_path / "cal.json"
    result = CliRunner().invoke(main, ["calibrate", "--model", str(saved["sd3"]), "--nmem", str(nmem), "--mem",
                                       str(mem), "--out", str(out), "--device", "cpu", "--folds", "2",
                                       "--weights", "reference", "--no-progress"])
    assert result.exit_code == 0, result.output
    profile = CalibrationProfile.load(out)
    assert profile.n_prompts == 8 and profile.profile == "sd3" and profile.prediction_space == "velocity"
    report = json.loads((tmp_path / "cal.json.weights.json").read_text())
    assert report["reference"] == [profile.g_norm, profile.g_cos] and len(report["fitted"]) == 2
    relative = allow_all(rules=[{"when": {"score": {"above_fpr": 0.2}}, "action": "block"}])
    pipe = load_saved(saved["sd3"], "sd3")
    decision = Guard(pipe, relative, calibration=out, audit_path=tmp_path / "audit.jsonl").check(CAT)
    assert decision.calibration_id == profile.id and decision.rule != "on_error"


# ---------------------------------------------------------------------------------------------- the service


@pytest.mark.parametrize("case", ["sd3", "flux-dev"])
def test_service_check_and_generate(case, tmp_path):
    pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'memguard[serve]'")
    pytest.importorskip("httpx", reason="FastAPI's test client needs httpx")
    import base64

    from fastapi.testclient import TestClient

    from guard.service import create_app

    pipe = get_pipe(case)
    low, high = sorted(score_prompts(pipe, [CAT, DOG]), key=lambda s: s.score)
    cut = (low.score + high.score) / 2
    policy = allow_all(rules=[{"name": "too-high", "when": {"score": {"gte": cut}}, "action": "block"}])
    guard = Guard(pipe, policy, audit_path=tmp_path / "audit.jsonl")
    with TestClient(create_app(guard)) as client:
        checked = client.post("/v1/check", json={"prompts": [low.prompt, high.prompt]}).json()
        assert [d["action"] for d in checked["decisions"]] == ["allow", "block"]
        assert checked["decisions"][0]["score"]["score"] == pytest.approx(low.score, abs=1e-5)
        generated = client.post("/v1/generate", json={"prompt": low.prompt, "num_inference_steps": 2, "seed": 1,
                                                      "num_images": 2})
        assert generated.status_code == 200, generated.text
        images = generated.json()["images"]
        assert len(images) == 2 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
        assert client.post("/v1/generate", json={"prompt": high.prompt, "num_inference_steps": 2}).status_code == 403
    assert verify_log(tmp_path / "audit.jsonl").ok


def test_flux_per_image_arguments_reproduce_the_calls_own_negative_branch():
    """What ``per_image_arguments`` hands FLUX's ``__call__``: one row per image, the true-CFG negatives the call
    itself would encode, one image per row; and nothing to do without a negative branch or with one image."""
    pipe = get_pipe("flux-dev")
    adapter = adapter_for(pipe)
    cond = adapter.encode([CAT, DOG])
    call = {"prompt": None, "prompt_embeds": cond.embeds, "pooled_prompt_embeds": cond.pooled,
            "num_images_per_prompt": 2, "negative_prompt": ["blurry", "dark"], "true_cfg_scale": 2.0}
    arguments = adapter.per_image_arguments(call)
    assert arguments["num_images_per_prompt"] == 1 and arguments["negative_prompt"] is None
    assert torch.equal(arguments["prompt_embeds"], cond.embeds.repeat_interleave(2, dim=0))
    with torch.no_grad():  # as __call__ (grad mode changes T5's kernels at the 1e-6 level)
        own, own_pooled, _ = pipe.encode_prompt(["blurry", "dark"], num_images_per_prompt=2)
    assert torch.equal(arguments["negative_prompt_embeds"], own)
    assert torch.equal(arguments["negative_pooled_prompt_embeds"], own_pooled)
    without_cfg = adapter.per_image_arguments({**call, "true_cfg_scale": 1.0})
    assert "negative_prompt_embeds" not in without_cfg and without_cfg["negative_prompt"] == ["blurry", "dark"]
    assert adapter.per_image_arguments({**call, "num_images_per_prompt": 1}) == {**call, "num_images_per_prompt": 1}
    pixart = adapter_for(get_pipe("pixart-sigma"))  # PixArt repeats given embeddings itself
    assert pixart.per_image_arguments(call) == call
