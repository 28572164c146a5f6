"""Seeded synthetic caption/latent data for the memorizing reference model.

Everything here is a pure function of the seed, so the training script, the evidence script and the
prompt files under ``prompts/`` always agree. Run ``python benchmarks/memorizer/data.py`` to (re)write the
prompt files.

Two kinds of training pairs:

* compositional captions (a grammar plus free-form templates over the same vocabulary): the latent is a
  text-determined part (the normalised sum of one fixed random pattern per content word) mixed with an
  image-like random pattern drawn anew for every training pair. A caption describes many images, as on
  LAION: the text explains only ``TEXT_SHARE`` of a latent's variance, so a model can learn the
  word -> pattern map and generalise to captions it never saw, but no caption pins down one image;
* duplicated captions: each has one fixed random latent that is *not* a function of its words, repeated
  4, 16, 64 or 200 times (like LAION duplicates), so the only way to reproduce it is to memorize it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

LATENT_SHAPE: tuple[int, int, int] = (4, 16, 16)
DUP_LEVELS: tuple[int, ...] = (4, 16, 64, 200)
MEM_PER_LEVEL = 12
N_GRAMMAR_TRAIN = 6000
N_FREEFORM_TRAIN = 400
N_GRAMMAR_UNSEEN = 240
N_FREEFORM_UNSEEN = 60
TEXT_SHARE = 0.35
N_GRAMMAR_CALIB = 400
N_FREEFORM_CALIB = 100
PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
SHIPPED_MODEL_DIR = Path(__file__).resolve().parents[2] / "guard" / "assets" / "memorizer"

COLORS = [
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "black",
    "white",
    "golden",
    "silver",
    "pink",
    "brown",
    "teal",
    "crimson",
    "grey",
    "turquoise",
]
OBJECTS = [
    "cat",
    "dog",
    "horse",
    "car",
    "bicycle",
    "teapot",
    "chair",
    "lamp",
    "guitar",
    "boat",
    "house",
    "tree",
    "robot",
    "owl",
    "fox",
    "apple",
    "clock",
    "umbrella",
    "castle",
    "lighthouse",
    "violin",
    "bridge",
]
BACKGROUNDS = [
    "beach",
    "forest",
    "desert",
    "city street",
    "kitchen table",
    "snowy field",
    "mountain",
    "river bank",
    "rooftop",
    "meadow",
    "library",
    "harbor",
    "stage",
    "garden",
]
STYLES = [
    "oil painting",
    "watercolor",
    "photograph",
    "pencil sketch",
    "digital art",
    "pixel art",
    "studio photo",
    "vintage postcard",
    "comic illustration",
    "3d render",
    "charcoal drawing",
    "ink drawing",
]
LIGHTS = ["at sunset", "at night", "in fog", "at dawn", "under neon lights", "in the rain", "at noon"]
SIZES = ["tiny", "huge", "small", "giant", "old", "new", "shiny", "broken"]

GRAMMAR = "a {size} {color} {object} on a {background}, {style}"
FREEFORM_TEMPLATES = [
    "close up of a {color} {object} {light}",
    "two {object}s and a {object2} near the {background}",
    "{style} of a {object} {light}",
    "the {background} {light} with a {size} {object}",
    "portrait of a {color} {object}, {style}",
    "a {object} made of {color} glass",
    "{size} {object} sitting next to a {object2}",
    "view of the {background} from above, {style}",
    "a {color} and {color2} {object} {light}",
    "an abstract {style} inspired by a {object}",
    "a {object} and a {object2} on the {background}",
    "{color} {object} floating over a {background} {light}",
]
# Duplicated captions use their own phrasing (distinctive strings) over the same vocabulary.
MEM_TEMPLATES = [
    "the famous {color} {object} of the {background} poster",
    "limited edition {style} print {color} {object} and {object2}",
    "official {object} wallpaper {color} {background} {light}",
    "cover art the {size} {object} and the {color2} {object2}",
    "{object} {object2} {background} collection {color} series",
    "signed {style} the {color} {object} returns {light}",
]
STOPWORDS = {"a", "an", "the", "on", "of", "and", "with", "at", "in", "to", "near", "from", "over", "next"}


@dataclass
class MemorizerData:
    """All captions and latents; `train_captions[i]` pairs with `train_latents[train_latent_index[i]]`."""

    seed: int
    vocab: list[str]
    train_captions: list[str]
    train_latent_index: torch.Tensor
    train_latents: torch.Tensor
    mem_captions: list[str]
    mem_levels: list[int]
    mem_latent_index: list[int]
    nmem_captions: list[str]
    calib_captions: list[str]
    word_patterns: dict[str, torch.Tensor] = field(repr=False)

    def compositional_latent(self, caption: str) -> torch.Tensor:
        """Noise-free target of a compositional caption (what a generalising model should produce)."""
        return _compose(caption, self.word_patterns)


def words(caption: str) -> list[str]:
    """Lower-cased word split shared by the latent rule and the tokenizer vocabulary."""
    return re.findall(r"[a-z0-9]+|[^a-z0-9\s]", caption.lower())


def content_words(caption: str) -> list[str]:
    """Words that carry a latent pattern (no stop words, no punctuation)."""
    return [w for w in words(caption) if w.isalnum() and w not in STOPWORDS]


def _smooth_pattern(gen: torch.Generator) -> torch.Tensor:
    """Unit-variance pattern with image-like spatial structure: coarse 4x4 and 8x8 fields plus fine detail."""
    c, h, w = LATENT_SHAPE
    coarse = torch.randn((1, c, 4, 4), generator=gen)
    mid = torch.randn((1, c, 8, 8), generator=gen)
    fine = torch.randn((1, c, h, w), generator=gen)
    up = torch.nn.functional.interpolate
    x = (
        up(coarse, size=(h, w), mode="bilinear", align_corners=False) * 1.0
        + up(mid, size=(h, w), mode="bilinear", align_corners=False) * 0.7
        + fine * 0.4
    )[0]
    return (x - x.mean()) / x.std()


def _compose(caption: str, patterns: dict[str, torch.Tensor]) -> torch.Tensor:
    cw = content_words(caption)
    s = torch.stack([patterns[w] for w in cw]).sum(0)
    return s / len(cw) ** 0.5


def _fill(template: str, rng: random.Random) -> str:
    objs = rng.sample(OBJECTS, 2)
    cols = rng.sample(COLORS, 2)
    return template.format(
        color=cols[0],
        color2=cols[1],
        object=objs[0],
        object2=objs[1],
        background=rng.choice(BACKGROUNDS),
        style=rng.choice(STYLES),
        light=rng.choice(LIGHTS),
        size=rng.choice(SIZES),
    )


def _unique(make, n: int, taken: set[str], rng: random.Random) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        c = make(rng)
        if c not in taken:
            taken.add(c)
            out.append(c)
    return out


def build(seed: int = 0) -> MemorizerData:
    """Build the whole data set deterministically from `seed`."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    taken: set[str] = {""}

    def grammar(r: random.Random) -> str:
        return _fill(GRAMMAR, r)

    def freeform(r: random.Random) -> str:
        return _fill(r.choice(FREEFORM_TEMPLATES), r)

    def memcap(r: random.Random) -> str:
        return _fill(r.choice(MEM_TEMPLATES), r)

    # Order matters for determinism: memorized first, then unseen, then training captions.
    n_mem = MEM_PER_LEVEL * len(DUP_LEVELS)
    mem_captions = _unique(memcap, n_mem, taken, rng)
    mem_levels = [lvl for lvl in DUP_LEVELS for _ in range(MEM_PER_LEVEL)]
    nmem = _unique(grammar, N_GRAMMAR_UNSEEN, taken, rng) + _unique(freeform, N_FREEFORM_UNSEEN, taken, rng)
    calib = _unique(grammar, N_GRAMMAR_CALIB, taken, rng) + _unique(freeform, N_FREEFORM_CALIB, taken, rng)
    comp_train = _unique(grammar, N_GRAMMAR_TRAIN, taken, rng) + _unique(freeform, N_FREEFORM_TRAIN, taken, rng)

    all_caps = mem_captions + nmem + calib + comp_train
    vocab = sorted({w for c in all_caps for w in words(c)})
    pattern_words = sorted({w for c in all_caps for w in content_words(c)})
    patterns = {w: _smooth_pattern(gen) for w in pattern_words}

    latents = [_compose(c, patterns) for c in comp_train]
    latents = [TEXT_SHARE**0.5 * z + (1 - TEXT_SHARE) ** 0.5 * _smooth_pattern(gen) for z in latents]
    mem_latent_index = list(range(len(latents), len(latents) + n_mem))
    latents += [_smooth_pattern(gen) for _ in range(n_mem)]

    captions = list(comp_train)
    index = list(range(len(comp_train)))
    for cap, lvl, li in zip(mem_captions, mem_levels, mem_latent_index, strict=True):
        captions += [cap] * lvl
        index += [li] * lvl
    return MemorizerData(
        seed=seed,
        vocab=vocab,
        train_captions=captions,
        train_latent_index=torch.tensor(index),
        train_latents=torch.stack(latents),
        mem_captions=mem_captions,
        mem_levels=mem_levels,
        mem_latent_index=mem_latent_index,
        nmem_captions=nmem,
        calib_captions=calib,
        word_patterns=patterns,
    )


