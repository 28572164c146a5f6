"""OpenTelemetry spans for memguard's decision path, through ``opentelemetry-api`` only.

Without an SDK configured by the application every span is a no-op (the API's default). Spans:

* ``memguard.request``: one guarded generation call, from judging to its outcome records, parent of the rest;
* ``memguard.check``: one judging pass (``GuardCore.judge_many``), with the policy, model, mode, and per
  prompt the action and rule (arrays in prompt order, requests concatenated);
* ``memguard.score``: encoding and scoring the prompts of one batch;
* ``memguard.decide``: one prompt's decision: action, rule, score, following the GenAI evaluation attributes
  (``gen_ai.evaluation.name``, ``gen_ai.evaluation.score.value``, ``gen_ai.evaluation.score.label``);
* ``memguard.rewrite``: the mitigation of the prompts a policy rewrites;
* ``generate_content {model}``: the guarded pipeline call, as the GenAI conventions name an inference
  span (``gen_ai.operation.name = generate_content``, ``gen_ai.output.type = image``).

Prompt text never goes into a span, not even with the GenAI content-capture setting: the audit log's
prompt hash (matched through ``memguard.request_id``) is how to tell which prompt a span was about.
Exceptions are recorded by type only (``error.type``), since a message may quote its input.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from ._version import __version__
from .policy import Decision, Policy, RewriteResult

__all__ = ["SpanSubject", "configure_from_environment", "model_name", "span"]

_tracer = trace.get_tracer("memguard", __version__)
_EVALUATION = "memguard.memorization"


def model_name(model_id: str) -> str:
    """The model's name for spans: a hub id as is, a local path by its last component (a path says where files lie
    on one machine, and makes every machine's span names differ)."""
    text = str(model_id)
    if os.path.isabs(text) or text.startswith((".", "~")) or os.path.exists(text):
        return Path(text).expanduser().name or text
    return text


@dataclass(frozen=True)
class SpanSubject:
    """What every span of one guard names: its policy, its model and its front end."""

    policy: Policy
    model_id: str
    source: str

    @property
    def model(self) -> str:
        return model_name(self.model_id)

    def attributes(self) -> dict[str, Any]:
        return {
            "memguard.policy.name": self.policy.name,
            "memguard.policy.version": self.policy.version,
            "memguard.policy.hash": self.policy.content_hash,
            "gen_ai.request.model": self.model,
            "memguard.source": self.source,
        }


@contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """A span as the current one; an exception ends it with status ERROR and ``error.type`` (no message)."""
    clean = {k: v for k, v in (attributes or {}).items() if v is not None}
    with _tracer.start_as_current_span(name, attributes=clean, record_exception=False,
                                       set_status_on_exception=False) as current:
        try:
            yield current
        except BaseException as error:
            if current.is_recording():
                current.set_attribute("error.type", type(error).__qualname__)
                current.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise


def request_span(subject: SpanSubject, prompts: int) -> Any:
    """``memguard.request``: one guarded generation call, judging to outcome; the other spans are its children."""
    return span("memguard.request", {**subject.attributes(), "memguard.prompts": prompts})


def check_span(subject: SpanSubject, *, requests: int, prompts: int, mode: str) -> Any:
    """``memguard.check``: one judging pass over ``requests`` requests (``GuardCore.judge_many``)."""
    return span("memguard.check", {**subject.attributes(), "memguard.mode": mode, "memguard.requests": requests,
                                   "memguard.prompts": prompts})


def finish_check(current: Span, request_ids: Sequence[str], decisions: Sequence[Decision], audited: bool) -> None:
    """The check span's results: request ids, and per prompt the action and rule (requests concatenated)."""
    if not current.is_recording():
        return
    current.set_attribute("memguard.request_ids", list(request_ids))
    current.set_attribute("memguard.actions", [d.action for d in decisions])
    current.set_attribute("memguard.rules", [d.rule for d in decisions])
    current.set_attribute("memguard.blocked", sum(d.action == "block" for d in decisions))
    if not audited:
        current.set_attribute("memguard.audit_error", True)


def score_span(subject: SpanSubject, prompts: int, profile: str | None) -> Any:
    """``memguard.score``: encoding and scoring one batch."""
    return span("memguard.score", {**subject.attributes(), "memguard.prompts": prompts, "memguard.profile": profile})


def decide_span(subject: SpanSubject, index: int) -> Any:
    """``memguard.decide``: one prompt's decision (finished by ``finish_decide``)."""
    return span("memguard.decide", {"memguard.policy.name": subject.policy.name, "memguard.prompt_index": index,
                                    "gen_ai.evaluation.name": _EVALUATION})


def finish_decide(current: Span, decision: Decision) -> None:
    """The GenAI evaluation attributes of one decision: action (label), score (value), rule, calibration."""
    if not current.is_recording():
        return
    current.set_attribute("memguard.action", decision.action)
    current.set_attribute("memguard.rule", decision.rule)
    current.set_attribute("gen_ai.evaluation.score.label", decision.action)
    if decision.calibration_id:
        current.set_attribute("memguard.calibration", decision.calibration_id)
    measured = decision.score
    if measured is not None:
        for name in ("score", "norm", "cos"):
            current.set_attribute(f"memguard.{name}", float(getattr(measured, name)))
        current.set_attribute("gen_ai.evaluation.score.value", float(measured.score))
    if decision.error:
        current.set_attribute("memguard.error", True)


def rewrite_span(subject: SpanSubject, request_id: str, rewrites: int) -> Any:
    """``memguard.rewrite``: the ladders of the prompts a call rewrites (finished by ``finish_rewrite``)."""
    return span("memguard.rewrite", {**subject.attributes(), "memguard.request_id": request_id,
                                     "memguard.rewrites": rewrites})


def finish_rewrite(current: Span, results: Sequence[RewriteResult], decisions: Sequence[Decision]) -> None:
    if not current.is_recording() or not results:
        return
    current.set_attribute("memguard.rewrite.methods", [r.method or "none" for r in results])
    current.set_attribute("memguard.rewrite.met", [bool(r.met) for r in results])
    current.set_attribute("memguard.rewrite.verified", [bool(r.verified) for r in results])
    current.set_attribute("memguard.rewrite.steps", [int(r.steps) for r in results])
    current.set_attribute("memguard.actions", [d.action for d in decisions])


def generate_span(subject: SpanSubject, request_id: str, prompts: int) -> Any:
    """The release generation, named and described as a GenAI inference span (``generate_content {model}``)."""
    model = subject.model
    return span(f"generate_content {model}", {
        "gen_ai.operation.name": "generate_content",
        "gen_ai.provider.name": "diffusers" if subject.source != "comfyui" else "comfyui",
        "gen_ai.request.model": model,
        "gen_ai.output.type": "image",
        "memguard.request_id": request_id,
        "memguard.policy.name": subject.policy.name,
        "memguard.prompts": prompts,
    })


def configure_from_environment(service_name: str = "memguard") -> bool:
    """Install the OpenTelemetry SDK with an OTLP/HTTP exporter when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set and no tracer provider is configured yet; for
    ``memguard serve``. Returns whether it did. Raises ``ImportError`` with the install hint when the SDK
    or exporter is missing (``pip install 'memguard[serve]'``).
    """
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return False
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:
        raise ImportError(f"OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK or OTLP exporter is "
                          f"missing: pip install 'memguard[serve]' ({error})") from None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return True
