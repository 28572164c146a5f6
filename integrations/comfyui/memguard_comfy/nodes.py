"""memguard's ComfyUI nodes (V3 node API, ``comfy_api.latest``): Memorization Guard, Memorization-Guarded KSampler,
Memorization Score, and the error node a block ends in.

All are thin front ends of memguard's judging core (``guard.GuardCore``): the score, the policy, the
rewrite and the audit are the ones a diffusers ``Guard`` uses. The guarded KSampler gives the core ComfyUI's own
sampling as its generator (``sampling.ComfySampler``), so it can rewrite and verify; the guard node passes
conditioning on and can only allow or block. Both run on every queue item (their fingerprint never repeats), so
every generation through them is judged and audited whatever ComfyUI caches, and a block ends the queue item in an
error whose message is the reason (after the report output has reached its viewers).

One core is kept per model (as patched) and settings, so the model fingerprint and the cache of unconditional
predictions survive between runs.

Every entry of the positive CONDITIONING is scored (each row of each entry is one prompt); with the
policy's ``batch: drop_blocked`` blocked entries are dropped from the conditioning, otherwise any blocked
entry blocks the branch. Prompt texts for the audit record's hash are read from the workflow: the
``CLIPTextEncode``-style nodes (and ``ConditioningCombine`` chains, through ``FluxGuidance``) that feed
``positive``. SDXL's size conditioning is the one the entries carry (``CLIPTextEncodeSDXL``), else the native size.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from comfy_api.latest import io

from guard import GuardCore, GuardReport
from guard.actions import MemorizationBlocked
from guard.errors import MemguardError
from guard.policy import Decision, Policy, load_policy, shipped_policies
from guard.scoring import TextConditioning

from .adapter import (
    ComfyUIModelAdapter,
    SizeConditioning,
    cat_token_lengths,
    comfy_adapter,
    comfy_family,
    conditioning_from_comfy,
    native_latent_size,
)
from .sampling import ComfySampler, KSamplerSettings

CATEGORY = "memguard"
UNCOND_EMPTY = "empty prompt (reference)"
UNCOND_NEGATIVE = "negative conditioning"
EXPLAIN_POLICY = "policy"
_FALLBACK_POLICIES = ("balanced", "monitor", "strict")


def policy_choices() -> list[str]:
    names = shipped_policies() or list(_FALLBACK_POLICIES)
    return ["balanced", *[name for name in names if name != "balanced"]] if "balanced" in names else names


def resolve_policy(policy: str, policy_path: str, seed: int, samples: int, explain: str = EXPLAIN_POLICY) -> Policy:
    """The shipped policy named in the dropdown, or the YAML at ``policy_path``; seed/samples/explanations
    overridden when set (>= 0 / > 0 / not "policy"), which changes the policy's hash in the audit record, as it
    should. A fixed ``samples`` replaces an adaptive policy's sampling (and its adaptive settings)."""
    loaded = load_policy(policy_path.strip() if policy_path and policy_path.strip() else policy)
    update: dict[str, Any] = {}
    if seed is not None and seed >= 0:
        update["noise_seed"] = int(seed)
    if samples is not None and samples > 0:
        update.update(samples=int(samples), max_samples=None, band_quantile=None)
    changes: dict[str, Any] = {}
    if update:
        changes["scoring"] = loaded.scoring.model_copy(update=update)
    if explain and explain != EXPLAIN_POLICY:
        changes["explain"] = loaded.explain.model_copy(update={"when": explain})
    return loaded.model_copy(update=changes) if changes else loaded


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
def autograd_weights(module: torch.nn.Module, mutation: bool = True) -> Iterator[None]:
    """Let autograd run through a ComfyUI network, for the prompt-embedding rewrite.

    Two things stand in the way in ComfyUI: its loaders create the weights under ``torch.inference_mode``, and
    inference tensors cannot be saved for backward (for the rewrite's duration the parameters are swapped for
    ordinary copies, more memory for a few steps, and restored); and its networks update activations in place
    (FLUX's blocks do ``x += ...``), which autograd refuses when the tensor was saved for backward (under
    ``allow_mutation_on_saved_tensors`` a saved tensor is cloned when mutated, so the backward pass is exact).
    Parameters are swapped through torch's public ``register_parameter``. ``mutation=False`` leaves out the
    latter (only FLUX's networks need it; under it every op is dispatched through Python, and inference tensors,
    which ComfyUI's sampling makes under ``inference_mode``, cannot be mutated).
    """
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for sub in module.modules():
            for name, param in list(sub.named_parameters(recurse=False)):
                if param.is_inference():
                    swapped.append((sub, name, param))
                    sub.register_parameter(name, torch.nn.Parameter(param.clone(), requires_grad=False))
        with torch.autograd.graph.allow_mutation_on_saved_tensors() if mutation else contextlib.nullcontext():
            yield
    finally:
        for sub, name, param in swapped:
            sub.register_parameter(name, param)


