"""What the mitigation and verification benchmarks share: a memorizing model with its data, and the truth.

The truth is the training data, which only a benchmark has: a generation is a **copy** when its cosine to
the caption's own training latent is above the **unseen-caption level**, the mean + 2.5 std of unseen
captions' cosine to their *nearest* training latent.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "memorizer"))
if os.environ.get("MEMGUARD_DATA_DIR"):  # another checkout's data.py (e.g. while a regime is being added)
    sys.path.insert(0, os.environ["MEMGUARD_DATA_DIR"])

from data import build  # noqa: E402

from guard.actions.generation import GenerationJob  # noqa: E402
from guard.guard import PipelineGenerator  # noqa: E402
from guard.scoring import Scorer  # noqa: E402


def regime_of(model: Path) -> str:
    """The data regime a memorizer was trained on (its training record says; the shipped one by default)."""
    info = Path(model) / "memorizer_info.json"
    return json.loads(info.read_text()).get("regime", "shipped") if info.exists() else "shipped"


def data_for(model: Path) -> Any:
    regime = regime_of(model)
    return build(0) if regime == "shipped" else build(0, regime)


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)


def nearest(latents: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Each latent's cosine to its nearest latent of ``bank``."""
    a = F.normalize(latents.flatten(1).float(), dim=1)
    b = F.normalize(bank.flatten(1).float(), dim=1)
    return (a @ b.T).max(dim=1).values


@dataclass
class Sampler:
    """Plain generations (latents only) of a pipeline at fixed settings, from explicit seeds."""

    pipe: Any
    scorer: Scorer
    steps: int = 50
    guidance: float = 7.5

    def __call__(self, prompts: list[str], seeds: list[int], chunk: int = 16) -> torch.Tensor:
        adapter = self.scorer.adapter
        shape = adapter.latent_shape
        out = []
        for start in range(0, len(prompts), chunk):
            part, part_seeds = prompts[start : start + chunk], seeds[start : start + chunk]
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in part_seeds])
            generation = PipelineGenerator(
                self.pipe, adapter, {"num_inference_steps": self.steps, "guidance_scale": self.guidance}, 0,
                redact=False,
            )
            job = GenerationJob(cond=self.scorer.encode(part), latents=noise, kind="internal")
            out.append(generation(job).latents)
        return torch.cat(out)


@dataclass
class UnseenLevel:
    values: list[float]

    @property
    def level(self) -> float:
        return statistics.mean(self.values) + 2.5 * statistics.pstdev(self.values)

    def describe(self) -> str:
        v = self.values
        return (f"unseen captions (n={len(v)}): cos to nearest training latent mean {statistics.mean(v):.3f}, "
                f"std {statistics.pstdev(v):.3f}, max {max(v):.3f}; level (mean + 2.5 std) {self.level:.3f}")


def unseen_level(sample: Sampler, data: Any, count: int, first_seed: int = 1000) -> UnseenLevel:
    captions = data.nmem_captions[:count]
    latents = sample(captions, [first_seed + i for i in range(len(captions))])
    return UnseenLevel(nearest(latents, data.train_latents).tolist())
