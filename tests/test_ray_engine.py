"""The Ray scan engine against the local one, on a local 2-CPU Ray and a saved tiny pipeline."""

from __future__ import annotations

import json
import os
import sys

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'memguard[ray]' to run these tests")
pytest.importorskip("ray.data", reason="the Ray engine needs Ray Data: pip install 'ray[data]'")

from guard.engines import ScanJob, scan_local  # noqa: E402
from guard.engines.ray_engine import scan_ray  # noqa: E402
from guard.loading import load_pipeline  # noqa: E402

PROMPTS = ["a photo of a cat", "", "red car on a street", "old man with a hat", "a dog in the sea",
           "watercolor landscape", "  ", "night city", "portrait of a young woman", "golden sun over a lake"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from guard.testing import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("model") / "tiny-sd"
    tiny_sd_pipeline("epsilon").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def local_rows(model_dir, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "local.jsonl"
    scan_local(ScanJob(str(model_dir), str(prompts_file), str(out), scoring={"batch_size": 3}))
    return read_rows(out)


@pytest.fixture(scope="module")
def ray_cluster():
    # Workers must import the test module's helpers (the failing loader) by value, not by name.
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def assert_same_scores(got: list[dict], want: list[dict]) -> None:
    assert [r["index"] for r in got] == list(range(len(want)))
    for a, b in zip(got, want):
        assert a["prompt"] == b["prompt"]
        for key in ("norm", "cos", "score"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["index"], key)
        assert {k: v for k, v in a.items() if k not in ("norm", "cos", "score")} == {
            k: v for k, v in b.items() if k not in ("norm", "cos", "score")
        }


def test_ray_engine_cli_matches_local_engine(ray_cluster, model_dir, prompts_file, local_rows, tmp_path):
    from click.testing import CliRunner

    from guard.cli import main

    out = tmp_path / "ray.jsonl"
    result = CliRunner().invoke(main, ["scan", "--model", str(model_dir), "--prompts", str(prompts_file),
                                       "--out", str(out), "--batch-size", "3", "--engine", "ray", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "scored 8 prompts" in result.output  # blank lines skipped, as locally
    assert_same_scores(read_rows(out), local_rows)


def test_ray_resumes_interrupted_run_and_retries_failed_batch(ray_cluster, model_dir, prompts_file, local_rows,
                                                               tmp_path):
    out = tmp_path / "ray.jsonl"
    with open(out, "w", encoding="utf-8") as handle:  # an interrupted run: 3 rows, then a torn fourth
        for row in local_rows[:3]:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.write('{"index": 3, "prom')
    marker = tmp_path / "fail-once"
    marker.touch()
    job = ScanJob(str(model_dir), str(prompts_file), str(out), scoring={"batch_size": 3}, resume=True)
    scored = scan_ray(job, workers=1, max_retries=2, loader=_failing_once_loader(str(marker)))
    assert not marker.exists(), "the injected failure did not happen"
    assert scored == 5
    assert_same_scores(read_rows(out), local_rows)


def _failing_once_loader(marker: str):
    """A loader whose UNet raises on its first call while ``marker`` exists (state shared across processes)."""

    def load(model, *, device=None, dtype=None):
        pipe = load_pipeline(model, device=device, dtype=dtype)
        forward = pipe.unet.forward

        def flaky_forward(*args, **kwargs):
            if os.path.exists(marker):
                os.remove(marker)
                raise RuntimeError("injected worker failure")
            return forward(*args, **kwargs)

        pipe.unet.forward = flaky_forward
        return pipe

    return load


def test_ray_options_need_ray_engine(model_dir, prompts_file, tmp_path):
    from click.testing import CliRunner

    from guard.cli import main

    result = CliRunner().invoke(main, ["scan", "--model", str(model_dir), "--prompts", str(prompts_file),
                                       "--out", str(tmp_path / "x.jsonl"), "--workers", "2"])
    assert result.exit_code != 0 and "--engine ray" in result.output


def test_ray_engine_scores_a_flow_pipeline_like_the_local_one(ray_cluster, prompts_file, tmp_path):
    """A saved SD3 pipeline (rectified flow, velocity space, three text encoders) through the actor pool."""
    from guard.testing import tiny_sd3_pipeline

    model = tmp_path / "tiny-sd3"
    tiny_sd3_pipeline(seed=3).save_pretrained(model)
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    scan_local(ScanJob(str(model), str(prompts_file), str(local), scoring={"batch_size": 3}))
    assert scan_ray(ScanJob(str(model), str(prompts_file), str(remote), scoring={"batch_size": 3}), workers=1) == 8
    rows = read_rows(local)
    assert {(r["profile"], r["prediction_space"], r["t_hi"]) for r in rows} == {("sd3", "velocity", 1000.0)}
    assert_same_scores(read_rows(remote), rows)