def _plain(conditioning: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """A copy of a CONDITIONING list whose tensors are ordinary (not inference-mode) tensors."""
    out = []
    for entry in conditioning:
        options = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in dict(entry[1]).items()}
        out.append([entry[0].clone(), options])
    return out


#: Cores per model patcher (dropped with it), by settings key; a patched model (LoRA) is a new key. A few are
#: kept (an SDXL workflow may alternate size conditionings); older ones are closed.
_CORES: weakref.WeakKeyDictionary[Any, dict[tuple, GuardCore]] = weakref.WeakKeyDictionary()
_CORES_PER_MODEL = 4

#: Text-encode nodes and the inputs holding the prompt text (joined, distinct ones, in this order), the combine
#: node, and nodes that pass one conditioning through unchanged in count and order (by input name).
_TEXT_INPUTS = {"CLIPTextEncode": ("text",), "CLIPTextEncodeSDXL": ("text_g", "text_l"),
                "CLIPTextEncodeSD3": ("clip_g", "clip_l", "t5xxl"), "CLIPTextEncodeFlux": ("t5xxl", "clip_l")}
_COMBINE = "ConditioningCombine"
_PASS_THROUGH = {"FluxGuidance": "conditioning"}


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def core_for(
    model: Any,
    clip: Any,
    negative: Sequence[Sequence[Any]] | None,
    *,
    policy: Policy,
    unconditional: str,
    latent_size: int,
    audit_path: str,
    size: SizeConditioning | None = None,
) -> GuardCore:
    """The judging core for this model and these settings, made once and kept on the model patcher.

    The key holds the patcher's weight patches (``patches_uuid``), the CLIP, the unconditional choice (and
    the negative embeddings when they are the unconditional), SDXL's size conditioning, the policy's hash and
    the audit path.
    """
    uncond: TextConditioning | None = None
    if unconditional == UNCOND_NEGATIVE and negative:
        uncond = conditioning_from_comfy(negative)
    key = (
        str(getattr(model, "patches_uuid", "")), id(clip), unconditional, latent_size, policy.content_hash,
        audit_path, None if uncond is None else _digest(uncond.embeds),
        None if uncond is None or uncond.pooled is None else _digest(uncond.pooled), size,
    )
    try:
        per_model = _CORES.setdefault(model, {})
    except TypeError:  # not weak-referenceable: no caching
        per_model = {}
    core = per_model.pop(key, None)
    if core is None:
        adapter: ComfyUIModelAdapter | None = None
        setup_error: Exception | None = None
        try:
            if unconditional == UNCOND_NEGATIVE and not negative:
                raise ValueError("unconditional is set to the negative conditioning, but none is connected")
            adapter = comfy_adapter(model, clip, unconditional=uncond, latent_size=latent_size or None, size=size)
        except Exception as error:
            setup_error = error
        core = GuardCore(adapter if adapter is not None else model, policy, audit_path=audit_path or None,
                         source="comfyui", setup_error=setup_error)
    per_model[key] = core  # most recently used last
    while len(per_model) > _CORES_PER_MODEL:
        per_model.pop(next(iter(per_model))).close()
    return core


def sdxl_size(model: Any, positive: Sequence[Sequence[Any]], latent_size: int) -> tuple[SizeConditioning | None, str]:
    """SDXL's size conditioning for the score: the one the positive entries carry (``CLIPTextEncodeSDXL``'s width,
    height, crop and target sizes), None for the native size; and a line saying which, for the report.

    Entries that carry different sizes cannot share one unconditional branch (u is scored at the same sizes as
    the prompt), so the native size is used for all of them then, and the report says so.
    """
    if comfy_family(model) != "sdxl":
        return None, ""
    native_px = 8 * (latent_size or native_latent_size(model.model, "EPS", "sdxl"))
    native = f"native ({native_px}x{native_px}, crop 0,0)"
    found = {SizeConditioning.from_options(dict(entry[1]) if len(entry) > 1 else {}, native_px) for entry in positive}
    if len(found) > 1:
        return None, f"SDXL size conditioning: the entries carry different sizes; all scored at the {native} size"
    size = next(iter(found), None)
    if size is None:
        return None, f"SDXL size conditioning: {native}"
    return size, (f"SDXL size conditioning from the workflow: {size.width}x{size.height}, crop {size.crop_w},"
                  f"{size.crop_h}, target {size.target_width}x{size.target_height}")


