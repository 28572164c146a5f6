"""The paths a user takes first, as they take them: every front end x shipped policy x calibration source x
(ordinary, memorized) prompt, on memguard's shipped model and on an SDXL twin.

Front ends: the diffusers ``Guard``, the service's ``/v1/check`` and ``/v1/generate``, and the ComfyUI Memorization
Guard node (through the fakes of ComfyUI's API). Policies: the shipped ``strict``, ``balanced`` and ``monitor`` by
name. Calibration sources: automatic (none given), ``memguard calibrate --nmem`` without and with ``--verification``,
and ``memguard calibrate --from-audit``, each made by the CLI a user runs.

Every cell: no exception but the documented one (``MemorizationBlocked`` under ``block_mode: raise``), one decision
record and (when generating) one outcome record per prompt, chained, ``audit verify`` passes, and the outcome says
what was done. On the shipped model, a memorized prompt under ``strict`` or ``balanced`` is never released as it is.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from guard import Guard, MemorizationBlocked, verify_log
from guard.cli import main

pytest.importorskip("fastapi", reason="the service front end needs the serve extra")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "benchmarks" / "memorizer" / "prompts"
STEPS = 4
POLICIES = ["strict", "balanced", "monitor"]
SOURCES = ["auto", "nmem", "nmem+verification", "from-audit"]
FRONT_ENDS = ["guard", "service-check", "service-generate", "comfyui"]
MODELS = ["shipped", "sdxl"]


# ---------------------------------------------------------------------------------------------- the models


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One automatic-calibration cache for the module, as a user's ~/.cache/memguard is: made once per model."""
    return tmp_path_factory.mktemp("memguard-cache")


@pytest.fixture(autouse=True)
def _shared_cache(cache_dir, monkeypatch):
    import guard.actions.verification

    monkeypatch.setenv("MEMGUARD_CACHE_DIR", str(cache_dir))
    # The automatic verification calibration's own path, on 8 generic captions instead of 32: CI's budget.
    monkeypatch.setattr(guard.actions.verification, "AUTO_VERIFICATION_PROMPTS", 8)


def _cli(*args: str) -> None:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output


def _sdxl_prompts() -> tuple[list[str], str, list[str]]:
    from guard.testing import DEFAULT_WORDS

    rng = random.Random(0)
    words = list(DEFAULT_WORDS)
    ordinary = [" ".join(rng.choices(words, k=rng.randint(3, 7))) for _ in range(120)]
    return ordinary[:80], ordinary[80], ordinary[81:]


@pytest.fixture(scope="module")
def models(tmp_path_factory, cache_dir):
    """Per model: the pipeline, its folder (what the CLI is given), an ordinary and a memorized prompt, and a file
    of ordinary prompts like its users' (for ``calibrate --nmem`` and the traffic of ``--from-audit``)."""
    from diffusers import StableDiffusionPipeline

    from guard.assets import SHIPPED_MODEL
    from guard.scoring import Scorer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from comfy_twins import sdxl_twin

    out = {}
    shipped = StableDiffusionPipeline.from_pretrained(SHIPPED_MODEL)
    shipped.set_progress_bar_config(disable=True)
    ordinary = (PROMPTS / "nmem.txt").read_text().splitlines()
    out["shipped"] = {"pipe": shipped, "dir": Path(SHIPPED_MODEL), "ordinary": ordinary[0],
                      "memorized": "the famous red bicycle of the beach poster", "nmem": PROMPTS / "calib.txt",
                      "traffic": ordinary[1:81]}
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    twin = sdxl_twin(seed=5)
    twin.save_pretrained(folder)
    nmem, ordinary_prompt, candidates = _sdxl_prompts()
    nmem_file = folder.parent / "nmem.txt"
    nmem_file.write_text("\n".join(nmem) + "\n")
    scores = Scorer(twin).score(candidates)
    top = max(scores, key=lambda s: s.score).prompt  # on random weights nothing is memorized: the riskiest prompt
    out["sdxl"] = {"pipe": twin, "dir": folder, "ordinary": ordinary_prompt, "memorized": top, "nmem": nmem_file,
                   "traffic": nmem[:60]}
    return out


@pytest.fixture(scope="module")
def calibrations(models, tmp_path_factory):
    """The calibration file a user makes with the CLI, per model and source (None: automatic), made when first
    asked for."""
    made: dict[tuple[str, str], Path | None] = {}

    def calibration(name: str, source: str) -> Path | None:
        if (name, source) in made:
            return made[(name, source)]
        model = models[name]
        folder = tmp_path_factory.mktemp(f"calibration-{name}-{source.replace('+', '-')}")
        common = ["--model", str(model["dir"]), "--no-progress", "--device", "cpu", "--dtype", "float32"]
        out = None
        if source == "nmem":
            out = folder / "nmem.json"
            _cli("calibrate", *common, "--nmem", str(model["nmem"]), "--out", str(out))
        elif source == "nmem+verification":
            out = folder / "verified.json"
            _cli("calibrate", *common, "--nmem", str(model["nmem"]), "--out", str(out), "--verification", "8",
                 "--generation-steps", str(STEPS))
        elif source == "from-audit":
            traffic = folder / "traffic.jsonl"  # what `monitor` logged while serving ordinary users
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Guard(model["pipe"], "monitor", audit_path=traffic) as watching:
                    watching.check_many(model["traffic"])
            out = folder / "traffic.json"
            _cli("calibrate", "--from-audit", str(traffic), "--out", str(out))
        made[(name, source)] = out
        return out

    return calibration