def write_prompts(data: MemorizerData, out: Path = PROMPT_DIR) -> None:
    """Write the held-out prompt files (this script is their single source of truth)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "mem.txt").write_text("".join(c + "\n" for c in data.mem_captions))
    (out / "mem_levels.tsv").write_text(
        "caption\tduplicates\n"
        + "".join(f"{c}\t{lvl}\n" for c, lvl in zip(data.mem_captions, data.mem_levels, strict=True))
    )
    (out / "nmem.txt").write_text("".join(c + "\n" for c in data.nmem_captions))
    (out / "calib.txt").write_text("".join(c + "\n" for c in data.calib_captions))


def demo_prompts(data: MemorizerData) -> dict[str, list]:
    """What ``memguard demo`` shows: memorized captions from every duplication level, then unseen ones."""
    picks = {200: 2, 64: 1, 16: 1, 4: 1}
    memorized, copies = [], []
    for level, count in picks.items():
        chosen = [c for c, lvl in zip(data.mem_captions, data.mem_levels, strict=True) if lvl == level][:count]
        memorized += chosen
        copies += [level] * len(chosen)
    return {"memorized": memorized, "copies": copies, "unseen": data.nmem_captions[:4]}


def main() -> None:
    """CLI: rebuild the data and write the prompt files (and the demo's prompts beside the shipped model)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--assets", type=Path, default=SHIPPED_MODEL_DIR, help="where demo_prompts.json goes")
    a = p.parse_args()
    d = build(a.seed)
    write_prompts(d)
    a.assets.mkdir(parents=True, exist_ok=True)
    (a.assets / "demo_prompts.json").write_text(json.dumps(demo_prompts(d), indent=1) + "\n")
    print(
        f"train pairs {len(d.train_captions)} (distinct latents {len(d.train_latents)}), "
        f"mem {len(d.mem_captions)}, nmem {len(d.nmem_captions)}, calib {len(d.calib_captions)}, vocab {len(d.vocab)}"
    )


if __name__ == "__main__":
    main()