def workflow_texts(prompt_graph: Any, node_id: Any, input_name: str = "positive") -> list[str] | None:
    """The prompt texts of the conditioning entries feeding ``node_id``'s ``input_name``, in entry order,
    read from the queued workflow (ComfyUI's hidden ``PROMPT``); None where they cannot be resolved."""
    if not isinstance(prompt_graph, dict) or node_id is None:
        return None

    def texts_of(link: Any, depth: int = 0) -> list[str] | None:
        if not (isinstance(link, list) and len(link) == 2) or depth > 32:
            return None
        node = prompt_graph.get(str(link[0])) or {}
        kind, node_inputs = node.get("class_type"), node.get("inputs") or {}
        if kind in _TEXT_INPUTS:
            values = [node_inputs.get(name) for name in _TEXT_INPUTS[kind]]
            if not all(isinstance(v, str) for v in values):
                return None
            distinct = list(dict.fromkeys(values))
            return ["\n".join(distinct)]
        if kind == _COMBINE:
            first, second = texts_of(node_inputs.get("conditioning_1"), depth + 1), texts_of(
                node_inputs.get("conditioning_2"), depth + 1)
            return None if first is None or second is None else first + second
        if kind in _PASS_THROUGH:
            return texts_of(node_inputs.get(_PASS_THROUGH[kind]), depth + 1)
        return None

    this = prompt_graph.get(str(node_id)) or {}
    return texts_of((this.get("inputs") or {}).get(input_name))


def _conditioning_rows(
    positive: Sequence[Sequence[Any]], adapter: ComfyUIModelAdapter | None
) -> tuple[TextConditioning, list[int]]:
    """Every row of every entry as one prompt, joined as the model's family needs (token lengths made equal as
    ComfyUI does, pooled outputs kept where the family uses them), and the entry sizes."""
    entries = [conditioning_from_comfy([entry]) for entry in positive]
    sizes = [len(entry) for entry in entries]
    rows = [entry.select([i]) for entry in entries for i in range(len(entry))]
    if adapter is not None:
        return adapter.join(rows), sizes
    # no adapter (the model cannot be scored): every prompt gets on_error; the rows only need to exist
    try:
        return TextConditioning(cat_token_lengths([row.embeds for row in rows])), sizes
    except (RuntimeError, ValueError):
        return TextConditioning(torch.zeros(len(rows), 1, 1)), sizes


def _output_conditioning(
    positive: Sequence[Sequence[Any]], sizes: list[int], cond: TextConditioning | None, report: GuardReport,
    keep: set[int],
) -> list[list[Any]]:
    """``positive`` without dropped entries, rewritten rows replaced by their mitigated embeddings (and pooled
    output, where the family's rewrite optimised it), trimmed back to the entry's own token length when rows
    were padded for batching."""
    out, start = [], 0
    for entry, size in zip(positive, sizes):
        rows = list(range(start, start + size))
        start += size
        if not any(i in keep for i in rows):
            continue
        options = dict(entry[1]) if len(entry) > 1 else {}
        embeds = entry[0]
        if cond is not None and any(i in report.mitigations and report.mitigations[i].met for i in rows):
            embeds = cond.embeds[rows[0] : rows[-1] + 1]
            if cond.mask is not None:
                embeds = embeds[:, : entry[0].shape[1]]
            embeds = embeds.to(entry[0].dtype)
            pooled = options.get("pooled_output")
            if cond.pooled is not None and isinstance(pooled, torch.Tensor):
                options["pooled_output"] = cond.pooled[rows[0] : rows[-1] + 1].to(pooled.dtype)
        out.append([embeds, options])
    return out


