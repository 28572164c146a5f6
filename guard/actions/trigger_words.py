"""Editing a prompt's trigger words: the text side of a trigger-word rung (pure functions, no model).

Memorization usually hangs on a few words (Wen et al. 2024); memguard's occlusion attribution
(``guard.scoring.explain``) says which words carry the score. A trigger-word rung removes those words from the
prompt, or replaces each by a word *of the same kind* (a colour by another colour, a place by another place),
re-scores the candidates and generates from the edited prompt; verification then compares the image with
the probes of the *original* prompt, like every rung.

This module builds the edited prompts and runs the greedy search (``rewrite_triggers``) on callables for
explaining and scoring, so it needs no model. Which words are "of the same kind" is a ``Lexicon``: kinds mapped
to the phrases of that kind (``{"color": ["red", "blue"], "place": ["city street", "beach"]}``), matched
case-insensitively on word boundaries; a word that belongs to no phrase of the lexicon can only be deleted.
``benchmarks/rung_research.py`` measures which edit frees which memorizer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product

__all__ = [
    "Edit",
    "Lexicon",
    "Phrase",
    "TriggerRewrite",
    "delete_spans",
    "edits",
    "find_phrase",
    "ranked_spans",
    "replace_spans",
    "rewrite_triggers",
    "word_indices",
]

#: Kind -> phrases of that kind.
Lexicon = Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class Phrase:
    """A lexicon phrase found in a prompt: its kind, the text as written and its character span."""

    kind: str
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Edit:
    """One edited prompt: ``removed`` words (as written) and, for replacements, what took their place."""

    prompt: str
    removed: tuple[str, ...]
    inserted: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "replace" if self.inserted else "delete"


def _clean(text: str) -> str:
    """Whitespace collapsed, no space before punctuation, no dangling punctuation at the ends."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    return text.strip(" ,;:")


def ranked_spans(words: Iterable[object], k: int) -> list[tuple[int, int]]:
    """The spans ``(start, end)`` of the ``k`` words with the highest positive weight, highest first.

    ``words`` are ``WordWeight``-like objects (``start``, ``end``, ``weight``, ``index``); words whose weight
    is not positive (deleting them does not lower the score) are never chosen.
    """
    chosen = sorted((w for w in words if getattr(w, "weight", 0.0) > 0.0),
                    key=lambda w: (-w.weight, w.index))  # type: ignore[attr-defined]
    return [(int(w.start), int(w.end)) for w in chosen[:k]]  # type: ignore[attr-defined]


def find_phrase(prompt: str, span: tuple[int, int], lexicon: Lexicon) -> Phrase | None:
    """The longest lexicon phrase of ``prompt`` that covers the word at ``span`` (None if none does)."""
    best: Phrase | None = None
    lowered = prompt.lower()
    for kind, phrases in lexicon.items():
        for phrase in phrases:
            pattern = r"(?<![\w'-])" + r"\s+".join(map(re.escape, phrase.lower().split())) + r"(?![\w'-])"
            for match in re.finditer(pattern, lowered):
                if match.start() <= span[0] and span[1] <= match.end():
                    if best is None or match.end() - match.start() > best.end - best.start:
                        best = Phrase(kind, prompt[match.start() : match.end()], match.start(), match.end())
    return best


def delete_spans(prompt: str, spans: Sequence[tuple[int, int]]) -> str:
    """``prompt`` without the text at ``spans`` (whitespace and punctuation tidied)."""
    return replace_spans(prompt, [(span, "") for span in spans])


def replace_spans(prompt: str, replacements: Sequence[tuple[tuple[int, int], str]]) -> str:
    """``prompt`` with each span's text replaced (spans must not overlap)."""
    ordered = sorted(replacements, key=lambda item: item[0][0])
    for (a, _), (c, _) in zip(ordered, ordered[1:], strict=False):
        if c[0] < a[1]:
            raise ValueError(f"overlapping spans {a} and {c}")
    out, at = [], 0
    for (start, end), text in ordered:
        out.append(prompt[at:start])
        out.append(text)
        at = end
    out.append(prompt[at:])
    return _clean("".join(out))


