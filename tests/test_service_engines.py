"""``memguard serve --engine ray`` without a cluster: its options are checked before anything starts, the CLI hands
the replicas what they need, and the KubeRay manifest in docs/deployment.md is one memguard and Ray Serve accept."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from guard.cli import main
from guard.service.ray_serve import (
    INGRESS_DEPLOYMENT,
    RayServeError,
    ServeArgs,
    forwarded_environment,
    replica_writer_id,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arguments,message", [
    (["--replicas", "0"], "Invalid value for '--replicas': 0 is not in the range x>=1"),
    (["--replicas", "2"], "--replicas needs --engine ray"),
    (["--num-gpus-per-replica", "1"], "--num-gpus-per-replica needs --engine ray"),
    (["--address", "auto"], "--address needs --engine ray"),
    (["--engine", "ray"], "--engine ray needs --audit DIR/"),
    (["--engine", "ray", "--audit", "AUDIT_FILE"], "audit (--audit): 'AUDIT_FILE' is not a trail directory"),
    (["--engine", "ray", "--audit", "TRAIL/", "--min-replicas", "1"],
     "autoscaling needs both min_replicas (--min-replicas) and max_replicas (--max-replicas)"),
    (["--engine", "ray", "--audit", "TRAIL/", "--replicas", "2", "--min-replicas", "1", "--max-replicas", "3"],
     "give replicas (--replicas) for a fixed number of replicas or min_replicas (--min-replicas)"),
    (["--engine", "ray", "--audit", "TRAIL/", "--min-replicas", "4", "--max-replicas", "2"],
     "min_replicas (--min-replicas) (4) is more than max_replicas (--max-replicas) (2)"),
    (["--engine", "ray", "--audit", "TRAIL/", "--target-ongoing-requests", "8"],
     "target_ongoing_requests (--target-ongoing-requests) is an autoscaling target"),
    (["--engine", "ray", "--audit", "TRAIL/", "--max-ongoing-requests", "4"],
     "max_ongoing_requests (--max-ongoing-requests) = 4 is less than max_batch (--max-batch) = 16"),
])
def test_engine_options_are_checked_before_anything_starts(tmp_path, arguments, message):
    (tmp_path / "audit.jsonl").write_text("")
    arguments = [a.replace("AUDIT_FILE", str(tmp_path / "audit.jsonl")).replace("TRAIL", str(tmp_path / "trail"))
                 for a in arguments]
    message = message.replace("AUDIT_FILE", str(tmp_path / "audit.jsonl"))
    result = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "model"), *arguments])
    assert result.exit_code != 0
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "trail").exists()  # refused before any replica could start


def test_serve_args_name_the_bad_field(tmp_path):
    with pytest.raises(RayServeError, match=r"^replicas: Input should be greater than or equal to 1$"):
        ServeArgs.parse({"model": "m", "audit": "a/", "replicas": 0})
    with pytest.raises(RayServeError, match=r"^num_gpu_per_replica: unknown field$"):
        ServeArgs.parse({"model": "m", "audit": "a/", "num_gpu_per_replica": 1})
    with pytest.raises(RayServeError, match=r"^model: Field required$"):
        ServeArgs.parse({"audit": "a/"})
    assert ServeArgs.parse({"model": "m", "audit": str(tmp_path)}).audit == str(tmp_path) + "/"  # a directory
    options = ServeArgs.parse({"model": "m", "audit": "/trail/", "replicas": 3, "num_gpus_per_replica": 1,
                               "max_batch": 8}).deployment_options()
    assert options["num_replicas"] == 3 and options["max_ongoing_requests"] == 16
    assert options["ray_actor_options"]["num_gpus"] == 1 and "autoscaling_config" not in options
    scaling = ServeArgs.parse({"model": "m", "audit": "/trail/", "min_replicas": 1, "max_replicas": 8}
                              ).deployment_options()
    assert scaling["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 16.0}
    assert "num_replicas" not in scaling


def test_writer_ids_and_forwarded_environment():
    assert replica_writer_id("memguard", "ab12cd34") == "memguard-ab12cd34"
    assert replica_writer_id("my app", "x/y") == "my-app-x-y"  # only characters a segment name may have
    forwarded = forwarded_environment({"MEMGUARD_AUDIT_SIGNING_KEY": "/k", "MEMGUARD_AUDIT_WRITER": "fixed",
                                       "OTEL_SERVICE_NAME": "g", "HOME": "/root"})
    assert forwarded == {"MEMGUARD_AUDIT_SIGNING_KEY": "/k", "OTEL_SERVICE_NAME": "g"}  # never one writer id for all


def test_the_cli_gives_the_replicas_absolute_paths_and_its_environment(tmp_path, monkeypatch):
    pytest.importorskip("ray.serve", reason="--engine ray needs Ray Serve: pip install 'memguard[ray]'")
    import guard.service.ray_serve as ray_serve

    (tmp_path / "model").mkdir()
    (tmp_path / "policy.yaml").write_text(json.dumps({"name": "p", "calibration": "off", "rules": []}))
    seen = {}
    monkeypatch.setattr(ray_serve, "serve_forever", lambda args, **kw: seen.update(args=args, **kw))
    monkeypatch.setenv("MEMGUARD_AUDIT_SIGNING_KEY", str(tmp_path / "signing.key"))
    monkeypatch.setenv("MEMGUARD_AUDIT_WRITER", "must-not-travel")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [
        "serve", "--engine", "ray", "--model", "model", "--policy", "policy.yaml", "--audit", "trail/",
        "--replicas", "2", "--num-gpus-per-replica", "1", "--max-batch", "8", "--port", "8123", "--address", "auto"])
    assert result.exit_code == 0, result.output
    args = seen["args"]
    assert (args.model, args.policy, args.audit) == (str(tmp_path / "model"), str(tmp_path / "policy.yaml"),
                                                    str(tmp_path / "trail") + "/")
    assert (args.replicas, args.num_gpus_per_replica, args.max_batch, args.bind) == (2, 1.0, 8, "127.0.0.1:8123")
    assert args.env["MEMGUARD_AUDIT_SIGNING_KEY"] == str(tmp_path / "signing.key")
    assert "MEMGUARD_AUDIT_WRITER" not in args.env
    assert (seen["address"], seen["host"], seen["port"]) == ("auto", "127.0.0.1", 8123)


def _manifest() -> dict:
    text = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- kuberay-manifest -->\s*```yaml\n(.*?)```", text, re.S)
    assert match, "docs/deployment.md lost its KubeRay manifest (marked <!-- kuberay-manifest -->)"
    (document,) = list(yaml.safe_load_all(match.group(1)))
    return document


def _mounts(container: dict, volumes: list[dict]) -> dict[str, dict]:
    """mountPath -> the volume mounted there."""
    by_name = {v["name"]: v for v in volumes}
    return {m["mountPath"]: by_name[m["name"]] for m in container.get("volumeMounts", ())}


def _under(path: str, mounts: dict[str, dict]) -> dict | None:
    return next((volume for mount, volume in mounts.items()
                 if path == mount or path.startswith(mount.rstrip("/") + "/")), None)


def test_the_kuberay_manifest_in_the_docs():
    manifest = _manifest()
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (application,) = config["applications"]
    module, _, name = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    assert builder.__name__ == "app_builder" and callable(builder)
    args = ServeArgs.parse(application["args"])  # memguard's own check of every field
    cluster = manifest["spec"]["rayClusterConfig"]
    assert tuple(int(p) for p in cluster["rayVersion"].split(".")[:2]) >= (2, 60)
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert config["http_options"]["port"] in {p["containerPort"] for p in head["ports"]}
    (workers,) = cluster["workerGroupSpecs"]
    spec = workers["template"]["spec"]
    (worker,) = spec["containers"]
    mounts = _mounts(worker, spec["volumes"])
    gpus = int(worker["resources"]["limits"].get("nvidia.com/gpu", 0))
    assert gpus >= args.num_gpus_per_replica > 0 and workers["maxReplicas"] * gpus >= args.max_replicas
    assert "persistentVolumeClaim" in _under(args.model, mounts)
    audit = _under(args.audit, mounts)
    assert "persistentVolumeClaim" in audit and not audit["persistentVolumeClaim"].get("readOnly")
    key = application["runtime_env"]["env_vars"]["MEMGUARD_AUDIT_SIGNING_KEY"]
    secret = _under(key, mounts)["secret"]
    assert secret["defaultMode"] & 0o007 == 0 and spec["securityContext"]["fsGroup"]  # not world-readable
    assert "secret" in _under(args.api_keys, mounts)
    assert head["image"] == worker["image"]


def test_a_serve_config_without_api_keys_is_refused():
    pytest.importorskip("ray.serve", reason="Ray Serve: pip install 'memguard[ray]'")
    from guard.service.ray_serve import app_builder

    with pytest.raises(RayServeError, match="give api_keys .* or insecure_no_auth: true"):
        app_builder({"model": "m", "audit": "/trail/"})
    assert app_builder({"model": "m", "audit": "/trail/", "insecure_no_auth": True}) is not None


def test_the_kuberay_manifest_is_a_serve_config_ray_accepts():
    schema = pytest.importorskip("ray.serve.schema", reason="Ray Serve's config schema: pip install 'memguard[ray]'")
    config = yaml.safe_load(_manifest()["spec"]["serveConfigV2"])
    parsed = schema.ServeDeploySchema.model_validate(config)
    assert parsed.applications[0].import_path == "guard.service.ray_serve:app_builder"
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # what Serve does with args

    app = call_user_app_builder_with_args_if_necessary(import_attr(parsed.applications[0].import_path),
                                                       parsed.applications[0].args)
    deployment = app._bound_deployment
    assert deployment.name == INGRESS_DEPLOYMENT
    assert deployment.ray_actor_options["num_gpus"] == 1
    assert deployment._deployment_config.autoscaling_config.max_replicas == 8