def _report(report: GuardReport, policy: Policy, blocked: bool, texts_known: bool, notes: Sequence[str] = (),
            blocked_line: str = "blocked: the downstream branch does not run") -> str:
    lines = [f"memguard policy {policy.name} v{policy.version}; request {report.request_id}"]
    lines.extend(note for note in notes if note)
    for decision in report.decisions:
        score = decision.score
        draws = f"; {score.samples} of {score.max_samples} draws" if score is not None and score.max_samples else ""
        shown = "n/a" if score is None else f"{score.score:.4f} (norm {score.norm:.4f}, cos {score.cos:.4f}{draws})"
        lines.append(f"[{decision.prompt_index}] {decision.action}: score {shown}; {decision.reason}")
        mitigation = report.mitigations.get(decision.prompt_index)
        if mitigation is not None:
            lines.append(f"    {mitigation.describe()}")
        if decision.prompt_index in report.outcomes:
            lines.append(f"    outcome: {report.outcomes[decision.prompt_index]}")
    if not texts_known:
        lines.append("prompt text not found in the workflow: the audit record holds no prompt hash")
    if report.audit_error:
        lines.append(f"audit: {report.audit_error}")
    if blocked:
        lines.append(blocked_line)
    return "\n".join(lines)


def _explanations(report: GuardReport) -> str:
    """The ``explanation`` output: per explained prompt, the words driving its score (the user's own prompt text,
    shown in the user's own workflow; the audit record holds words only when the policy logs prompts plain)."""
    lines = []
    for decision in report.decisions:
        if decision.explanation is not None:
            lines.append(f"[{decision.prompt_index}] {decision.action}: {decision.explanation.describe(5)}")
        else:
            lines.extend(f"[{decision.prompt_index}] {w}" for w in decision.warnings if w.startswith("no explanation"))
    return "\n".join(lines)


def _top(decisions: Sequence[Decision]) -> Decision | None:
    scored = [d for d in decisions if d.score is not None]
    return max(scored, key=lambda d: d.score.score) if scored else None


def _context_notes(adapter: Any) -> dict[str, Any]:
    """What of the model call the audit record should show besides the score: SDXL sizes, FLUX guidance."""
    if adapter is None:
        return {}
    out: dict[str, Any] = {"family": getattr(adapter, "family", None)}
    size = getattr(adapter, "size", None)
    if isinstance(size, SizeConditioning):
        out["size"] = {**size.as_kwargs(), "source": getattr(adapter, "size_source", "native")}
    if getattr(adapter, "family", None) == "flux":
        out["guidance"] = getattr(adapter, "guidance", None)
    return out


def _flux_note(adapter: Any) -> str:
    """FLUX is scored at the definition's guidance and native-size mu, not the workflow's: say so in the report."""
    if getattr(adapter, "family", None) != "flux":
        return ""
    guidance = getattr(adapter, "guidance", None)
    said = "no guidance input" if guidance is None else f"guidance {guidance:g}"
    shift = (f"the native size's mu {adapter.shift:.4g}" if getattr(adapter, "dynamic_shift", False)
             else f"shift {adapter.shift:.4g}")
    return (f"FLUX scored with {said} and {shift} (the score's definition; the workflow's FluxGuidance and "
            "ModelSamplingFlux settings are the sampler's)")


#: What the Memorization Guard node says about itself in every report: it passes conditioning on, it never samples.
GUARD_NODE_NOTE = ("this node does not sample, so it can only allow or block (and pass on rewrites that need no "
                   "verification); a rewrite that must be verified takes its rule's fallback here: use the "
                   "Memorization-Guarded KSampler to rewrite and verify")


@dataclass
class _Request:
    """One node call's request as the core sees it: the core, the scored rows, the prompts behind them."""

    core: GuardCore
    adapter: ComfyUIModelAdapter | None
    cond: TextConditioning | None
    sizes: list[int]
    prompts: list[str | None]
    texts_known: bool
    context: dict[str, Any]
    unscorable: str | None
    notes: list[str]