def edits(
    prompt: str,
    spans: Sequence[tuple[int, int]],
    lexicon: Lexicon | None = None,
    *,
    mode: str = "replace",
    limit: int = 64,
) -> list[Edit]:
    """The edited prompts for the words at ``spans`` (usually ``ranked_spans(explanation.words, k)``).

    ``mode="delete"``: one edit, every span deleted. ``mode="replace"``: every span that lies in a lexicon
    phrase is replaced by each other phrase of its kind (all combinations, at most ``limit`` edits, in a fixed
    order), spans in no phrase are deleted; without a lexicon this is ``delete``. The caller re-scores the
    edits and keeps the lowest-scoring one.
    """
    if mode not in ("delete", "replace"):
        raise ValueError(f"mode must be 'delete' or 'replace', got {mode!r}")
    if not spans:
        return []
    if mode == "delete" or not lexicon:
        return [Edit(delete_spans(prompt, spans), tuple(prompt[a:b] for a, b in spans))]
    targets: list[tuple[tuple[int, int], str, list[str]]] = []
    seen: set[tuple[int, int]] = set()
    for span in spans:
        phrase = find_phrase(prompt, span, lexicon)
        if phrase is None:
            where, options = span, [""]
        else:
            where = (phrase.start, phrase.end)
            own = phrase.text.lower()
            options = [p for p in lexicon[phrase.kind] if p.lower() != own and
                       not re.search(r"(?<![\w'-])" + re.escape(p.lower()) + r"(?![\w'-])", prompt.lower())]
            options = options or [""]
        if where in seen:  # two chosen words of one phrase: replace it once
            continue
        seen.add(where)
        targets.append((where, prompt[where[0] : where[1]], options))
    out: list[Edit] = []
    for choice in product(*(options for _, _, options in targets)):
        edited = replace_spans(prompt, [(where, text) for (where, _, _), text in zip(targets, choice)])
        out.append(Edit(edited, tuple(t for _, t, _ in targets), tuple(c for c in choice if c)))
        if len(out) >= limit:
            break
    return out


@dataclass(frozen=True)
class TriggerRewrite:
    """What ``rewrite_triggers`` did: the final prompt and score, each word it edited, and the scoring rows it spent
    (one per prompt scored: the occlusion variants and the candidates)."""

    prompt: str
    score: float
    removed: tuple[str, ...]
    inserted: tuple[str, ...]
    rounds: int
    scored: int
    exhausted: bool = False  # no further word raises the score (or max_words reached): no deeper edit exists

    @property
    def changed(self) -> bool:
        return bool(self.removed)


def rewrite_triggers(
    prompt: str,
    *,
    explain: Callable[[str], Sequence[object]],
    score: Callable[[Sequence[str]], Sequence[float]],
    target: float,
    lexicon: Lexicon | None = None,
    max_words: int = 3,
    min_words: int = 0,
    limit: int = 64,
) -> TriggerRewrite:
    """Greedy trigger-word rewrite: while the score is above ``target`` and fewer than ``max_words`` words were
    edited, attribute the current prompt's score to its words (``explain(prompt)`` -> ``WordWeight``-like
    objects, occlusion), take the top word, build its edits (``edits(..., mode="replace")``: each other
    phrase of its kind, or deletion), score them all and keep the lowest-scoring one. Each round re-explains
    the edited prompt, because removing one trigger changes what the others carry (a word pair splits its
    weight). Stops early when no word has a positive weight. ``min_words`` edits at least that many words even
    below the target (a deeper edit after a shallower one failed verification).
    """
    current = prompt
    current_score = float(score([prompt])[0])
    scored, rounds = 1, 0
    removed: list[str] = []
    inserted: list[str] = []
    exhausted = False
    while (current_score > target or len(removed) < min_words) and len(removed) < max_words:
        words = list(explain(current))
        scored += len(words) + 1
        spans = ranked_spans(words, 1)
        if not spans:
            exhausted = True
            break
        candidates = edits(current, spans, lexicon, limit=limit)
        values = [float(v) for v in score([c.prompt for c in candidates])]
        scored += len(candidates)
        best = min(range(len(candidates)), key=lambda i: values[i])
        current, current_score = candidates[best].prompt, values[best]
        removed += candidates[best].removed
        inserted += candidates[best].inserted
        rounds += 1
    exhausted = exhausted or len(removed) >= max_words
    return TriggerRewrite(current, current_score, tuple(removed), tuple(inserted), rounds, scored, exhausted)


def word_indices(prompt: str, words: Sequence[str], spans: Sequence[tuple[int, int]]) -> list[int]:
    """The indices (into ``spans``, the prompt's words) of ``words`` edited out of ``prompt``: each taken at its
    first unused occurrence, case-insensitively; a phrase covers every word it spans. What an audit record keeps
    when the words themselves may not be logged."""
    used: set[int] = set()
    found: list[int] = []
    lowered = prompt.lower()
    for word in words:
        pattern = r"(?<![\w'-])" + r"\s+".join(map(re.escape, word.lower().split())) + r"(?![\w'-])"
        for match in re.finditer(pattern, lowered):
            covered = [i for i, (a, b) in enumerate(spans) if match.start() <= a and b <= match.end()]
            if covered and not used.intersection(covered):
                used.update(covered)
                found.extend(covered)
                break
    return sorted(found)
