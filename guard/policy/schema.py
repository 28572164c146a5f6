"""The policy schema: what a memguard policy file may say, validated strictly.

Every model forbids unknown fields (a typo must not silently disable a rule) and is frozen
(a policy in use cannot change under a running guard).
"""

from __future__ import annotations

import hashlib
import json
import string
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    field_validator,
    model_validator,
)

from guard.calibration import Metric
from guard.scoring import ScoringSettings

__all__ = [
    "Action",
    "AuditSettings",
    "Condition",
    "ErrorAction",
    "ExplainSettings",
    "ExplicitProfile",
    "Metric",
    "Policy",
    "PromptLists",
    "GuidanceStage",
    "RewriteSettings",
    "RewriteTarget",
    "Rung",
    "VerifySettings",
    "Rule",
    "When",
    "normalize_prompt",
]

Action = Literal["allow", "warn", "block", "rewrite"]
ErrorAction = Literal["block", "allow", "warn"]

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Fpr = Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Condition(_Model):
    """Bounds on one measured value; every bound given must hold.

    ``gte``/``gt``/``lte``/``lt`` are absolute. ``above_fpr: p`` is relative to the model's
    calibration: true when the value exceeds the threshold that only a fraction ``p`` of
    non-memorized prompts exceed on this model.
    """

    gte: FiniteFloat | None = None
    gt: FiniteFloat | None = None
    lte: FiniteFloat | None = None
    lt: FiniteFloat | None = None
    above_fpr: Fpr | None = None

    @model_validator(mode="after")
    def _check_bounds(self) -> Condition:
        lower = [k for k in ("gte", "gt", "above_fpr") if getattr(self, k) is not None]
        upper = [k for k in ("lte", "lt") if getattr(self, k) is not None]
        if not lower and not upper:
            raise ValueError("give at least one of gte, gt, lte, lt, above_fpr")
        if len(lower) > 1:
            raise ValueError(f"{' and '.join(lower)} are both lower bounds; give only one")
        if len(upper) > 1:
            raise ValueError("lte and lt are both upper bounds; give only one")
        lo = self.gte if self.gte is not None else self.gt
        hi = self.lte if self.lte is not None else self.lt
        if lo is not None and hi is not None:
            empty = lo > hi or (lo == hi and (self.gt is not None or self.lt is not None))
            if empty:
                raise ValueError(f"no value satisfies both bounds ({lower[0]} {lo}, {upper[0]} {hi})")
        return self

    @property
    def is_relative(self) -> bool:
        return self.above_fpr is not None


class When(_Model):
    """Conditions of a rule; all listed ones must hold."""

    score: Condition | None = None
    norm: Condition | None = None
    cos: Condition | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> When:
        if not self.conditions():
            raise ValueError("give at least one condition (score, norm or cos)")
        return self

    def conditions(self) -> dict[Metric, Condition]:
        return {m: c for m in ("score", "norm", "cos") if (c := getattr(self, m)) is not None}


class RewriteTarget(_Model):
    """The score a rewrite must reach: absolute (``score``) or relative (``above_fpr``); exactly one."""

    score: FiniteFloat | None = None
    above_fpr: Fpr | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> RewriteTarget:
        if (self.score is None) == (self.above_fpr is None):
            raise ValueError("give exactly one of score, above_fpr")
        return self


Rung = Literal["guidance_schedule", "token", "prompt_embedding", "initial_noise", "combined"]


class GuidanceStage(_Model):
    """Guidance scale ``scale`` for the steps before fraction ``until`` of sampling (after Jain et al. 2025:
    opposite (negative) or no guidance early keeps the trajectory out of a memorized basin)."""

    until: float = Field(gt=0.0, le=1.0, allow_inf_nan=False)
    scale: FiniteFloat


