"""The Memorization Guard and Memorization Score nodes (ComfyUI V3 node API, ``comfy_api.latest``).

Both are thin: the score, the policy, the rewrite and the audit are memguard's own (``guard.Guard``
with a ``ComfyUIModelAdapter``), so a ComfyUI workflow is judged exactly as a diffusers call is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from comfy_api.latest import io

from guard import Guard
from guard.actions import GuardReport, plan_batch
from guard.audit import new_request_id
from guard.policy import Decision, Policy, decide_on_error, load_policy, shipped_policies
from guard.scoring import TextConditioning

from .adapter import ComfyUIModelAdapter, comfy_from_conditioning, conditioning_from_comfy

CATEGORY = "memguard"
UNCOND_EMPTY = "empty prompt (reference)"
UNCOND_NEGATIVE = "negative conditioning"
_FALLBACK_POLICIES = ("balanced", "monitor", "strict")


def policy_choices() -> list[str]:
    names = shipped_policies() or list(_FALLBACK_POLICIES)
    return ["balanced", *[name for name in names if name != "balanced"]] if "balanced" in names else names


def resolve_policy(policy: str, policy_path: str, seed: int, samples: int) -> Policy:
    """The shipped policy named in the dropdown, or the YAML at ``policy_path``; seed/samples overridden
    when set (>= 0 / > 0), which changes the policy's hash in the audit record, as it should."""
    loaded = load_policy(policy_path.strip() if policy_path and policy_path.strip() else policy)
    update: dict[str, Any] = {}
    if seed is not None and seed >= 0:
        update["noise_seed"] = int(seed)
    if samples is not None and samples > 0:
        update["samples"] = int(samples)
    if not update:
        return loaded
    scoring = loaded.scoring.model_copy(update=update)
    return loaded.model_copy(update={"scoring": scoring})


def comfy_context(hidden: Any) -> dict[str, Any]:
    """ComfyUI's prompt (queue item) id and node id, for the audit record.

    The node id is the hidden ``UNIQUE_ID`` input; ComfyUI's V3 ``Hidden`` has no prompt id (v0.3.64),
    so it comes from the executing context that ComfyUI sets around every node call.
    """
    node_id = getattr(hidden, "unique_id", None) if hidden is not None else None
    prompt_id = None
    try:
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
    except ImportError:
        context = None
    if context is not None:
        prompt_id = context.prompt_id
        node_id = node_id if node_id is not None else context.node_id
    return {
        "prompt_id": None if prompt_id is None else str(prompt_id),
        "node_id": None if node_id is None else str(node_id),
    }


@contextlib.contextmanager
def autograd_weights(module: torch.nn.Module) -> Iterator[None]:
    """Let autograd run through weights ComfyUI created under ``torch.inference_mode`` (its loaders do).

    Inference tensors cannot be saved for backward, which the prompt-embedding rewrite needs; for its
    duration the parameters are swapped for ordinary copies (more memory, for a few steps) and restored.
    """
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_inference():
                    swapped.append((sub, name, param))
                    sub._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=False)
        yield
    finally:
        for sub, name, param in swapped:
            sub._parameters[name] = param


def _plain(conditioning: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """A copy of a CONDITIONING list whose tensors are ordinary (not inference-mode) tensors."""
    out = []
    for entry in conditioning:
        options = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in dict(entry[1]).items()}
        out.append([entry[0].clone(), options])
    return out


def _adapter(
    model: Any, clip: Any, negative: Sequence[Sequence[Any]] | None, unconditional: str, latent_size: int
) -> ComfyUIModelAdapter:
    uncond: TextConditioning | None = None
    if unconditional == UNCOND_NEGATIVE:
        if not negative:
            raise ValueError("unconditional is set to the negative conditioning, but none is connected")
        uncond = conditioning_from_comfy(negative)
    return ComfyUIModelAdapter(model, clip, unconditional=uncond, latent_size=latent_size or None)


def _report(decisions: Sequence[Decision], report: GuardReport, policy: Policy, blocked: bool) -> str:
    lines = [f"memguard policy {policy.name} v{policy.version}; request {report.request_id}"]
    for decision in decisions:
        score = decision.score
        shown = "n/a" if score is None else f"{score.score:.4f} (norm {score.norm:.4f}, cos {score.cos:.4f})"
        lines.append(f"[{decision.prompt_index}] {decision.action}: score {shown}; {decision.reason}")
        mitigation = report.mitigations.get(decision.prompt_index)
        if mitigation is not None:
            lines.append(
                f"    rewritten in {mitigation.steps} steps: "
                f"{mitigation.score_before:.4f} -> {mitigation.score_after:.4f}"
            )
    if blocked:
        lines.append("blocked: the downstream branch does not run")
    return "\n".join(lines)