def _request(
    *, model: Any, clip: Any, positive: Sequence[Sequence[Any]], negative: Sequence[Sequence[Any]] | None,
    policy: Policy, unconditional: str, latent_size: int, audit_path: str, context: dict[str, Any],
    texts: list[str] | None,
) -> _Request:
    """The core for this model and settings, every row of the positive conditioning as one prompt (with its text
    from the workflow where known), and what the report should say was read from the model or assumed."""
    size, size_note = sdxl_size(model, positive, latent_size)
    core = core_for(model, clip, negative, policy=policy, unconditional=unconditional, latent_size=latent_size,
                    audit_path=audit_path, size=size)
    adapter = core.scorer.adapter if core.scorer is not None else None
    adapter = adapter if isinstance(adapter, ComfyUIModelAdapter) else None
    unscorable = None
    try:
        cond, sizes = _conditioning_rows(positive, adapter)
    except (ValueError, RuntimeError) as error:  # e.g. an SDXL entry without pooled output: on_error, audited
        unscorable = f"the conditioning cannot be scored: {type(error).__name__}: {error}"
        cond, sizes = None, [len(entry[0]) if isinstance(entry[0], torch.Tensor) else 1 for entry in positive]
        adapter = None
    prompts: list[str | None] = [None] * sum(sizes)
    texts_known = texts is not None and len(texts) == len(positive)
    if texts_known:
        prompts = [text for text, size_ in zip(texts, sizes) for _ in range(size_)]
    full_context = {"comfyui": {**context, "unconditional": "negative" if unconditional == UNCOND_NEGATIVE
                                else "empty", **_context_notes(adapter)}}
    notes = [*adapter.reading(), size_note, _flux_note(adapter)] if adapter is not None else []
    return _Request(core, adapter, cond, sizes, prompts, texts_known, full_context, unscorable, notes)


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
    texts: list[str] | None,
    enforce: bool,
) -> tuple[list[list[Any]], GuardReport, bool, bool, list[str]]:
    """Judge every row of the positive conditioning and let the core act on it (this node cannot generate, so the
    core gets no generator: prompts pass on as decided, and a rewrite that needs verification takes its fallback).

    Returns the conditioning to pass on, the report, whether the branch is blocked, whether the prompt texts were
    known, and notes for the report (what was read from the model or assumed).
    """
    request = _request(model=model, clip=clip, positive=positive, negative=negative, policy=policy,
                       unconditional=unconditional, latent_size=latent_size, audit_path=audit_path, context=context,
                       texts=texts)
    core, adapter = request.core, request.adapter
    report, cond = core.judge(request.prompts, cond=request.cond, mode="generate" if enforce else "check",
                              context=request.context, unscorable=request.unscorable)
    if not enforce:
        return list(positive), report, False, request.texts_known, request.notes
    weights = adapter.base_model.diffusion_model if adapter is not None else None
    with autograd_weights(weights if weights is not None else torch.nn.Module()):
        release = core.act(report, cond, None)
    output = [] if report.blocked else _output_conditioning(positive, request.sizes, release.cond, report,
                                                           set(report.generated))
    return output, report, report.blocked, request.texts_known, [GUARD_NODE_NOTE, *request.notes]


def run_guarded_sampler(
    *,
    model: Any,
    clip: Any,
    positive: Sequence[Sequence[Any]],
    negative: Sequence[Sequence[Any]],
    latent: dict[str, Any],
    settings: KSamplerSettings,
    policy: Policy,
    unconditional: str,
    latent_size: int,
    audit_path: str,
    context: dict[str, Any],
    texts: list[str] | None,
) -> tuple[Any, GuardReport, bool, list[str], ComfySampler]:
    """Judge every row of the positive conditioning, then let the core act with ComfyUI's own sampling
    (``ComfySampler``): it blocks, releases the call's own images, or climbs the rewrite ladder and releases only
    verified latents; decision records are written before anything is sampled and outcome records after.

    Returns the LATENT released (None when blocked), the report, whether the prompt texts were known, notes for
    the report, and the generator (what it sampled, for the report).
    """
    request = _request(model=model, clip=clip, positive=positive, negative=negative, policy=policy,
                       unconditional=unconditional, latent_size=latent_size, audit_path=audit_path, context=context,
                       texts=texts)
    core, adapter = request.core, request.adapter
    generator = ComfySampler(model, positive, negative, latent, settings, entry_rows=request.sizes, clip=clip,
                             family=adapter.family if adapter is not None else comfy_family(model))
    report, scored = core.judge(request.prompts, cond=request.cond, mode="generate", context=request.context,
                                unscorable=request.unscorable)
    generator.cond = scored
    rewriting = adapter is not None and any(d.action == "rewrite" for d in report.decisions)
    autograd: Any = contextlib.nullcontext()
    if rewriting:  # the optimising rungs back-propagate through ComfyUI's network: place it, then allow autograd
        adapter.load()
        mutation = adapter.family == "flux"
        autograd = autograd_weights(adapter.base_model.diffusion_model, mutation=mutation)
        generator.inference_mode = not mutation  # tensors made under inference mode cannot be mutated there
    with autograd:
        release = core.act(report, scored, generator, images_per_prompt=generator.images_per_prompt)
    notes = [f"sampler: seed {settings.seed}, {settings.steps} steps, cfg {settings.cfg:g}, "
             f"{settings.sampler_name}/{settings.scheduler}, {generator.batch} image(s) of "
             f"{generator.latent_shape[1]}x{generator.latent_shape[2]} latents (read from latent_image); "
             f"{len(generator.calls)} sampler call(s) made for this request", *request.notes]
    return release.output, report, request.texts_known, notes, generator


