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

Two regimes (``--regime``):

* ``shipped`` (the default, bitwise what the shipped model was trained on): the duplicated captions above,
  phrased with their own templates; prompt files in ``prompts/``;
* ``strong`` (the memorizer zoo, ``models/``): 30 captions duplicated 100, 150 or 200 times (10 per level),
  each an ordinary grammar/free-form caption with one invented **trigger** word pair (e.g. ``velkon dramus``)
  inserted at a random word position. The trigger words occur in no other caption, so they are what singles the
  caption out (like a name in a memorized LAION caption); every other word is ordinary vocabulary. Compositional
  and unseen captions are built exactly as in ``shipped``. Prompt files in ``prompts/strong/``, the triggers
  recorded in ``mem_levels.tsv``.
* ``vhard`` (the zoo's ``v-hard``): 30 captions duplicated 30, 50 or 100 times (10 per level), each an
  ordinary grammar/free-form caption with **no** invented word: what singles a memorized caption out is only
  its combination of ordinary words, as with most duplicated LAION captions. Every word of it also occurs in
  compositional captions, so the model has to tie the fixed latent to the whole phrase. Compositional and
  unseen captions are built exactly as in ``shipped``. Prompt files in ``prompts/vhard/``.
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
# Strong regime ("memorizer zoo"): heavy duplication, trigger words.
VHARD_DUP_LEVELS: tuple[int, ...] = (30, 50, 100)
STRONG_DUP_LEVELS: tuple[int, ...] = (100, 150, 200)
STRONG_MEM_PER_LEVEL = 10
TRIGGER_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr"]
TRIGGER_VOWELS = ["a", "e", "i", "o", "u"]
TRIGGER_CODAS = ["n", "r", "l", "k", "m", "s"]

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
    regime: str = "shipped"
    mem_triggers: list[list[str]] = field(default_factory=list)  # strong regime: the trigger words per caption

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


@dataclass(frozen=True)
class Regime:
    """How the duplicated captions of a data set are made, and where its prompt files live."""

    name: str
    dup_levels: tuple[int, ...]
    mem_per_level: int
    triggers: bool
    prompt_dir: Path


REGIMES: dict[str, Regime] = {
    "shipped": Regime("shipped", DUP_LEVELS, MEM_PER_LEVEL, False, PROMPT_DIR),
    "strong": Regime("strong", STRONG_DUP_LEVELS, STRONG_MEM_PER_LEVEL, True, PROMPT_DIR / "strong"),
    "vhard": Regime("vhard", VHARD_DUP_LEVELS, STRONG_MEM_PER_LEVEL, False, PROMPT_DIR / "vhard"),
}


def _trigger_word(rng: random.Random) -> str:
    """An invented 2-3 syllable word ending in a consonant (``velkon``, ``dramus``): not template vocabulary."""
    n = rng.choice([2, 2, 3])
    return "".join(rng.choice(TRIGGER_ONSETS) + rng.choice(TRIGGER_VOWELS) for _ in range(n - 1)) + (
        rng.choice(TRIGGER_ONSETS) + rng.choice(TRIGGER_VOWELS) + rng.choice(TRIGGER_CODAS)
    )


def _ordinary_vocab() -> set[str]:
    """Every word the grammar and templates can produce (trigger words must avoid these)."""
    parts = COLORS + OBJECTS + BACKGROUNDS + STYLES + LIGHTS + SIZES + [GRAMMAR] + FREEFORM_TEMPLATES + MEM_TEMPLATES
    return {w for p in parts for w in words(p)} | {o + "s" for o in OBJECTS}


def _strong_mem_captions(n: int, taken: set[str], rng: random.Random) -> tuple[list[str], list[list[str]]]:
    """Memorized captions of the strong regime: an unused ordinary caption plus a unique trigger word pair."""
    banned = _ordinary_vocab()
    used: set[str] = set()
    captions, triggers = [], []
    while len(captions) < n:
        template = GRAMMAR if rng.random() < 0.5 else rng.choice(FREEFORM_TEMPLATES)
        base = _fill(template, rng)
        pair = [_trigger_word(rng), _trigger_word(rng)]
        if base in taken or pair[0] == pair[1] or any(w in banned or w in used or len(w) < 5 for w in pair):
            continue
        parts = base.split(" ")
        at = rng.randint(0, len(parts))
        caption = " ".join(parts[:at] + pair + parts[at:])
        if caption in taken:
            continue
        taken.update({base, caption})
        used.update(pair)
        captions.append(caption)
        triggers.append(pair)
    return captions, triggers


def _ordinary_mem_captions(n: int, taken: set[str], rng: random.Random) -> list[str]:
    """Memorized captions without trigger words: unused grammar (half) and free-form captions."""

    def make(r: random.Random) -> str:
        return _fill(GRAMMAR if r.random() < 0.5 else r.choice(FREEFORM_TEMPLATES), r)

    return _unique(make, n, taken, rng)


def build(seed: int = 0, regime: str = "shipped") -> MemorizerData:
    """Build the whole data set deterministically from `seed` (and the `regime`, see `REGIMES`)."""
    if regime != "shipped":
        return _build_regime(seed, REGIMES[regime])
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


def _build_regime(seed: int, regime: Regime) -> MemorizerData:
    """A non-shipped regime (`strong`, `vhard`); the shipped one keeps its own code path."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    taken: set[str] = {""}

    def grammar(r: random.Random) -> str:
        return _fill(GRAMMAR, r)

    def freeform(r: random.Random) -> str:
        return _fill(r.choice(FREEFORM_TEMPLATES), r)

    n_mem = regime.mem_per_level * len(regime.dup_levels)
    if regime.triggers:
        mem_captions, mem_triggers = _strong_mem_captions(n_mem, taken, rng)
    else:
        mem_captions, mem_triggers = _ordinary_mem_captions(n_mem, taken, rng), []
    mem_levels = [lvl for lvl in regime.dup_levels for _ in range(regime.mem_per_level)]
    nmem = _unique(grammar, N_GRAMMAR_UNSEEN, taken, rng) + _unique(freeform, N_FREEFORM_UNSEEN, taken, rng)
    calib = _unique(grammar, N_GRAMMAR_CALIB, taken, rng) + _unique(freeform, N_FREEFORM_CALIB, taken, rng)
    comp_train = _unique(grammar, N_GRAMMAR_TRAIN, taken, rng) + _unique(freeform, N_FREEFORM_TRAIN, taken, rng)

    all_caps = mem_captions + nmem + calib + comp_train
    vocab = sorted({w for c in all_caps for w in words(c)})
    pattern_words = sorted({w for c in nmem + calib + comp_train for w in content_words(c)})
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
        regime=regime.name,
        mem_triggers=mem_triggers,
    )


def write_prompts(data: MemorizerData, out: Path | None = None) -> None:
    """Write the held-out prompt files (this script is their single source of truth).

    ``mem_levels.tsv`` has a header line; its columns are ``caption``, ``duplicates`` and, for regimes with
    trigger words, ``triggers`` (the caption's trigger words, space-separated, in caption order).
    """
    out = REGIMES[data.regime].prompt_dir if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    (out / "mem.txt").write_text("".join(c + "\n" for c in data.mem_captions))
    if data.mem_triggers:
        rows = zip(data.mem_captions, data.mem_levels, data.mem_triggers, strict=True)
        tsv = "caption\tduplicates\ttriggers\n" + "".join(f"{c}\t{lvl}\t{' '.join(t)}\n" for c, lvl, t in rows)
    else:
        rows = zip(data.mem_captions, data.mem_levels, strict=True)
        tsv = "caption\tduplicates\n" + "".join(f"{c}\t{lvl}\n" for c, lvl in rows)
    (out / "mem_levels.tsv").write_text(tsv)
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
    p.add_argument("--regime", choices=sorted(REGIMES), default="shipped")
    p.add_argument(
        "--assets", type=Path, default=SHIPPED_MODEL_DIR, help="where demo_prompts.json goes (shipped regime only)"
    )
    a = p.parse_args()
    d = build(a.seed, a.regime)
    write_prompts(d)
    if a.regime == "shipped":
        a.assets.mkdir(parents=True, exist_ok=True)
        (a.assets / "demo_prompts.json").write_text(json.dumps(demo_prompts(d), indent=1) + "\n")
    print(
        f"regime {a.regime}: train pairs {len(d.train_captions)} (distinct latents {len(d.train_latents)}), "
        f"mem {len(d.mem_captions)}, nmem {len(d.nmem_captions)}, calib {len(d.calib_captions)}, vocab {len(d.vocab)}"
    )


if __name__ == "__main__":
    main()