def _score_value(decisions: Sequence[Decision]) -> float:
    scores = [d.score.score for d in decisions if d.score is not None]
    return float(max(scores)) if scores else float("nan")


def run_guard(
    *,
    model: Any,
    clip: Any,
    positive: Sequence[Sequence[Any]],
    negative: Sequence[Sequence[Any]] | None,
    policy: Policy,
    unconditional: str,
    latent_size: int,
    audit_path: str,
    context: dict[str, Any],
    enforce: bool,
) -> tuple[list[list[Any]], list[Decision], GuardReport, bool]:
    """Score the positive conditioning's rows, decide, rewrite, audit. Returns the (possibly rewritten)
    conditioning, the decisions, the report and whether the branch is blocked."""
    request_id = new_request_id()
    adapter: ComfyUIModelAdapter | None = None
    setup_error: Exception | None = None
    try:
        adapter = _adapter(model, clip, negative, unconditional, latent_size)
    except Exception as error:
        setup_error = error
    guard = Guard(adapter if adapter is not None else model, policy, audit_path=audit_path.strip() or None)
    if setup_error is not None:
        guard.scorer, guard.setup_error = None, setup_error
    try:
        return _judge(guard, positive, policy, unconditional, context, enforce, request_id)
    finally:
        guard.audit.close()


def _judge(
    guard: Guard,
    positive: Sequence[Sequence[Any]],
    policy: Policy,
    unconditional: str,
    context: dict[str, Any],
    enforce: bool,
    request_id: str,
) -> tuple[list[list[Any]], list[Decision], GuardReport, bool]:
    cond = conditioning_from_comfy(positive)
    prompts: list[str | None] = [None] * len(cond)
    decisions, cond = guard.decide(prompts, cond=cond)
    report = GuardReport(request_id=request_id, decisions=decisions)
    plan = plan_batch(policy, decisions)
    if enforce and not plan.blocked_whole and cond is not None and any(d.action == "rewrite" for d in decisions):
        decisions = _rewrite(guard, decisions, cond, report)
        report.decisions = decisions
        plan = plan_batch(policy, decisions)
    blocked = enforce and any(d.blocked for d in decisions)
    output = positive
    if enforce and report.mitigations and cond is not None:
        output = comfy_from_conditioning(positive, cond.embeds)
    extras = {"comfyui": {**context, "unconditional": "negative" if unconditional == UNCOND_NEGATIVE else "empty"}}
    for decision in decisions:
        mitigation = report.mitigations.get(decision.prompt_index)
        outcome = "checked" if not enforce else "blocked" if blocked else "rewritten" if mitigation else "generated"
        record_extras = dict(extras)
        if mitigation is not None:
            record_extras["mitigation"] = mitigation.to_dict()
        guard.audit.log_decision(decision, prompt=None, outcome=outcome, extras=record_extras, request_id=request_id)
    report.blocked = blocked
    return output, decisions, report, blocked


def _rewrite(guard: Guard, decisions: list[Decision], cond: TextConditioning, report: GuardReport) -> list[Decision]:
    """memguard's own rewrite (``apply_rewrites``); initial-noise mitigation needs the sampler's latents,
    which a conditioning node never sees, so such a rule takes the policy's ``on_error`` action."""
    from guard.actions.mitigation import apply_rewrites

    decisions = list(decisions)
    for position, decision in enumerate(decisions):
        if (
            decision.action == "rewrite"
            and decision.rewrite is not None
            and decision.rewrite.method != "prompt_embedding"
        ):
            message = f"rewrite method {decision.rewrite.method} is not available in the ComfyUI guard node"
            decisions[position] = decide_on_error(guard.policy, decision.prompt_index, message, score=decision.score)
    rewrites = [d for d in decisions if d.action == "rewrite"]
    if not rewrites:
        return decisions
    adapter = guard.scorer.adapter if guard.scorer is not None else None
    weights = adapter.base_model.diffusion_model if isinstance(adapter, ComfyUIModelAdapter) else torch.nn.Module()
    with autograd_weights(weights):
        return apply_rewrites(guard, decisions, rewrites, cond, {}, report)