def _policy_inputs(seed_id: str = "seed") -> list[Any]:
    """The guard's own inputs (after model, CLIP and conditionings), shared by the guard and the sampler."""
    return [
        io.Combo.Input("policy", options=policy_choices(), default="balanced"),
        io.String.Input("policy_path", default="", tooltip="a policy YAML file; overrides the dropdown when set"),
        io.Combo.Input(
            "unconditional",
            options=[UNCOND_EMPTY, UNCOND_NEGATIVE],
            default=UNCOND_EMPTY,
            tooltip="what the prompt is compared with; calibrations assume the empty prompt",
        ),
        io.Int.Input(
            seed_id,
            default=-1,
            min=-1,
            max=2**31 - 1,
            optional=True,
            tooltip="detection noise seed; -1: the policy's (independent of the sampler's seed)",
        ),
        io.Int.Input(
            "samples", default=0, min=0, max=64, optional=True,
            tooltip="noise samples per prompt; 0: the policy's (which may be adaptive: 1 to max_samples)"
        ),
        io.Combo.Input(
            "explain",
            options=[EXPLAIN_POLICY, "off", "on_block", "always"],
            default=EXPLAIN_POLICY,
            optional=True,
            tooltip="which prompts get an explanation (the words driving the score, in the explanation output): "
            "the policy's explain setting, none, blocked and rewritten ones, or all",
        ),
        io.Int.Input(
            "latent_size",
            default=0,
            min=0,
            max=512,
            optional=True,
            tooltip="latent side of the detection noise; 0: assumed from the model's family (SD 1.x 64, SD 2.x-v 96, "
            "SDXL, SD3 and FLUX 128; ComfyUI records no training resolution, the report says what was assumed)",
        ),
        io.String.Input(
            "audit_path",
            default="",
            optional=True,
            tooltip="audit log file; empty: $MEMGUARD_AUDIT_PATH or the policy's path",
        ),
    ]


def _common_inputs() -> list[Any]:
    return [
        io.Model.Input("model"),
        io.Clip.Input("clip", tooltip="the model's CLIP: encodes the empty prompt, the score's unconditional branch "
                      "(SDXL: zeros shaped as its encoding), and calibration captions"),
        io.Conditioning.Input("positive"),
        io.Conditioning.Input("negative"),
        *_policy_inputs(),
    ]


def _execute(
    cls: type[io.ComfyNode], enforce: bool, kwargs: dict[str, Any]
) -> tuple[Any, GuardReport, bool, str, str]:
    policy = resolve_policy(
        kwargs["policy"], kwargs.get("policy_path") or "", kwargs.get("seed", -1), kwargs.get("samples", 0),
        kwargs.get("explain") or EXPLAIN_POLICY,
    )
    hidden = cls.hidden
    texts = workflow_texts(getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None))
    with torch.inference_mode(False):
        positive = _plain(kwargs["positive"])
        negative = _plain(kwargs["negative"]) if kwargs.get("negative") else None
        output, report, blocked, texts_known, notes = run_guard(
            model=kwargs["model"],
            clip=kwargs.get("clip"),
            positive=positive,
            negative=negative,
            policy=policy,
            unconditional=kwargs.get("unconditional") or UNCOND_EMPTY,
            latent_size=int(kwargs.get("latent_size") or 0),
            audit_path=kwargs.get("audit_path") or "",
            context=comfy_context(hidden),
            texts=texts,
            enforce=enforce,
        )
    blocked_line = _blocked_line(report, "the sampler downstream does not run")
    text = _report(report, policy, blocked, texts_known, notes, blocked_line)
    return output, report, blocked, text, _explanations(report)


