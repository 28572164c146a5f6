"""Which words of a prompt drive its memorization score (docs/explain.md).

Wen et al. (2024) found that memorization usually hangs on a few trigger tokens. A user whose prompt is
blocked asks "what in my prompt did that?"; this module answers with a weight per word: how much of the score
that word carries. Two methods:

* ``occlusion`` (the default): each word is deleted from the prompt, the rest re-encoded by the pipeline's own
  encoder and re-scored on the same noise draws; a word's weight is ``score(prompt) - score(prompt without it)``.
  It measures a word's whole effect, including what the text encoder spreads to later tokens (CLIP attends
  causally, so a trigger word shapes every token after it), works for every family and tokenizer, and costs one
  scoring row pair per word and draw, batched.
* ``gradient``: gradient x input on the conditioning the denoiser sees, per token position,
  ``sum_d dS/dc[j, d] * (c[j, d] - u[j, d])`` (u: the unconditional embedding, the score's own baseline), summed
  over the tokens of each word; one forward and backward pass. Tokens no word covers (start, end, padding) are
  reported together as ``rest``. Needs the pipeline's fast tokenizer to map positions to words.

``benchmarks/explain.py`` measures which is more faithful on the memorizers with known trigger words.
Gradients are taken only with respect to the conditioning (``torch.autograd.grad``): nothing accumulates on the
model. This module knows nothing of policies; ``guard.core`` attaches explanations to decisions.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .conditioning import TextConditioning
from .scorer import Scorer

__all__ = ["METHODS", "Explanation", "WordWeight", "explain_prompt", "prompt_words", "token_spans"]

Method = Literal["occlusion", "gradient"]
METHODS: tuple[str, ...] = ("occlusion", "gradient")
_WORD = re.compile(r"\w+(?:['’\-]\w+)*")


def prompt_words(prompt: str) -> list[tuple[int, int]]:
    """The character spans of the prompt's words: runs of letters and digits (inner apostrophes and hyphens
    kept); punctuation and whitespace belong to no word."""
    return [match.span() for match in _WORD.finditer(prompt)]


class WordWeight(BaseModel):
    """One word of the prompt and the part of the score attributed to it.

    ``word`` is the prompt's own text: available in Python, never serialized (an explanation in an API response or
    an audit record says where the word is, ``start``/``end``, not what it is; records add the words only when the
    policy logs prompts in plain text).
    """

    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=0)
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    weight: float
    word: str | None = Field(default=None, exclude=True)


class Explanation(BaseModel):
    """Per-word attribution of one prompt's score.

    ``score`` is the score explained, measured on ``samples`` noise draws (those of the decision it explains);
    ``words`` are in prompt order. Positive weights raise the score.
    """

    model_config = ConfigDict(frozen=True)

    method: Method
    score: float
    samples: int = Field(ge=1)
    words: tuple[WordWeight, ...]
    rest: float = 0.0
    seconds: float = Field(default=0.0, ge=0)

    def top(self, k: int = 3) -> list[WordWeight]:
        """The ``k`` words with the highest weights, highest first."""
        return sorted(self.words, key=lambda w: (-w.weight, w.index))[:k]

    def describe(self, k: int = 3) -> str:
        """One line for people (it quotes the words: not for logs that must not hold prompt text)."""
        shown = ", ".join(f"{w.word!r} {w.weight:+.3g}" for w in self.top(k))
        return f"words driving the score ({self.method}, score {self.score:.4g}): {shown or 'none'}"

    def to_dict(self, *, with_words: bool = False) -> dict[str, Any]:
        """JSON-ready; the words' text only ``with_words``."""
        data = self.model_dump(mode="json")
        if with_words:
            for item, word in zip(data["words"], self.words):
                item["word"] = word.word
        return data

    def html(self, prompt: str) -> str:
        """``prompt`` with each word highlighted by its weight (red raises the score, blue lowers it), escaped."""
        import html as html_lib

        peak = max((abs(w.weight) for w in self.words), default=0.0) or 1.0
        out, at = [], 0
        for w in self.words:
            if w.end > len(prompt) or w.start < at:
                continue
            out.append(html_lib.escape(prompt[at : w.start]))
            share = max(-1.0, min(1.0, w.weight / peak))
            color = f"rgba(200,67,60,{share:.2f})" if share >= 0 else f"rgba(74,127,193,{-share:.2f})"
            out.append(f'<mark style="background:{color}" title="{w.weight:+.4g}">'
                       f"{html_lib.escape(prompt[w.start : w.end])}</mark>")
            at = w.end
        out.append(html_lib.escape(prompt[at:]))
        return "".join(out)


def explain_prompt(
    scorer: Scorer,
    prompt: str,
    *,
    method: str = "occlusion",
    samples: int | None = None,
    encode_options: Mapping[str, Any] | None = None,
) -> Explanation:
    """Attribute ``prompt``'s score on ``scorer``'s first ``samples`` noise draws (default: all of its ``samples``)
    to its words, by ``method`` (``occlusion`` or ``gradient``)."""
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; use one of {', '.join(METHODS)}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("explain needs a non-empty prompt")
    samples = samples or scorer.samples
    if not 1 <= samples <= scorer.samples:
        raise ValueError(f"samples must be in 1..{scorer.samples}, got {samples}")
    started = time.perf_counter()
    spans = prompt_words(prompt)
    options = dict(encode_options or {})
    if method == "occlusion":
        score, weights, rest = _occlusion(scorer, prompt, spans, samples, options)
    else:
        score, weights, rest = _gradient(scorer, prompt, spans, samples, options)
    words = tuple(
        WordWeight(index=i, start=start, end=end, weight=weight, word=prompt[start:end])
        for i, ((start, end), weight) in enumerate(zip(spans, weights))
    )
    return Explanation(method=method, score=score, samples=samples, words=words, rest=rest,  # type: ignore[arg-type]
                       seconds=time.perf_counter() - started)


