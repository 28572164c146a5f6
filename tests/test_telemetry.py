"""OpenTelemetry spans of the decision path, captured with the SDK's in-memory exporter: names, attributes,
nesting, and never the prompt text."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("opentelemetry.sdk", reason="the span tests need opentelemetry-sdk (the test extra)")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from guard import Guard, Scorer  # noqa: E402

SECRET = "secret magenta giraffe"  # words that must never show up in a span
OTHER = "a small dog in the garden"


@pytest.fixture(scope="module")
def exporter():
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "another SDK provider is installed"
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory


@pytest.fixture
def spans(exporter):
    exporter.clear()

    def finished():
        return {s.name: s for s in exporter.get_finished_spans()}, list(exporter.get_finished_spans())

    return finished


def policy(**overrides):
    base = {"name": "otel", "version": 2, "calibration": "off", "default": "allow",
            "rules": [{"name": "high", "when": {"score": {"gte": 1e9}}, "action": "block"}]}
    base.update(overrides)
    return base


def dump(all_spans) -> str:
    """Everything a span carries that an exporter would send."""
    return json.dumps([json.loads(s.to_json()) for s in all_spans])


def test_check_score_and_decide_spans(sd_pipe, tmp_path, spans):
    guarded = Guard(sd_pipe, policy(), audit_path=tmp_path / "a.jsonl", model_id="tiny-sd")
    decisions = guarded.check_many([SECRET, OTHER])
    by_name, every = spans()
    check, score = by_name["memguard.check"], by_name["memguard.score"]
    decides = [s for s in every if s.name == "memguard.decide"]
    assert len(decides) == 2
    assert check.attributes["memguard.policy.name"] == "otel" and check.attributes["memguard.policy.version"] == "2"
    assert check.attributes["gen_ai.request.model"] == "tiny-sd" and check.attributes["memguard.mode"] == "check"
    assert tuple(check.attributes["memguard.actions"]) == ("allow", "allow")
    assert tuple(check.attributes["memguard.rules"]) == ("default", "default")
    assert check.attributes["memguard.prompts"] == 2 and score.attributes["memguard.prompts"] == 2
    for span in (score, *decides):
        assert span.parent is not None and span.parent.span_id == check.context.span_id
    for span, decision in zip(sorted(decides, key=lambda s: s.attributes["memguard.prompt_index"]), decisions):
        assert span.attributes["memguard.action"] == decision.action == span.attributes["gen_ai.evaluation.score.label"]
        assert span.attributes["memguard.score"] == pytest.approx(decision.score.score)
        assert span.attributes["gen_ai.evaluation.score.value"] == pytest.approx(decision.score.score)
        assert span.attributes["gen_ai.evaluation.name"] == "memguard.memorization"
    assert "magenta" not in dump(every) and "giraffe" not in dump(every)


def test_generate_span_follows_the_genai_conventions(sd_pipe, tmp_path, spans):
    guarded = Guard(sd_pipe, policy(), audit_path=tmp_path / "a.jsonl", model_id="tiny-sd")
    out = guarded(prompt=SECRET, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    by_name, every = spans()
    generate = by_name["generate_content tiny-sd"]
    assert generate.attributes["gen_ai.operation.name"] == "generate_content"
    assert generate.attributes["gen_ai.request.model"] == "tiny-sd"
    assert generate.attributes["gen_ai.output.type"] == "image"
    assert generate.attributes["memguard.request_id"] == out.memguard.request_id
    assert by_name["memguard.check"].attributes["memguard.mode"] == "generate"
    assert "memguard.rewrite" not in by_name  # nothing to rewrite: no span
    assert "magenta" not in dump(every)


class _QuotingFailure:
    """A pipeline whose error message quotes its input, as some libraries' errors do."""

    def __call__(self, **kwargs):
        raise RuntimeError(f"cannot generate {SECRET!r}")


def test_a_failure_is_recorded_by_type_never_by_message(sd_pipe, tmp_path, spans):
    guarded = Guard(sd_pipe, policy(), audit_path=tmp_path / "a.jsonl", model_id="tiny-sd")
    guarded.pipe = _QuotingFailure()
    with pytest.raises(RuntimeError, match="magenta"):
        guarded(prompt=SECRET, num_inference_steps=2, output_type="np")
    by_name, every = spans()
    failed = by_name["generate_content tiny-sd"]
    assert failed.status.status_code == trace.StatusCode.ERROR
    assert failed.attributes["error.type"] == "RuntimeError" and not failed.events
    assert "magenta" not in dump(every)


def test_rewrite_span(sd_pipe, tmp_path, spans):
    high = Scorer(sd_pipe).score([SECRET])[0].score
    rewrite = {"name": "rewrite-all", "when": {"score": {"gte": -1e9}}, "action": "rewrite",
               "rewrite": {"method": "prompt_embedding", "target": {"score": high - 0.02}, "max_steps": 10,
                           "verify": {"max_similarity": 1.0}}}
    guarded = Guard(sd_pipe, policy(rules=[rewrite]), audit_path=tmp_path / "a.jsonl")
    out = guarded(prompt=SECRET, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    by_name, every = spans()
    span = by_name["memguard.rewrite"]
    assert span.attributes["memguard.rewrites"] == 1
    assert tuple(span.attributes["memguard.rewrite.methods"]) == ("prompt_embedding",)
    assert tuple(span.attributes["memguard.rewrite.met"]) == (out.memguard.mitigations[0].met,)
    assert tuple(span.attributes["memguard.rewrite.verified"]) == (True,)
    assert "magenta" not in dump(every)


def test_the_library_needs_only_the_api():
    code = ("import sys, guard, guard.core, guard.telemetry\n"
            "assert not [m for m in sys.modules if m.startswith('opentelemetry.sdk')], 'SDK imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]


def test_serve_installs_the_sdk_only_when_an_otlp_endpoint_is_set():
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the serve extra's OTLP exporter")
    code = ("from opentelemetry import trace\nfrom guard.telemetry import configure_from_environment\n"
            "print(configure_from_environment(), type(trace.get_tracer_provider()).__module__)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | {"OMP_NUM_THREADS": "1"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert off.returncode == 0 and off.stdout.split() == ["False", "opentelemetry.trace"], off.stderr[-2000:]
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                        env=env | {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    assert on.returncode == 0 and on.stdout.split() == ["True", "opentelemetry.sdk.trace"], on.stderr[-2000:]


def test_a_guarded_call_is_one_trace_named_without_local_paths(sd_pipe, tmp_path, spans):
    """The failure this replaced: check and generate were two unrelated root traces, and the generation span's name
    held the model's local path (one span name per machine, and where the files lie)."""
    model_dir = tmp_path / "models" / "tiny-local"
    guarded = Guard(sd_pipe, policy(), audit_path=tmp_path / "a.jsonl", model_id=str(model_dir))
    guarded(prompt=SECRET, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    by_name, every = spans()
    roots = [s for s in every if s.parent is None]
    assert [s.name for s in roots] == ["memguard.request"]
    assert {s.context.trace_id for s in every} == {roots[0].context.trace_id}
    assert {"memguard.check", "memguard.score", "generate_content tiny-local"} <= set(by_name)
    assert str(tmp_path) not in dump(every)