# ---------------------------------------------------------------------------------------------- the front ends


def _via_guard(model, policy, calibration, log, prompt):
    guard = Guard(model["pipe"], policy, calibration=calibration, audit_path=log)
    try:
        out = guard(prompt=prompt, num_inference_steps=STEPS, output_type="latent",
                    generator=torch.Generator().manual_seed(0))
    except MemorizationBlocked as blocked:
        return blocked.report, "raised"
    finally:
        guard.close()
    return out.memguard, "images" if len(out.images) else "withheld"


def _via_service(model, policy, calibration, log, prompt, endpoint):
    from fastapi.testclient import TestClient

    from guard.service import create_app

    guard = Guard(model["pipe"], policy, calibration=calibration, audit_path=log, source="service")
    with TestClient(create_app(guard)) as client:
        if endpoint == "check":
            response = client.post("/v1/check", json={"prompt": prompt})
        else:
            response = client.post("/v1/generate", json={"prompt": prompt, "num_inference_steps": STEPS, "seed": 0})
    assert response.status_code in (200, 403), response.text  # never a 500: every error is a decision
    return response.json(), response.status_code


@pytest.fixture(scope="module")
def comfy():
    """The fakes of ComfyUI's API on sys.path and the pack loaded as ComfyUI loads a custom node folder."""
    fakes = Path(__file__).resolve().parent / "comfy_fakes"
    sys.path.insert(0, str(fakes))
    before = set(sys.modules)
    try:
        spec = importlib.util.spec_from_file_location("memguard_default_path_pack",
                                                      ROOT / "integrations" / "comfyui" / "__init__.py")
        pack = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = pack
        spec.loader.exec_module(pack)
        import comfy.fake_networks
        import comfy.model_base
        import comfy.model_patcher
        import comfy.sd
        import comfy.supported_models
        import comfy_execution.utils
        from comfy_api.latest import io

        extension = asyncio.run(pack.comfy_entrypoint())
        nodes = {node.GET_SCHEMA().node_id: node for node in asyncio.run(extension.get_node_list())}
        yield {"nodes": nodes, "io": io, "context": comfy_execution.utils.CurrentNodeContext,
               "configs": comfy.supported_models, "bases": comfy.model_base, "networks": comfy.fake_networks,
               "patcher": comfy.model_patcher, "sd": comfy.sd}
    finally:
        sys.path.remove(str(fakes))
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("comfy", "comfy_api", "comfy_execution", "memguard_default_path_pack"):
                del sys.modules[name]


def _comfy_objects(comfy, name, model):
    pipe = model["pipe"]
    if name == "sdxl":
        config = comfy["configs"].SDXL({"in_channels": 4, "context_dim": 64, "adm_in_channels": 6 * 256 + 32})
        base = comfy["bases"].SDXL(config, comfy["networks"].UNetModel(pipe.unet))
    else:
        config = comfy["configs"].SD15({"context_dim": pipe.text_encoder.config.hidden_size, "in_channels": 4})
        base = comfy["bases"].BaseModel(config, comfy["networks"].UNetModel(pipe.unet))
    return comfy["patcher"].ModelPatcher(base), comfy["sd"].CLIP(pipe)


def _via_comfyui(comfy, name, model, policy, calibration, log, prompt, tmp_path):
    """A ComfyUI user names a calibration file in a policy of their own: the shipped policy with `calibration:`.
    The node is given the tiny model's latent size (what a user sets for a model of non-native size); left at 0 it
    would score at the family's native size (SDXL: 128x128 latents), 16x the work for the same verdicts."""
    from guard.policy import load_policy

    policy_path = ""
    if calibration is not None:
        data = load_policy(policy).model_dump(mode="json")
        data["calibration"] = str(calibration)
        policy_path = tmp_path / f"{policy}-calibrated.json"
        policy_path.write_text(json.dumps(data))
    patched, clip = _comfy_objects(comfy, name, model)
    encoded, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    empty, empty_pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    graph = {"t": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["c", 0]}},
             "g": {"class_type": "MemguardMemorizationGuard", "inputs": {"positive": ["t", 0]}}}
    node = comfy["nodes"]["MemguardMemorizationGuard"]
    hidden = comfy["io"].Hidden
    clone = node.PREPARE_CLASS_CLONE({hidden.unique_id: "g", hidden.prompt: graph})
    with comfy["context"]("queue-item-1", "g"):
        out = clone.execute(model=patched, clip=clip, positive=[[encoded, {"pooled_output": pooled}]],
                            negative=[[empty, {"pooled_output": empty_pooled}]], policy=policy,
                            policy_path=str(policy_path), unconditional="empty prompt (reference)", seed=-1,
                            samples=0, latent_size=model["pipe"].unet.config.sample_size, audit_path=str(log))
    return out