def _common_inputs() -> list[Any]:
    return [
        io.Model.Input("model"),
        io.Clip.Input("clip", tooltip="encodes the empty prompt, the score's unconditional branch"),
        io.Conditioning.Input("positive"),
        io.Conditioning.Input("negative"),
        io.Combo.Input("policy", options=policy_choices(), default="balanced"),
        io.String.Input("policy_path", default="", tooltip="a policy YAML file; overrides the dropdown when set"),
        io.Combo.Input(
            "unconditional",
            options=[UNCOND_EMPTY, UNCOND_NEGATIVE],
            default=UNCOND_EMPTY,
            tooltip="what the prompt is compared with; calibrations assume the empty prompt",
        ),
        io.Int.Input(
            "seed",
            default=-1,
            min=-1,
            max=2**31 - 1,
            optional=True,
            tooltip="detection noise seed; -1: the policy's (independent of the sampler's seed)",
        ),
        io.Int.Input(
            "samples", default=0, min=0, max=64, optional=True, tooltip="noise samples per prompt; 0: the policy's"
        ),
        io.Int.Input(
            "latent_size",
            default=0,
            min=0,
            max=512,
            optional=True,
            tooltip="latent side of the detection noise; 0: the model's native size",
        ),
        io.String.Input(
            "audit_path",
            default="",
            optional=True,
            tooltip="audit log file; empty: $MEMGUARD_AUDIT_PATH or the policy's path",
        ),
    ]


def _execute(
    cls: type[io.ComfyNode], enforce: bool, kwargs: dict[str, Any]
) -> tuple[Any, list[Decision], GuardReport, bool, Policy]:
    policy = resolve_policy(
        kwargs["policy"], kwargs.get("policy_path") or "", kwargs.get("seed", -1), kwargs.get("samples", 0)
    )
    with torch.inference_mode(False):
        positive = _plain(kwargs["positive"])
        negative = _plain(kwargs["negative"]) if kwargs.get("negative") else None
        output, decisions, report, blocked = run_guard(
            model=kwargs["model"],
            clip=kwargs.get("clip"),
            positive=positive,
            negative=negative,
            policy=policy,
            unconditional=kwargs.get("unconditional") or UNCOND_EMPTY,
            latent_size=int(kwargs.get("latent_size") or 0),
            audit_path=kwargs.get("audit_path") or "",
            context=comfy_context(cls.hidden),
            enforce=enforce,
        )
    return output, decisions, report, blocked, policy


class MemorizationGuard(io.ComfyNode):
    """Scores the positive prompt before sampling and applies a memguard policy to it."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemguardMemorizationGuard",
            display_name="Memorization Guard",
            category=CATEGORY,
            description=(
                "Scores how likely the positive prompt is to reproduce a training image (memguard) and applies "
                "a policy: allow, warn, rewrite (mitigated conditioning) or block (stops this branch). Audited."
            ),
            inputs=_common_inputs(),
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Float.Output(display_name="score"),
                io.String.Output(display_name="report"),
            ],
            hidden=[io.Hidden.unique_id],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, **kwargs: Any) -> io.NodeOutput:
        output, decisions, report, blocked, policy = _execute(cls, True, kwargs)
        text = _report(decisions, report, policy, blocked)
        score = _score_value(decisions)
        if blocked:
            reasons = "; ".join(d.reason for d in decisions if d.blocked)
            # The values are replaced by ComfyUI's ExecutionBlocker; they are given because a NodeOutput
            # without results is dropped by v0.3.64's executor instead of blocking.
            return io.NodeOutput(output, score, text, block_execution=f"memguard blocked this prompt: {reasons}")
        if any(d.action == "warn" for d in decisions):
            import logging

            logging.getLogger("memguard").warning("memguard: %s", text)
        return io.NodeOutput(output, score, text)


class MemorizationScore(io.ComfyNode):
    """The memorization score of the positive prompt, without acting on it (audited as ``checked``)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemguardMemorizationScore",
            display_name="Memorization Score",
            category=CATEGORY,
            description="memguard's memorization score of the positive prompt, and the decision the policy would take.",
            inputs=_common_inputs(),
            outputs=[
                io.Float.Output(display_name="score"),
                io.Float.Output(display_name="norm"),
                io.Float.Output(display_name="cos"),
                io.String.Output(display_name="report"),
            ],
            hidden=[io.Hidden.unique_id],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, **kwargs: Any) -> io.NodeOutput:
        _, decisions, report, _, policy = _execute(cls, False, kwargs)
        first = decisions[0].score if decisions else None
        nan = float("nan")
        return io.NodeOutput(
            _score_value(decisions),
            nan if first is None else float(first.norm),
            nan if first is None else float(first.cos),
            _report(decisions, report, policy, False),
        )


NODES: list[type[io.ComfyNode]] = [MemorizationGuard, MemorizationScore]

__all__ = ["NODES", "MemorizationGuard", "MemorizationScore"]
