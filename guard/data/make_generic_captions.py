"""Regenerate ``generic_captions.txt``: everyday captions that no model has memorized.

Captions are random compositions of generic subjects, places, times and styles (no brands, people,
artworks or titles), so no single caption is duplicated in any training set. Seeded, deterministic:
``python -m guard.data.make_generic_captions``.
"""

from __future__ import annotations

import random
from pathlib import Path

SEED = 20240517
COUNT = 1000

SUBJECTS = [
    "a tabby cat",
    "a golden retriever",
    "an old fisherman",
    "a red bicycle",
    "a bowl of ramen",
    "a lighthouse",
    "a wooden rowboat",
    "a child flying a kite",
    "a stack of pancakes",
    "a vintage typewriter",
    "a hot air balloon",
    "a fox",
    "a pair of hiking boots",
    "a cup of coffee",
    "a small bakery",
    "a yellow taxi",
    "a barn owl",
    "a field of sunflowers",
    "a mountain cabin",
    "a street musician",
    "a bowl of fresh fruit",
    "a sleeping puppy",
    "a stone bridge",
    "a market stall with vegetables",
    "a teapot",
    "a herd of goats",
    "a snowman",
    "a farmer on a tractor",
    "a glass of lemonade",
    "an empty park bench",
    "a sailboat",
    "a potted cactus",
    "a family having a picnic",
    "a bookshelf full of books",
    "a dragonfly",
    "a plate of spaghetti",
    "a windmill",
    "a pair of ducks",
    "a delivery van",
    "a girl reading a book",
    "a robot toy",
    "an elephant",
    "a bowl of soup",
    "a desert road",
    "a jellyfish",
    "a wooden chair",
    "a slice of chocolate cake",
    "a train station platform",
    "a parrot",
    "a knitted scarf",
    "a waterfall",
    "a cyclist",
    "a row of colorful houses",
    "a chess board",
    "a loaf of bread",
    "a horse grazing",
    "a city bus",
    "an astronaut figurine",
    "a basket of apples",
    "a mug of tea",
    "a frog on a lily pad",
    "a tent",
    "a grandmother knitting",
    "a skateboarder",
    "a penguin",
    "a vase of tulips",
    "a fire truck",
    "a camping lantern",
    "a plate of sushi",
    "a paper boat",
    "a hedgehog",
    "a tram",
    "a woman jogging",
    "a bowl of salad",
    "a clock tower",
    "a pumpkin",
    "a rabbit",
    "a wind turbine",
    "a taco",
    "a kayak",
    "an old pickup truck",
    "a dog catching a frisbee",
    "a sandcastle",
    "a bee on a flower",
]

PLACES = [
    "on a rainy street",
    "in a quiet forest",
    "on a sunny beach",
    "in a cozy kitchen",
    "on a snowy hill",
    "in a busy market",
    "next to a lake",
    "in a small garden",
    "on a city rooftop",
    "in a desert",
    "inside a library",
    "by the harbor",
    "in a wheat field",
    "on a mountain trail",
    "in a living room",
    "at a train station",
    "under a bridge",
    "in a classroom",
    "on a country road",
    "near a river",
    "in a park",
    "on a wooden table",
    "in a greenhouse",
    "at the edge of a cliff",
    "in a backyard",
    "on a balcony",
    "in an old town square",
    "in a meadow",
    "on a pier",
    "inside a cafe",
    "in a parking lot",
    "on a frozen pond",
    "in a bamboo grove",
    "on a windowsill",
    "in a canyon",
]

TIMES = [
    "at sunset",
    "at dawn",
    "at night",
    "in the fog",
    "on a cloudy afternoon",
    "in autumn",
    "in spring",
    "in winter",
    "in summer",
    "under a starry sky",
    "after the rain",
    "at noon",
    "in golden hour light",
    "during a snowstorm",
    "in soft morning light",
]

STYLES = [
    "a photo of",
    "a watercolor painting of",
    "a 3d render of",
    "an oil painting of",
    "a pencil sketch of",
    "a close-up photo of",
    "a wide-angle photo of",
    "a digital illustration of",
    "a low poly render of",
    "a pixel art image of",
    "a charcoal drawing of",
    "a linocut print of",
    "a children's book illustration of",
    "an isometric illustration of",
    "a black and white photo of",
    "a pastel drawing of",
    "a claymation still of",
    "a flat vector illustration of",
    "a macro photo of",
    "an aerial photo of",
    "a film photo of",
    "a gouache painting of",
    "a papercraft model of",
    "an ink drawing of",
    "a mosaic of",
]

DETAILS = [
    "",
    "",
    "",
    "highly detailed",
    "soft colors",
    "shallow depth of field",
    "warm tones",
    "muted palette",
    "minimalist",
    "bright colors",
    "high contrast",
    "cinematic lighting",
    "simple background",
    "wide shot",
    "cozy atmosphere",
    "symmetrical composition",
    "natural light",
    "grainy texture",
]

TEMPLATES = [
    "{style} {subject} {place} {time}",
    "{style} {subject} {place}",
    "{style} {subject} {time}",
    "{subject} {place} {time}",
    "{subject} {place}",
    "{style} {subject}",
]


def make_captions(count: int = COUNT, seed: int = SEED) -> list[str]:
    """``count`` distinct captions, the same for the same seed."""
    rng = random.Random(seed)
    seen: set[str] = set()
    captions: list[str] = []
    while len(captions) < count:
        text = rng.choice(TEMPLATES).format(
            style=rng.choice(STYLES),
            subject=rng.choice(SUBJECTS),
            place=rng.choice(PLACES),
            time=rng.choice(TIMES),
        )
        detail = rng.choice(DETAILS)
        if detail:
            text = f"{text}, {detail}"
        if text not in seen:
            seen.add(text)
            captions.append(text)
    return captions


def main() -> None:
    out = Path(__file__).with_name("generic_captions.txt")
    out.write_text("\n".join(make_captions()) + "\n", encoding="utf-8")
    print(f"wrote {COUNT} captions to {out}")


if __name__ == "__main__":
    main()