class VerifySettings(_Model):
    """How a rewritten generation is checked before it is released (docs/mitigation.md).

    ``probe_similarity``: the released latent's cosine to ``probes`` short generations of the *original*
    prompt from fixed seeds (what the model draws for it, a copy if it is memorized). It must not exceed what
    a fraction ``above_fpr`` (default 0.01) of ordinary generations reach in the verification calibration
    (``against``: ``unrelated``, one other prompt's probes, i.e. as close as an ordinary image comes to what the
    model draws for an unrelated prompt; ``nearest``, the closest of all other prompts' probes, looser;
    ``same``, its own prompt's probes, loosest), or an absolute ``max_similarity``.
    """

    signal: Literal["probe_similarity"] = "probe_similarity"
    against: Literal["unrelated", "nearest", "same"] = "unrelated"
    above_fpr: Fpr | None = None
    max_similarity: float | None = Field(default=None, ge=-1.0, le=1.0, allow_inf_nan=False)
    probes: int = Field(default=2, ge=1, le=8)
    probe_steps: int = Field(default=25, ge=2, le=1000)

    @model_validator(mode="after")
    def _one_threshold(self) -> VerifySettings:
        if self.above_fpr is not None and self.max_similarity is not None:
            raise ValueError("give either above_fpr (relative to the verification calibration) or max_similarity")
        if self.above_fpr is None and self.max_similarity is None:
            object.__setattr__(self, "above_fpr", 0.01)
        return self


class RewriteSettings(_Model):
    """How the ``rewrite`` action mitigates a prompt (docs/mitigation.md).

    ``ladder`` lists mitigation methods cheapest first; each rung's generation is verified (``verify``) and
    released as soon as one passes; if none does, ``fallback`` applies. ``method`` is a one-rung ladder
    (give one of the two). Optimising rungs stop at ``target`` (default: below the score threshold of the
    rule that matched) or after ``max_steps``. ``token`` deletes the words that carry the score (occlusion), one
    at a time and re-attributed after each, until the score is under the target or ``max_words`` are gone.
    ``max_generations`` caps what one prompt's rewrite spends (probes, candidate generations, optimisation and
    scoring passes at their share of a generation): a rung starts only if its generation fits in what is left,
    and its optimisation steps are cut to fit. With
    ``verify: null`` nothing is verified: the first rung that meets the score target is released as an unverified
    rewrite.
    """

    method: Rung | None = None
    ladder: tuple[Rung, ...] | None = Field(default=None, min_length=1)
    target: RewriteTarget | None = None
    max_steps: int = Field(default=10, ge=1, le=1000)
    lr: float = Field(default=0.05, gt=0.0, le=10.0, allow_inf_nan=False)
    proximity: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    max_words: int = Field(default=3, ge=1, le=16)
    max_generations: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    guidance: tuple[GuidanceStage, ...] = (GuidanceStage(until=0.5, scale=-2.0),)
    verify: VerifySettings | None = VerifySettings()
    fallback: ErrorAction = "block"

    @model_validator(mode="after")
    def _one_ladder(self) -> RewriteSettings:
        if self.method is not None and self.ladder is not None:
            raise ValueError("give either method (one rung) or ladder (several), not both")
        if len(set(self.rungs)) != len(self.rungs):
            raise ValueError(f"a ladder lists each method once, got {list(self.rungs)}")
        stages = [stage.until for stage in self.guidance]
        if stages != sorted(stages) or len(set(stages)) != len(stages):
            raise ValueError("guidance stages must have strictly increasing `until` fractions")
        return self

    @property
    def rungs(self) -> tuple[Rung, ...]:
        """The methods tried, in order."""
        if self.ladder is not None:
            return self.ladder
        return (self.method or "prompt_embedding",)


class Rule(_Model):
    """One ordered rule: when its conditions hold, take its action (first match wins)."""

    name: str | None = Field(default=None, min_length=1)
    when: When
    action: Action
    rewrite: RewriteSettings | None = None
    message: str | None = None

    @model_validator(mode="after")
    def _rewrite_settings(self) -> Rule:
        if self.action != "rewrite":
            if self.rewrite is not None:
                raise ValueError(
                    f"rewrite settings are only allowed with action: rewrite (not {self.action})"
                )
            return self
        settings = self.rewrite or RewriteSettings()
        score = self.when.score
        if settings.target is None and (
            score is None or (score.gte, score.gt, score.above_fpr) == (None,) * 3
        ):
            raise ValueError("rewrite.target is required when the rule has no lower bound on score")
        if self.rewrite is None:
            object.__setattr__(self, "rewrite", settings)
        return self


class ExplicitProfile(_Model):
    """Explicit score weights, ``score = g_norm * norm + g_cos * cos``."""

    g_norm: FiniteFloat
    g_cos: FiniteFloat