# ---------------------------------------------------------------------------------------------- the matrix


def _records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("model_name", MODELS)
def test_default_path_cell(model_name, source, policy, front_end, models, calibrations, tmp_path, request):
    model = models[model_name]
    calibration = calibrations(model_name, source)
    comfy = request.getfixturevalue("comfy") if front_end == "comfyui" else None
    for kind in ("ordinary", "memorized"):
        prompt = model[kind]
        log = tmp_path / f"{kind}.jsonl"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fit-check and memorization warnings are part of the path, not errors
            if front_end == "guard":
                report, delivered = _via_guard(model, policy, calibration, log, prompt)
                actions, request_id = report.actions, report.request_id
                blocked = report.blocked
                assert delivered == ("raised" if blocked and not report.withheld else
                                     "withheld" if blocked else "images")
            elif front_end.startswith("service"):
                body, status = _via_service(model, policy, calibration, log, prompt, front_end.split("-")[1])
                actions = [d["action"] for d in body["decisions"]]
                request_id = body["request_id"]
                blocked = status == 403
                if front_end == "service-check":
                    assert status == 200
                else:
                    assert (status == 403) == ("block" in actions)
                    assert blocked or len(body["images"]) == 1
            else:
                out = _via_comfyui(comfy, model_name, model, policy, calibration, log, prompt, tmp_path)
                report = out.args[2]
                blocked = type(out.args[0]).__name__ == "ExecutionBlocker"  # the conditioning never reaches a sampler
                actions, request_id = None, report.split("request ", 1)[1].split()[0]
        records = _records(log)
        decided = [r for r in records if r["event"] in ("decision", "error") and r["request_id"] == request_id]
        done = [r for r in records if r["event"] == "outcome" and r["request_id"] == request_id]
        assert len(decided) == 1, records
        assert verify_log(log).ok
        if front_end == "service-check":
            assert decided[0]["outcome"] == "checked" and not done
            continue
        assert len(done) == 1 and done[0]["decision_hash"] == decided[0]["hash"]
        final = done[0]["action"]
        if actions is not None:
            assert actions == [final]
        expected = {"block": ("blocked", "withheld"), "allow": ("generated",), "warn": ("generated",),
                    "rewrite": ("rewritten",)}[final]
        if front_end == "comfyui" and final == "rewrite":
            expected = ("generated",)  # an unverified rewrite passed on as conditioning: never called rewritten
        assert done[0]["outcome"] in expected, (final, done[0])
        assert blocked == (final == "block")
        if model_name == "shipped" and kind == "memorized" and policy in ("strict", "balanced"):
            assert done[0]["outcome"] in ("rewritten", "blocked"), done[0]  # never released as it is


@pytest.mark.parametrize("family", ["sd2", "sdxl", "sd3", "flux", "pixart"])
def test_strict_with_automatic_calibration_rewrites_verified_or_blocks_on_every_family(family, tmp_path):
    """`guard(prompt=<flagged>)` under the shipped strict policy with no calibration file: a verified rewrite or
    MemorizationBlocked, never an exception of another kind, on every family memguard supports."""
    from guard import testing
    from guard.scoring import Scorer

    pipe = {"sd2": lambda: testing.tiny_sd_pipeline("v_prediction", seed=1), "sdxl": testing.tiny_sdxl_pipeline,
            "sd3": testing.tiny_sd3_pipeline, "flux": testing.tiny_flux_pipeline,
            "pixart": testing.tiny_pixart_pipeline}[family]()
    if family == "flux":
        pipe.default_sample_size = 16  # FluxPipeline's native 128 x 128 latent: 64x the work for the same path
    _, _, candidates = _sdxl_prompts()
    top = max(Scorer(pipe).score(candidates[:30]), key=lambda s: s.score).prompt
    log = tmp_path / "a.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = Guard(pipe, "strict", audit_path=log)
        try:
            out = guard(prompt=top, num_inference_steps=STEPS, output_type="latent",
                        generator=torch.Generator().manual_seed(0))
            report = out.memguard
        except MemorizationBlocked as blocked:
            report = blocked.report
    (decision,) = report.decisions
    (done,) = [r for r in _records(log) if r["event"] == "outcome"]
    if decision.action == "rewrite":
        assert report.mitigations[0].verified and done["outcome"] == "rewritten"
    else:
        assert done["outcome"] in ("generated", "blocked") and done["action"] == decision.action
    assert verify_log(log).ok