def _scores(scorer: Scorer, cond: TextConditioning, samples: int) -> list[float]:
    """Scores of every row of ``cond`` on draws ``0 .. samples - 1``, batched as the scorer batches prompts."""
    out: list[float] = []
    for start in range(0, len(cond), scorer.batch_size):
        norm, cos = scorer.sample_statistics(cond.select(slice(start, start + scorer.batch_size)), 0, samples)
        out.extend(scorer.combine(norm.mean(dim=1), cos.mean(dim=1)).tolist())
    return out


def without_word(prompt: str, span: tuple[int, int]) -> str:
    """``prompt`` with the word at ``span`` deleted (and the whitespace around it closed up)."""
    start, end = span
    return re.sub(r"\s{2,}", " ", (prompt[:start] + " " + prompt[end:]).strip())


def _occlusion(
    scorer: Scorer, prompt: str, spans: list[tuple[int, int]], samples: int, options: dict[str, Any]
) -> tuple[float, list[float], float]:
    variants = [prompt] + [without_word(prompt, span) for span in spans]
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(variants), scorer.batch_size):
            cond = scorer.adapter.encode(variants[start : start + scorer.batch_size], **options)
            scores.extend(_scores(scorer, cond, samples))
    base = scores[0]
    return base, [base - s for s in scores[1:]], 0.0


def _gradient(
    scorer: Scorer, prompt: str, spans: list[tuple[int, int]], samples: int, options: dict[str, Any]
) -> tuple[float, list[float], float]:
    adapter = scorer.adapter
    with torch.no_grad():
        cond = adapter.encode([prompt], **options).to(device=adapter.device, dtype=torch.float32)
        uncond = adapter.unconditional().to(device=adapter.device, dtype=torch.float32)
    positions = token_spans(adapter, prompt, cond.embeds.shape[1])
    if uncond.embeds.shape != cond.embeds.shape:
        raise ValueError(
            f"gradient attribution needs u and c of one shape, got {tuple(uncond.embeds.shape)} and "
            f"{tuple(cond.embeds.shape)}; use method occlusion"
        )
    embeds = cond.embeds.clone().requires_grad_(True)
    with torch.enable_grad():
        current = TextConditioning(embeds, cond.pooled, cond.mask, list(cond.truncated))
        norm, cos = scorer.sample_statistics(current, 0, samples)
        score = scorer.combine(norm.mean(dim=1), cos.mean(dim=1))[0]
        (grad,) = torch.autograd.grad(score, [embeds])
    per_token = (grad * (cond.embeds - uncond.embeds)).sum(dim=-1)[0].double().tolist()
    weights = [0.0] * len(spans)
    rest = 0.0
    for value, span in zip(per_token, positions):
        owner = _owner(span, spans)
        if owner is None:
            rest += value
        else:
            weights[owner] += value
    if not all(math.isfinite(v) for v in weights):
        raise ValueError("gradient attribution is not finite for this prompt")
    return float(score.detach()), weights, rest


def _owner(span: tuple[int, int] | None, words: list[tuple[int, int]]) -> int | None:
    """The word a token's character span falls in (the one it overlaps most); None for special tokens."""
    if span is None or span[1] <= span[0]:
        return None
    best, overlap = None, 0
    for index, (start, end) in enumerate(words):
        shared = min(end, span[1]) - max(start, span[0])
        if shared > overlap:
            best, overlap = index, shared
    return best


def token_spans(adapter: Any, prompt: str, length: int) -> list[tuple[int, int] | None]:
    """For each of the ``length`` token positions of ``prompt``'s conditioning, the character span it covers
    (None for special tokens and padding), from the pipeline's own tokenizers laid out as its family lays out the
    conditioning: CLIP positions (SD 1.x/2.x, SDXL), T5 positions (FLUX, PixArt), CLIP then T5 (SD3)."""
    pipe = getattr(adapter, "pipe", None)
    family = getattr(adapter, "family", "")
    if pipe is None:
        raise ValueError(f"gradient attribution needs the pipeline's tokenizer, which {adapter.model_class} does not "
                         "expose; use method occlusion")
    if family in ("sd1", "sd2", "sdxl"):
        layout = ["tokenizer"]
    elif family == "flux":
        layout = ["tokenizer_2"]
    elif family == "pixart":
        layout = ["tokenizer"]
    elif family == "sd3":
        layout = ["tokenizer"] + (["tokenizer_3"] if getattr(pipe, "text_encoder_3", None) is not None else [])
    else:
        raise ValueError(f"no token layout known for family {family!r}; use method occlusion")
    spans: list[tuple[int, int] | None] = []
    for position, name in enumerate(layout):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"gradient attribution needs a fast tokenizer ({name}); use method occlusion")
        encoded = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length,
                            return_offsets_mapping=True)
        block = [tuple(pair) if pair[1] > pair[0] else None for pair in encoded["offset_mapping"]]
        if position < len(layout) - 1:  # a CLIP block before T5 is padded to its full length (SD3)
            block += [None] * (int(tokenizer.model_max_length) - len(block))
        spans.extend(block)
    return (spans + [None] * length)[:length]
