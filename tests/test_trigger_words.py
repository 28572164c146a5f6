"""The text side of a trigger-word rung: ranking attributed words and building the edited prompts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from guard.actions.trigger_words import (
    Edit,
    delete_spans,
    edits,
    find_phrase,
    ranked_spans,
    replace_spans,
    rewrite_triggers,
)

LEXICON = {
    "color": ["red", "blue", "green"],
    "place": ["beach", "city street", "forest"],
    "style": ["oil painting", "watercolor"],
}


@dataclass
class Word:
    index: int
    start: int
    end: int
    weight: float


def words_of(prompt: str, weights: list[float]) -> list[Word]:
    out, at = [], 0
    for i, (token, weight) in enumerate(zip(prompt.split(" "), weights)):
        start = prompt.index(token, at)
        out.append(Word(i, start, start + len(token.strip(",")), weight))
        at = start + len(token)
    return out


def span_of(prompt: str, word: str) -> tuple[int, int]:
    start = prompt.index(word)
    return start, start + len(word)


def test_ranked_spans_takes_the_highest_positive_weights_in_order():
    prompt = "a red fox velkon on a beach"
    words = words_of(prompt, [0.0, 0.3, 0.1, 1.2, -0.5, 0.0, 0.3])
    assert ranked_spans(words, 2) == [span_of(prompt, "velkon"), span_of(prompt, "red")]
    assert ranked_spans(words, 10)[-1] == span_of(prompt, "fox")  # ties by position, non-positive never
    assert len(ranked_spans(words, 10)) == 4


def test_find_phrase_returns_the_longest_lexicon_phrase_covering_the_word():
    prompt = "a Red fox on a city street, oil painting"
    phrase = find_phrase(prompt, span_of(prompt, "street"), LEXICON)
    assert (phrase.kind, phrase.text) == ("place", "city street")
    assert find_phrase(prompt, span_of(prompt, "Red"), LEXICON).text == "Red"
    assert find_phrase(prompt, span_of(prompt, "fox"), LEXICON) is None
    assert find_phrase("a reddish fox", (2, 9), LEXICON) is None  # word boundaries


def test_delete_tidies_whitespace_and_punctuation():
    prompt = "a red fox on a beach, oil painting"
    assert delete_spans(prompt, [span_of(prompt, "oil painting")]) == "a red fox on a beach"
    assert delete_spans(prompt, [span_of(prompt, "red"), span_of(prompt, "beach")]) == "a fox on a, oil painting"
    with pytest.raises(ValueError, match="overlapping"):
        replace_spans(prompt, [((2, 5), "x"), ((4, 8), "y")])


def test_replace_uses_other_phrases_of_the_same_kind_and_deletes_words_of_no_kind():
    prompt = "a red velkon fox on a beach, oil painting"
    found = edits(prompt, [span_of(prompt, "red"), span_of(prompt, "velkon")], LEXICON)
    assert [e.prompt for e in found] == ["a blue fox on a beach, oil painting", "a green fox on a beach, oil painting"]
    assert found[0] == Edit("a blue fox on a beach, oil painting", ("red", "velkon"), ("blue",))
    assert found[0].kind == "replace"
    multi = edits(prompt, [span_of(prompt, "painting")], LEXICON)
    assert [e.prompt for e in multi] == ["a red velkon fox on a beach, watercolor"]


def test_replace_skips_phrases_already_in_the_prompt_and_combines_spans():
    prompt = "a red and blue fox on a beach"
    found = edits(prompt, [span_of(prompt, "red"), span_of(prompt, "beach")], LEXICON)
    assert [e.prompt for e in found] == [
        "a green and blue fox on a city street", "a green and blue fox on a forest"]
    assert len(edits(prompt, [span_of(prompt, "red"), span_of(prompt, "beach")], LEXICON, limit=1)) == 1


def test_delete_mode_and_no_lexicon_delete_every_span_once():
    prompt = "a red fox on a beach"
    spans = [span_of(prompt, "red"), span_of(prompt, "beach")]
    assert edits(prompt, spans, LEXICON, mode="delete") == [Edit("a fox on a", ("red", "beach"))]
    assert edits(prompt, spans) == edits(prompt, spans, mode="delete")
    assert edits(prompt, []) == []
    with pytest.raises(ValueError, match="mode"):
        edits(prompt, spans, LEXICON, mode="swap")


def _fake_model(weights: dict[str, float]):
    """A score that is the sum of per-word weights; occlusion on it gives each word its weight."""

    def score(prompts):
        return [sum(weights.get(w.strip(","), 0.0) for w in p.split()) for p in prompts]

    def explain(prompt):
        out, at = [], 0
        base = score([prompt])[0]
        for i, token in enumerate(prompt.split(" ")):
            start = prompt.index(token, at)
            end = start + len(token.strip(","))
            out.append(Word(i, start, end, base - score([delete_spans(prompt, [(start, end)])])[0]))
            at = start + len(token)
        return out

    return score, explain


def test_rewrite_triggers_re_explains_until_the_score_is_under_the_target():
    score, explain = _fake_model({"velkon": 2.0, "dramus": 1.5, "red": 0.4, "blue": 0.1, "green": 0.3, "fox": 0.2})
    done = rewrite_triggers("a red velkon dramus fox", explain=explain, score=score, target=1.0, lexicon=LEXICON)
    assert done.prompt == "a red fox"  # both invented words deleted (no kind), one round each
    assert done.removed == ("velkon", "dramus") and done.inserted == ()
    assert done.rounds == 2 and done.changed and done.score == pytest.approx(0.6)
    assert done.scored == 1 + (5 + 1 + 1) + (4 + 1 + 1)
    colour = rewrite_triggers("a red fox", explain=explain, score=score, target=0.35, lexicon=LEXICON)
    assert colour.prompt == "a blue fox" and colour.inserted == ("blue",)  # the lowest-scoring colour


def test_rewrite_triggers_stops_at_max_words_and_when_nothing_raises_the_score():
    score, explain = _fake_model({"velkon": 2.0, "dramus": 1.5})
    capped = rewrite_triggers("velkon dramus fox", explain=explain, score=score, target=0.0, max_words=1)
    assert capped.prompt == "dramus fox" and capped.rounds == 1
    untouched = rewrite_triggers("a fox", explain=explain, score=score, target=-1.0)
    assert untouched.prompt == "a fox" and not untouched.changed and untouched.rounds == 0
    already = rewrite_triggers("velkon fox", explain=explain, score=score, target=5.0)
    assert already.prompt == "velkon fox" and already.scored == 1