def _profile_kind(value: Any) -> str:
    return "weights" if isinstance(value, (dict, ExplicitProfile)) else "named"


ProfileSpec = Annotated[
    Annotated[str, Tag("named")] | Annotated[ExplicitProfile, Tag("weights")],
    Discriminator(_profile_kind),
]


class ExplainSettings(_Model):
    """When decisions carry an explanation of their score: which words of the prompt drive it (docs/explain.md).

    ``when``: ``off``; ``on_block``, the prompts the policy blocks or rewrites (those a user asks about);
    ``always``. ``method``: ``occlusion`` (each word deleted and the prompt re-encoded and re-scored) or
    ``gradient`` (gradient x input on the text embeddings the denoiser sees).
    """

    when: Literal["off", "on_block", "always"] = "off"
    method: Literal["occlusion", "gradient"] = "occlusion"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value is False or value is None:  # YAML reads a bare `off` as false
            return {"when": "off"}
        if value is True:
            return {"when": "always"}
        if isinstance(value, str):
            return {"when": value}
        return value

    def applies(self, action: str) -> bool:
        """Whether a decision with ``action`` gets an explanation."""
        return self.when == "always" or (self.when == "on_block" and action in ("block", "rewrite"))


def normalize_prompt(prompt: str) -> str:
    """The form compared by ``lists.match: normalized``.

    NFKC, casefolded, whitespace runs collapsed to one space, punctuation stripped at both ends,
    so trivial variants of a listed prompt still match.
    """
    text = " ".join(unicodedata.normalize("NFKC", prompt).casefold().split())
    start, end = 0, len(text)
    while start < end and _strippable(text[start]):
        start += 1
    while end > start and _strippable(text[end - 1]):
        end -= 1
    return text[start:end]


def _strippable(ch: str) -> bool:
    return ch.isspace() or ch in string.punctuation or unicodedata.category(ch).startswith("P")


class PromptLists(_Model):
    """Prompts decided before any score: ``always_block`` wins over ``always_allow``."""

    always_block: tuple[str, ...] = ()
    always_allow: tuple[str, ...] = ()
    match: Literal["exact", "normalized"] = "normalized"

    _block: frozenset[str] = PrivateAttr(default=frozenset())
    _allow: frozenset[str] = PrivateAttr(default=frozenset())

    def model_post_init(self, context: Any, /) -> None:
        self._block = frozenset(map(self.key, self.always_block))
        self._allow = frozenset(map(self.key, self.always_allow))

    @model_validator(mode="after")
    def _disjoint(self) -> PromptLists:
        block = {self.key(p) for p in self.always_block}
        both = sorted(p for p in self.always_allow if self.key(p) in block)
        if both:
            raise ValueError(f"prompts in both always_block and always_allow: {both[:3]}")
        return self

    def key(self, prompt: str) -> str:
        return normalize_prompt(prompt) if self.match == "normalized" else prompt

    def lookup(self, prompt: str) -> Literal["always_block", "always_allow"] | None:
        key = self.key(prompt)
        if key in self._block:
            return "always_block"
        if key in self._allow:
            return "always_allow"
        return None


class AuditSettings(_Model):
    """Where and how decisions are recorded.

    ``path`` is relative to the working directory (a deployment's, not the policy file's: shipped
    policies live read-only inside the package). ``prompt`` says how prompts are stored: ``hash``
    (SHA-256 of the UTF-8 text, salted with ``hash_salt`` if given), ``redact`` or ``plain``.
    """

    path: str = Field(default="memguard-audit.jsonl", min_length=1)
    prompt: Literal["hash", "redact", "plain"] = "hash"
    fsync: bool = False
    hash_salt: str | None = None
    # Signed checkpoints (docs/audit.md); $MEMGUARD_AUDIT_SIGNING_KEY overrides signing_key. Paths are
    # relative to the working directory, like ``path``.
    signing_key: str | None = Field(default=None, min_length=1)
    checkpoint_every: int = Field(default=100, ge=1, le=1_000_000)
    checkpoint_seconds: float = Field(default=60.0, gt=0.0, le=86_400.0, allow_inf_nan=False)
    checkpoint_copy: str | None = Field(default=None, min_length=1)


