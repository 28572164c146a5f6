"""OpenTelemetry spans for memguard's decision path, through ``opentelemetry-api`` only.

Without an SDK configured by the application every span is a no-op (the API's default). Spans:

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

import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from ._version import __version__

if TYPE_CHECKING:
    from .core import GuardCore, GuardReport, Mode, Submission
    from .policy import Decision

__all__ = ["configure_from_environment", "span", "traced"]

F = TypeVar("F", bound=Callable[..., Any])
Finish = Callable[[Any], None]
_tracer = trace.get_tracer("memguard", __version__)
_EVALUATION = "memguard.memorization"


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


def traced(make: Callable[..., Any]) -> Callable[[F], F]:
    """Runs the decorated function inside the span context manager ``make(*args, **kwargs)`` opens; the
    callback it yields is given the function's result (for result attributes)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with make(*args, **kwargs) as finish:
                result = fn(*args, **kwargs)
                finish(result)
                return result

        return inner  # type: ignore[return-value]

    return decorate


def _policy_attributes(core: GuardCore) -> dict[str, Any]:
    return {
        "memguard.policy.name": core.policy.name,
        "memguard.policy.version": core.policy.version,
        "memguard.policy.hash": core.policy.content_hash,
        "gen_ai.request.model": str(core.model_id),
        "memguard.source": core.source,
    }


@contextmanager
def check_span(core: GuardCore, requests: Sequence[Submission], *, mode: Mode = "check") -> Iterator[Finish]:
    """``memguard.check`` around ``GuardCore.judge_many``."""
    attributes = {**_policy_attributes(core), "memguard.mode": mode, "memguard.requests": len(requests),
                  "memguard.prompts": sum(len(r.prompts) for r in requests)}
    with span("memguard.check", attributes) as current:

        def finish(result: tuple[list[GuardReport], Any]) -> None:
            if not current.is_recording():
                return
            reports = result[0]
            decisions = [d for report in reports for d in report.decisions]
            current.set_attribute("memguard.request_ids", [r.request_id for r in reports])
            current.set_attribute("memguard.actions", [d.action for d in decisions])
            current.set_attribute("memguard.rules", [d.rule for d in decisions])
            current.set_attribute("memguard.blocked", sum(d.action == "block" for d in decisions))
            if any(r.audit_error for r in reports):
                current.set_attribute("memguard.audit_error", True)

        yield finish


def score_span(core: GuardCore, n_prompts: int) -> Any:
    """``memguard.score`` around encoding and scoring one batch."""
    profile = core.scorer.profile.name if core.scorer is not None else None
    return span("memguard.score", {**_policy_attributes(core), "memguard.prompts": n_prompts,
                                   "memguard.profile": profile})


@contextmanager
def decide_span(core: GuardCore, prompt: str | None, score: Any, index: int, *_: Any, **__: Any) -> Iterator[Finish]:
    """``memguard.decide`` around one prompt's decision (the prompt argument is not looked at)."""
    with span("memguard.decide", {"memguard.policy.name": core.policy.name, "memguard.prompt_index": index,
                                  "gen_ai.evaluation.name": _EVALUATION}) as current:

        def finish(decision: Decision) -> None:
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

        yield finish


@contextmanager
def rewrite_span(core: GuardCore, report: GuardReport, *_: Any, **__: Any) -> Iterator[Finish]:
    """``memguard.rewrite`` around ``GuardCore.rewrite``, when a prompt is to be rewritten."""
    asked = [d.prompt_index for d in report.decisions if d.action == "rewrite"]
    if not asked:
        yield lambda _: None
        return
    with span("memguard.rewrite", {**_policy_attributes(core), "memguard.request_id": report.request_id,
                                   "memguard.rewrites": len(asked)}) as current:

        def finish(_: Any) -> None:
            if not current.is_recording() or not report.mitigations:
                return
            done = [report.mitigations[i] for i in sorted(report.mitigations)]
            current.set_attribute("memguard.rewrite.methods", [m.method or "none" for m in done])
            current.set_attribute("memguard.rewrite.met", [bool(m.met) for m in done])
            current.set_attribute("memguard.rewrite.verified", [bool(m.verified) for m in done])
            current.set_attribute("memguard.rewrite.steps", [int(m.steps) for m in done])
            current.set_attribute("memguard.actions", [d.action for d in report.decisions])

        yield finish


def generate_span(core: GuardCore, report: GuardReport, n_prompts: int) -> Any:
    """The guarded pipeline call, named and described as a GenAI inference span."""
    model = str(core.model_id)
    return span(f"generate_content {model}", {
        "gen_ai.operation.name": "generate_content",
        "gen_ai.provider.name": "diffusers",
        "gen_ai.request.model": model,
        "gen_ai.output.type": "image",
        "memguard.request_id": report.request_id,
        "memguard.policy.name": core.policy.name,
        "memguard.prompts": n_prompts,
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
