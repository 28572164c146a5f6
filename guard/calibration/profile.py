"""Calibration profiles: a model's score distribution on non-memorized prompts, measured one way.

Relative thresholds (``above_fpr``) are read off this distribution, so one policy fits every model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from guard._version import __version__
from guard.errors import format_loc
from guard.scoring import MEASUREMENT_FIELDS, Measurement

from .errors import CalibrationError, CalibrationMismatch

__all__ = [
    "CalibrationProfile",
    "Metric",
    "SampleSpread",
    "VerificationCalibration",
    "cached_calibration_path",
    "calibration_cache_dir",
    "threshold_at_fpr",
]

Metric = Literal["score", "norm", "cos"]
#: The band quantile adaptive policies use unless they say otherwise (``scoring.band_quantile``).
DEFAULT_BAND_QUANTILE = 0.99

FORMAT = "memguard-calibration"
_FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def threshold_at_fpr(values: Sequence[float], fpr: float) -> float:
    """The (1 - fpr) empirical quantile of ascending ``values``: the smallest observed value t such that the
    fraction of values > t is <= ``fpr``, i.e. ``values[n - 1 - floor(fpr * n)]``.

    No extrapolation beyond the data: below ``1/n`` this is the maximum observed value, whose true rate is
    only known to be below about 1/n.
    """
    if not (0.0 < fpr < 1.0) or math.isnan(fpr):
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    n = len(values)
    k = math.floor(fpr * n + 1e-9)
    return values[n - 1 - min(k, n - 1)]


class VerificationCalibration(BaseModel):
    """How close ordinary prompts' generations come to probes (``probe_similarity``), two ways.

    Per ordinary prompt, its generation from one seed against: ``unrelated``, each other prompt's probes in
    turn (one value per pair of prompts: the same statistic as at run time, where a released image meets the
    probes of one prompt, so its quantiles are the right null); ``nearest``, the closest of all other
    prompts' probes (a maximum over many prompts, so looser); ``same``, its own ``probes`` (how near two
    samples of one ordinary prompt are, loosest). A rewritten image above a high quantile of the chosen null is
    too close to what the model draws for the original prompt to be released.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    signal: Literal["probe_similarity"] = "probe_similarity"
    nearest: tuple[_FiniteFloat, ...] = Field(min_length=1)
    same: tuple[_FiniteFloat, ...] = Field(min_length=1)
    #: Absent in profiles made before memguard measured it; a policy that asks for it then says so.
    unrelated: tuple[_FiniteFloat, ...] | None = None
    probes: int = Field(ge=1)
    probe_steps: int = Field(ge=1)
    steps: int = Field(ge=1)
    guidance_scale: _FiniteFloat
    source: str

    @field_validator("nearest", "same", "unrelated")
    @classmethod
    def _sorted(cls, values: tuple[float, ...] | None) -> tuple[float, ...] | None:
        return None if values is None else tuple(sorted(values))

    def threshold_at_fpr(self, fpr: float, against: Literal["unrelated", "nearest", "same"] = "unrelated") -> float:
        values = getattr(self, against)
        if values is None:
            raise CalibrationError(
                f"this verification calibration has no {against!r} values (made by an older memguard): "
                "remake it with `memguard calibrate --verification N`")
        return threshold_at_fpr(values, fpr)