def _blocked_line(report: GuardReport, what: str) -> str:
    if report.withheld:
        return f"withheld (block_mode: withhold): {what}; the queue item ends normally"
    return f"blocked: {what}, and this queue item ends in an error naming the reason"


def _always_run() -> float:
    """``fingerprint_inputs`` of the guarding nodes: NaN never equals itself, so ComfyUI's cache never reuses a
    guarding node's output (and with it the downstream sampler's) and every queue item that samples is judged
    and audited again; the scores themselves come from the core's caches."""
    return float("nan")


def blocked_message(report: GuardReport) -> str:
    """The error a blocked queue item ends with: the request id (to find its audit records) and each blocked
    prompt's reason."""
    return str(MemorizationBlocked(report))


def _blocking_expansion(node_id: Any, message: str, report_output: int) -> dict[str, Any]:
    """A one-node graph ComfyUI adds after a blocking node: ``MemguardBlocked`` waits for the blocking node's report
    output (so the report reaches its viewers first) and then raises ``message``, which ends the queue item in an
    error state with the reason in the UI, in ``/history`` and in the events API clients receive."""
    return {f"{node_id}.memguard_blocked": {
        "class_type": BLOCKED_NODE_ID,
        "inputs": {"message": message, "report": [str(node_id), report_output]},
    }}


def _execution_blocker() -> Any:
    """ComfyUI's ``ExecutionBlocker`` without a message: the nodes downstream of the blocked output do not run and
    send no events of their own (the reason is the queue item's error, raised by ``MemguardBlocked``)."""
    from comfy_execution.graph_utils import ExecutionBlocker

    return ExecutionBlocker(None)


def _blocked_output(report: GuardReport, node_id: Any, score: float, text: str, explanation: str) -> io.NodeOutput:
    """A blocked call's outputs: the guarded output (first) blocked, the others values; with the policy's
    ``block_mode: raise`` (the shipped policies') the queue item then ends in an error naming the reason, with
    ``withhold`` it ends normally with the images withheld (the report says so)."""
    if report.withheld:
        return io.NodeOutput(_execution_blocker(), score, text, explanation)
    return io.NodeOutput(_execution_blocker(), score, text, explanation,
                         expand=_blocking_expansion(node_id, blocked_message(report), 2))


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
                "a policy: allow, warn or block (the sampler downstream does not run and the queue item ends in an "
                "error). It does not sample, so rewrites that must be verified fall back: use the "
                "Memorization-Guarded KSampler for those. Every run is audited."
            ),
            inputs=_common_inputs(),
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Float.Output(display_name="score"),
                io.String.Output(display_name="report"),
                io.String.Output(display_name="explanation"),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            not_idempotent=True,
            enable_expand=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> float:
        return _always_run()

    @classmethod
    def execute(cls, **kwargs: Any) -> io.NodeOutput:
        output, report, blocked, text, explanation = _execute(cls, True, kwargs)
        top = _top(report.decisions)
        score = float(top.score.score) if top is not None else float("nan")
        if blocked:
            # Only the conditioning is blocked: the score, report and explanation reach their viewers, then the
            # expansion's MemguardBlocked ends the queue item in an error naming the reason.
            return _blocked_output(report, cls.hidden.unique_id, score, text, explanation)
        if any(d.action == "warn" for d in report.decisions):
            logging.getLogger("memguard").warning("memguard: %s", text)
        return io.NodeOutput(output, score, text, explanation)