class Policy(_Model):
    """A memguard policy: how to score, which rules decide, what to do on errors, how to audit."""

    name: str = Field(min_length=1)
    version: str = "1"
    description: str = ""
    scoring: ScoringSettings = ScoringSettings()
    profile: ProfileSpec = "auto"
    calibration: str = "auto"
    rules: tuple[Rule, ...] = ()
    default: ErrorAction = "allow"
    on_error: ErrorAction = "block"
    batch: Literal["block_whole", "drop_blocked"] = "block_whole"
    block_mode: Literal["raise", "withhold"] = "raise"
    lists: PromptLists = PromptLists()
    audit: AuditSettings = AuditSettings()
    explain: ExplainSettings = ExplainSettings()

    _source: Path | None = PrivateAttr(default=None)

    @field_validator("version", mode="before")
    @classmethod
    def _version_number(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("profile")
    @classmethod
    def _profile_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            ok = value and all(ch.isalnum() or ch in "-_." for ch in value) and value[0].isalnum()
            if not ok:
                raise ValueError(
                    f"not a profile name: {value!r} (use auto, calibration, a name like sd1, or {{g_norm, g_cos}})"
                )
        return value

    @field_validator("calibration")
    @classmethod
    def _calibration(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("use auto, auto-strict, off, or the path of a calibration profile")
        return value

    @model_validator(mode="after")
    def _adaptive_needs_calibration(self) -> Policy:
        if self.scoring.adaptive and self.calibration == "off":
            raise ValueError("samples: adaptive reads its band from a calibration; use calibration: auto or a "
                             "profile made with `memguard calibrate --samples adaptive`")
        return self

    @model_validator(mode="after")
    def _unique_rule_names(self) -> Policy:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name is not None:
                if rule.name in seen:
                    raise ValueError(f"two rules are named {rule.name!r}")
                seen.add(rule.name)
        return self

    @property
    def source(self) -> Path | None:
        """The file this policy was loaded from, if any."""
        return self._source

    @property
    def uses_relative_thresholds(self) -> bool:
        """Whether any rule (or rewrite target) needs a calibration profile."""
        for rule in self.rules:
            if any(c.is_relative for c in rule.when.conditions().values()):
                return True
            if rule.rewrite is not None and rule.rewrite.target is not None and rule.rewrite.target.above_fpr:
                return True
        return False

    @property
    def calibration_path(self) -> Path | None:
        """The calibration profile file, resolved relative to the policy file; None for auto/auto-strict/off."""
        if self.calibration in ("auto", "auto-strict", "off"):
            return None
        path = Path(self.calibration).expanduser()
        if not path.is_absolute() and self._source is not None:
            path = self._source.parent / path
        return path

    def score_weights(self, calibration: Any = None) -> str | dict[str, Any] | None:
        """The score weights this policy asks the scorer for: None for the model family's (``auto``), a profile
        name, or ``{name, g_norm, g_cos}``. ``profile: calibration`` reads them from ``calibration`` (a
        ``CalibrationProfile`` or its file, e.g. what ``Guard(calibration=...)`` was given), else from the
        policy's calibration file (e.g. weights fitted by ``memguard calibrate --mem``, so one file carries a
        model's weights and the thresholds measured with them); without either, the family's, which automatic
        calibration uses."""
        profile = self.profile
        if profile == "auto":
            return None
        if profile == "calibration":
            from guard.calibration import CalibrationProfile

            if isinstance(calibration, str) and calibration in ("auto", "auto-strict", "off"):
                return None  # a mode given to the guard, in the policy's own words: no file to read weights from
            source = calibration if calibration is not None else self.calibration_path
            if source is None:
                return None
            made = source if isinstance(source, CalibrationProfile) else CalibrationProfile.load(source)
            return {"name": made.profile, "g_norm": made.g_norm, "g_cos": made.g_cos}
        if isinstance(profile, str):
            return profile
        return {"name": "policy", "g_norm": profile.g_norm, "g_cos": profile.g_cos}

    @property
    def content_hash(self) -> str:
        """SHA-256 of the policy's canonical JSON: same rules, same hash, wherever they came from."""
        canonical = json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def rule_label(self, index: int) -> str:
        """How a rule is named in decisions and audit records: its name, else ``rules[i]``."""
        return self.rules[index].name or f"rules[{index}]"