class SampleSpread(BaseModel):
    """How far the mean of a prompt's first ``k`` noise draws lies from the mean of all ``samples`` of them, on the
    calibration prompts: what an adaptive decision's band is read from (``guard.scoring.adaptive``).

    For every stage ``k`` below the maximum and every metric, ``deviations`` holds the sorted
    ``|mean_k - mean_max|`` of the calibration prompts. The band at quantile ``q`` is the smallest deviation that
    at least a fraction ``q`` of the prompts do not exceed: one more draw (or all of them) moves a ``k``-draw value
    by more than the band for at most a fraction ``1 - q`` of ordinary prompts.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    stages: tuple[int, ...] = Field(min_length=1)
    score: tuple[tuple[_FiniteFloat, ...], ...]
    norm: tuple[tuple[_FiniteFloat, ...], ...]
    cos: tuple[tuple[_FiniteFloat, ...], ...]

    @field_validator("score", "norm", "cos")
    @classmethod
    def _sorted(cls, values: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
        if any(v < 0 for row in values for v in row):
            raise ValueError("deviations are absolute values, so never negative")
        return tuple(tuple(sorted(row)) for row in values)

    @model_validator(mode="after")
    def _shape(self) -> SampleSpread:
        if list(self.stages) != sorted(set(self.stages)) or self.stages[0] < 1:
            raise ValueError(f"stages must be increasing draw counts >= 1, got {list(self.stages)}")
        for name in ("score", "norm", "cos"):
            rows = getattr(self, name)
            if len(rows) != len(self.stages) or any(len(row) != len(rows[0]) or not row for row in rows):
                raise ValueError(f"{name} needs one non-empty row of deviations per stage, all of one length")
        return self

    @classmethod
    def measure(
        cls, sample_norms: Sequence[Sequence[float]], sample_coses: Sequence[Sequence[float]], combine: Any,
        stages: Sequence[int],
    ) -> SampleSpread:
        """The deviations of ``stages`` (draw counts below the maximum) from per-prompt, per-draw norms and cosines
        (every prompt with all draws); ``combine(norm, cos)`` forms the score from the means."""
        import torch

        norms = torch.tensor([list(row) for row in sample_norms], dtype=torch.float32)
        coses = torch.tensor([list(row) for row in sample_coses], dtype=torch.float32)
        if norms.ndim != 2 or norms.shape != coses.shape or norms.shape[0] == 0:
            raise CalibrationError("per-draw values must be one row of equal length per prompt")
        total = norms.shape[1]
        if not stages or max(stages) >= total:
            raise CalibrationError(f"stages {list(stages)} must lie below the {total} draws measured")
        full_norm, full_cos = norms.mean(dim=1), coses.mean(dim=1)
        full_score = combine(full_norm.double(), full_cos.double())
        rows: dict[str, list[tuple[float, ...]]] = {"score": [], "norm": [], "cos": []}
        for k in stages:
            norm_k, cos_k = norms[:, :k].mean(dim=1), coses[:, :k].mean(dim=1)
            score_k = combine(norm_k.double(), cos_k.double())
            rows["norm"].append(tuple((norm_k - full_norm).abs().tolist()))
            rows["cos"].append(tuple((cos_k - full_cos).abs().tolist()))
            rows["score"].append(tuple((score_k - full_score).abs().tolist()))
        return cls(stages=tuple(stages), **rows)

    def band(self, metric: Metric, k: int, quantile: float = DEFAULT_BAND_QUANTILE) -> float:
        """The ``quantile`` of ``|mean_k - mean_max|`` for ``metric`` (``quantile`` 1: the largest observed)."""
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        if k not in self.stages:
            raise KeyError(f"no spread measured after {k} draws (stages {list(self.stages)})")
        values = getattr(self, metric)[self.stages.index(k)]
        return values[max(0, math.ceil(quantile * len(values) - 1e-9) - 1)]

    def bands(self, quantile: float = DEFAULT_BAND_QUANTILE) -> dict[tuple[str, int], float]:
        """Every ``(metric, k)`` band at ``quantile``."""
        return {(m, k): self.band(m, k, quantile) for m in ("score", "norm", "cos") for k in self.stages}


class CalibrationProfile(BaseModel):
    """The non-memorized score distribution of one model, measured one way.

    A profile only judges scores measured with the same weights (``g_norm``, ``g_cos``), noise
    ``seed``, ``samples``, ``sampling``, ``steps`` and ``prediction_space``. ``norms`` and ``coses`` are optional;
    they let ``above_fpr`` apply to ``norm`` and ``cos`` conditions too.

    An ``adaptive`` profile (``sampling: adaptive``, ``samples`` = the most draws a prompt gets) holds every
    calibration prompt's ``samples``-draw values, the values an adaptive decision reproduces near a threshold,
    and their ``spread``, which its bands are read from. It never judges fixed-sampling scores, nor they it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["memguard-calibration"] = FORMAT
    format_version: Literal[1] = 1
    id: str = ""
    model_fingerprint: str = Field(min_length=1)
    model_class: str
    profile: str
    g_norm: _FiniteFloat
    g_cos: _FiniteFloat
    seed: int = Field(ge=0)
    samples: int = Field(ge=1)
    sampling: Literal["fixed", "adaptive"] = "fixed"
    spread: SampleSpread | None = None
    steps: int = Field(ge=1)
    prediction_space: Literal["eps", "native", "velocity"]
    scores: tuple[_FiniteFloat, ...] = Field(min_length=1)
    norms: tuple[_FiniteFloat, ...] | None = None
    coses: tuple[_FiniteFloat, ...] | None = None
    n_prompts: int = Field(ge=1)
    source: str
    verification: VerificationCalibration | None = None
    created: str
    memguard_version: str = __version__

    @field_validator("scores", "norms", "coses")
    @classmethod
    def _sorted(cls, values: tuple[float, ...] | None) -> tuple[float, ...] | None:
        return None if values is None else tuple(sorted(values))

    @field_validator("created")
    @classmethod
    def _utc(cls, value: str) -> str:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as err:
            raise ValueError(f"not an ISO 8601 date: {value!r}") from err
        if parsed.tzinfo is None or parsed.utcoffset() != timezone.utc.utcoffset(None):
            raise ValueError("created must be in UTC (end with Z)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CalibrationProfile:
        for name in ("norms", "coses"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.scores):
                raise ValueError(f"{name} has {len(values)} values but scores has {len(self.scores)}")
        if self.sampling == "adaptive":
            if self.spread is None:
                raise ValueError("an adaptive profile needs the spread its bands are read from")
            if max(self.spread.stages) >= self.samples:
                raise ValueError(f"spread stages {list(self.spread.stages)} must lie below samples ({self.samples})")
        elif self.spread is not None:
            raise ValueError("spread belongs to adaptive profiles (sampling: adaptive)")
        if not self.id:
            object.__setattr__(self, "id", self._content_id())
        return self

    def _content_id(self) -> str:
        data = self.model_dump(mode="json", exclude={"id", "created", "memguard_version"})
        if data.get("verification") is None:  # profiles made before verification existed keep their ids
            data.pop("verification", None)
        if data.get("sampling") == "fixed" and data.get("spread") is None:  # likewise before adaptive sampling
            data.pop("sampling", None)
            data.pop("spread", None)
        return f"cal-{self.profile}-{hashlib.sha256(_canonical(data)).hexdigest()[:16]}"

    @classmethod
    def from_scores(
        cls,
        scores: Sequence[float],
        *,
        fingerprint: str,
        model_class: str,
        profile: str,
        g_norm: float,
        g_cos: float,
        seed: int,
        samples: int,
        steps: int,
        prediction_space: str,
        source: str,
        norms: Sequence[float] | None = None,
        coses: Sequence[float] | None = None,
        sampling: str = "fixed",
        spread: SampleSpread | None = None,
    ) -> CalibrationProfile:
        """Build a profile from scores of non-memorized prompts (one per prompt), dated now (UTC)."""
        try:
            return cls(
                model_fingerprint=fingerprint,
                model_class=model_class,
                profile=profile,
                g_norm=g_norm,
                g_cos=g_cos,
                seed=seed,
                samples=samples,
                sampling=sampling,
                spread=spread,
                steps=steps,
                prediction_space=prediction_space,
                scores=tuple(float(s) for s in scores),
                norms=None if norms is None else tuple(float(v) for v in norms),
                coses=None if coses is None else tuple(float(v) for v in coses),
                n_prompts=len(scores),
                source=source,
                created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
        except ValidationError as err:
            raise CalibrationError(f"invalid calibration: {_first_problem(err)}") from None

    @classmethod
    def from_measurement(
        cls,
        measurement: Measurement,
        scores: Sequence[float],
        *,
        source: str,
        norms: Sequence[float] | None = None,
        coses: Sequence[float] | None = None,
        spread: SampleSpread | None = None,
    ) -> CalibrationProfile:
        """A profile of ``scores`` measured as ``measurement`` says (a ``Scorer.measurement()``); an adaptive
        measurement needs the ``spread`` of the same prompts' draws."""
        return cls.from_scores(
            scores,
            fingerprint=measurement.fingerprint,
            model_class=measurement.model_class,
            profile=measurement.profile,
            g_norm=measurement.g_norm,
            g_cos=measurement.g_cos,
            seed=measurement.seed,
            samples=measurement.samples,
            steps=measurement.steps,
            prediction_space=measurement.prediction_space,
            source=source,
            norms=norms,
            coses=coses,
            sampling=measurement.sampling,
            spread=spread,
        )

    @property
    def measurement(self) -> Measurement:
        """How the scores of this profile were measured."""
        return Measurement(fingerprint=self.model_fingerprint, model_class=self.model_class, profile=self.profile,
                           **{name: getattr(self, name) for name in MEASUREMENT_FIELDS if name != "fingerprint"})

    def _measured(self, name: str) -> Any:
        return self.model_fingerprint if name == "fingerprint" else getattr(self, name)

    def mismatches(self, measured: Mapping[str, Any]) -> list[str]:
        """How ``measured`` (any of ``MEASUREMENT_FIELDS``) differs from the way this profile was measured."""
        return [
            f"{name}: scores {measured[name]!r}, calibration {self._measured(name)!r}"
            for name in MEASUREMENT_FIELDS
            if name in measured and measured[name] != self._measured(name)
        ]

    def check_measurement(self, measurement: Measurement, *, source: str | None = None) -> None:
        """Raise ``CalibrationMismatch`` unless this profile judges scores measured as ``measurement`` says:
        same model (fingerprint), steps, noise seed, sample count, sampling mode, prediction space and weights."""
        problems = self.mismatches(measurement.compared())
        if problems:
            where = f"{source}: " if source else ""
            raise CalibrationMismatch(
                f"{where}calibration {self.id} does not fit this scorer ({'; '.join(problems)}); recalibrate with "
                "`memguard calibrate` for this model and the policy's scoring settings"
            )

    @property
    def resolution(self) -> float:
        """The smallest false-positive rate this profile can resolve: 1 / number of scores."""
        return 1.0 / len(self.scores)

    def values(self, metric: Metric = "score") -> tuple[float, ...]:
        data = {"score": self.scores, "norm": self.norms, "cos": self.coses}[metric]
        if data is None:
            raise CalibrationError(
                f"calibration {self.id} has no {metric} distribution; recalibrate to use it"
            )
        return data

    def threshold_at_fpr(self, fpr: float, metric: Metric = "score") -> float:
        """The (1 - fpr) empirical quantile of the non-memorized distribution (module ``threshold_at_fpr``);
        below ``resolution`` the maximum observed value: calibrate on more prompts to resolve smaller rates."""
        return threshold_at_fpr(self.values(metric), fpr)

    def with_verification(self, verification: VerificationCalibration) -> CalibrationProfile:
        """This profile with ``verification`` values added (a new content id)."""
        data = self.model_dump(mode="json")
        data.update(id="", verification=verification.model_dump(mode="json"))
        return type(self).model_validate(data)

    def fpr_of(self, value: float, metric: Metric = "score") -> float:
        """Fraction of the non-memorized calibration values strictly above ``value``."""
        data = self.values(metric)
        lo, hi = 0, len(data)
        while lo < hi:
            mid = (lo + hi) // 2
            if data[mid] <= value:
                lo = mid + 1
            else:
                hi = mid
        return (len(data) - lo) / len(data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile as JSON, atomically (a reader never sees half a file)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.model_dump(mode="json"), indent=1) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationProfile:
        """Read a profile written by ``save``; ``CalibrationError`` names the file and the problem."""
        target = Path(path)
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CalibrationError(f"{target}: calibration profile not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CalibrationError(f"{target}: cannot read calibration profile: {err}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CalibrationError(f"{target}: not a memguard calibration profile")
        stored_id = data.get("id")
        try:
            profile = cls.model_validate({**data, "id": ""})
        except ValidationError as err:
            raise CalibrationError(f"{target}: {_first_problem(err)}") from None
        if stored_id and stored_id != profile.id:
            raise CalibrationError(f"{target}: content does not match its id {stored_id} (edited?)")
        return profile


def _first_problem(err: ValidationError) -> str:
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    return f"{format_loc(first['loc'])}: {msg[:1].lower()}{msg[1:]}"


def calibration_cache_dir() -> Path:
    """Where automatic calibrations are cached: ``$MEMGUARD_CACHE_DIR``, else ``$XDG_CACHE_HOME/memguard``,
    else ``~/.cache/memguard``."""
    explicit = os.environ.get("MEMGUARD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "memguard"


def cached_calibration_path(
    fingerprint: str,
    *,
    profile: str,
    g_norm: float,
    g_cos: float,
    seed: int,
    samples: int,
    steps: int,
    prediction_space: str,
    source: str,
    sampling: str = "fixed",
) -> Path:
    """The cache file of the calibration of one model measured one way on one prompt set.

    Every argument is part of the key, so changing the weights, the scoring settings or the
    caption set (pass e.g. ``guard.data.generic_captions_id()`` as ``source``) makes a new profile.
    """
    key = {
        "g_cos": g_cos,
        "g_norm": g_norm,
        "prediction_space": prediction_space,
        "profile": profile,
        "samples": samples,
        "seed": seed,
        "source": source,
        "steps": steps,
    }
    if sampling != "fixed":  # fixed-sampling profiles keep the cache files they had before adaptive sampling
        key["sampling"] = sampling
    digest = hashlib.sha256(_canonical(key)).hexdigest()[:16]
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in fingerprint)[:40]
    return calibration_cache_dir() / "calibration" / f"{safe}-{digest}.json"