class MemorizationScore(io.ComfyNode):
    """The memorization score of the positive prompt, without acting on it (audited as ``checked``)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemguardMemorizationScore",
            display_name="Memorization Score",
            category=CATEGORY,
            description=(
                "memguard's memorization score of the positive prompt (the highest of its entries), and the "
                "decision the policy would take."
            ),
            inputs=_common_inputs(),
            outputs=[
                io.Float.Output(display_name="score"),
                io.Float.Output(display_name="norm"),
                io.Float.Output(display_name="cos"),
                io.String.Output(display_name="report"),
                io.String.Output(display_name="explanation"),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, **kwargs: Any) -> io.NodeOutput:
        _, report, _, text, explanation = _execute(cls, False, kwargs)
        top = _top(report.decisions)
        nan = float("nan")
        if top is None:
            return io.NodeOutput(nan, nan, nan, text, explanation)
        return io.NodeOutput(float(top.score.score), float(top.score.norm), float(top.score.cos), text, explanation)


def _sampler_choices() -> tuple[list[str], list[str]]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)


class GuardedKSampler(io.ComfyNode):
    """KSampler with memguard inside: judges the positive prompt, then samples, rewriting and verifying by policy."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        samplers, schedulers = _sampler_choices()
        return io.Schema(
            node_id="MemguardGuardedKSampler",
            display_name="Memorization-Guarded KSampler",
            category=CATEGORY,
            description=(
                "KSampler that judges the positive prompt first (memguard): an allowed prompt is sampled exactly as "
                "KSampler samples it; a rewritten one climbs the policy's ladder (guidance schedule, prompt "
                "embedding, initial noise) through this sampler and is released only once verified against short "
                "probe generations of the original prompt; a blocked one is not sampled and the queue item ends in "
                "an error naming the reason. Every run is audited (decision before sampling, outcome after)."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip", tooltip="the model's CLIP: encodes the score's unconditional branch and "
                              "calibration captions"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="the sampler's seed, as KSampler's"),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=samplers),
                io.Combo.Input("scheduler", options=schedulers),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                *_policy_inputs("detection_seed"),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT"),
                io.Float.Output(display_name="score"),
                io.String.Output(display_name="report"),
                io.String.Output(display_name="explanation"),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            not_idempotent=True,
            enable_expand=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> float:
        return _always_run()

    @classmethod
    def execute(cls, **kwargs: Any) -> io.NodeOutput:
        policy = resolve_policy(kwargs["policy"], kwargs.get("policy_path") or "", kwargs.get("detection_seed", -1),
                                kwargs.get("samples", 0), kwargs.get("explain") or EXPLAIN_POLICY)
        hidden = cls.hidden
        texts = workflow_texts(getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None))
        settings = KSamplerSettings(seed=int(kwargs["seed"]), steps=int(kwargs["steps"]), cfg=float(kwargs["cfg"]),
                                    sampler_name=kwargs["sampler_name"], scheduler=kwargs["scheduler"],
                                    denoise=float(kwargs.get("denoise", 1.0)))
        with torch.inference_mode(False):
            latent, report, texts_known, notes, _ = run_guarded_sampler(
                model=kwargs["model"], clip=kwargs.get("clip"), positive=_plain(kwargs["positive"]),
                negative=_plain(kwargs["negative"]), latent=dict(kwargs["latent_image"]), settings=settings,
                policy=policy, unconditional=kwargs.get("unconditional") or UNCOND_EMPTY,
                latent_size=int(kwargs.get("latent_size") or 0), audit_path=kwargs.get("audit_path") or "",
                context=comfy_context(hidden), texts=texts,
            )
        blocked = report.blocked
        text = _report(report, policy, blocked, texts_known, notes, _blocked_line(report, "nothing was sampled"))
        top = _top(report.decisions)
        score = float(top.score.score) if top is not None else float("nan")
        explanation = _explanations(report)
        if blocked:
            return _blocked_output(report, hidden.unique_id, score, text, explanation)
        if any(d.action == "warn" for d in report.decisions):
            logging.getLogger("memguard").warning("memguard: %s", text)
        return io.NodeOutput(latent, score, text, explanation)


#: The node id of the error a blocked queue item ends with (added by the guarding nodes' expansion, not by users).
BLOCKED_NODE_ID = "MemguardBlocked"


class GuardBlocked(MemguardError):
    """The error a queue item blocked by memguard ends with; its message names the request and the reasons."""


class MemguardBlocked(io.ComfyNode):
    """Ends a blocked queue item in an error, after the blocking node's report has been delivered."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=BLOCKED_NODE_ID,
            display_name="memguard: blocked (added by the guard)",
            category=f"{CATEGORY}/internal",
            description="Added by the Memorization Guard and the Memorization-Guarded KSampler when they block: "
            "raises the reason, so the queue item ends in an error. Not meant to be placed by hand.",
            inputs=[io.String.Input("message"), io.String.Input("report")],
            outputs=[],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> float:
        return _always_run()

    @classmethod
    def execute(cls, message: str, report: str) -> io.NodeOutput:
        raise GuardBlocked(message)


NODES: list[type[io.ComfyNode]] = [MemorizationGuard, GuardedKSampler, MemorizationScore, MemguardBlocked]

__all__ = ["NODES", "GuardBlocked", "GuardedKSampler", "MemguardBlocked", "MemorizationGuard", "MemorizationScore"]
