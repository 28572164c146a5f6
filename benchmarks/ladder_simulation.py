"""Replays candidate ladders on the per-prompt measurements of ``benchmarks/rung_research.py``.

Why: a ladder releases a prompt at its first rung whose image passes verification, and pays for every rung it
tries; with each rung measured once per (prompt, seed) on the same initial noise, every ordering and every
skip rule can be replayed exactly without generating again. A skip rule ``R<A:S`` skips rung ``R`` when rung
``A`` already ran and its image's probe similarity was at least ``S`` (the ladder's own verification
measurement, no truth needed). Reported per model: released share, copies among the released (truth: cosine to
the training latent above the unseen-caption level), the releasing rungs, and the cost in generations (the
probes plus every rung tried; mean, and the most any prompt paid, blocked prompts separately).

    python benchmarks/ladder_simulation.py runs/v-hard.json runs/v-strong.json \\
        --ladder shipped="g[-2@0.5],prompt_embedding,initial_noise,combined"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402


@dataclass(frozen=True)
class Skip:
    rung: str
    after: str
    at_least: float

    @classmethod
    def parse(cls, text: str) -> Skip:
        rung, rest = text.split("<", 1)
        after, value = rest.rsplit(":", 1)
        return cls(rung, after, float(value))


@dataclass(frozen=True)
class Ladder:
    name: str
    rungs: tuple[str, ...]
    skips: tuple[Skip, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Ladder:
        """``name=r1,r2,...[;R<A:S;...]``; rung names are rung_research.py's variant names."""
        name, rest = text.split("=", 1)
        parts = rest.split(";")
        rungs = _split_rungs(parts[0])
        return cls(name, tuple(rungs), tuple(Skip.parse(p) for p in parts[1:] if p))


def _split_rungs(text: str) -> list[str]:
    """Split on commas outside brackets (schedules like ``g[-2@0.3,0@0.7]`` contain commas)."""
    out, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    return out + ([current] if current else [])


def replay(ladder: Ladder, record: dict[str, Any], threshold: float) -> dict[str, Any]:
    """One prompt through ``ladder``: the releasing rung (None: blocked), its image, the rungs tried, the cost."""
    cost = record["probe_cost"]
    tried: dict[str, float] = {}
    for rung in ladder.rungs:
        if any(s.rung == rung and tried.get(s.after, -1.0) >= s.at_least for s in ladder.skips):
            continue
        entry = record["variants"][rung]
        cost += entry["cost"]
        tried[rung] = entry["sim"]
        if entry["sim"] <= threshold:
            return {"released": rung, "cos": entry["cos"], "text": entry.get("text"), "cost": cost,
                    "tried": list(tried)}
    return {"released": None, "cos": None, "text": None, "cost": cost, "tried": list(tried)}


def evaluate(ladder: Ladder, run: dict[str, Any]) -> dict[str, Any]:
    outcomes = [replay(ladder, r, run["threshold"]) for r in run["records"]]
    released = [o for o in outcomes if o["released"] is not None]
    blocked = [o for o in outcomes if o["released"] is None]
    texts = [o["text"] for o in released if o["text"] is not None and o["text"] == o["text"]]
    return {
        "n": len(outcomes), "released": len(released), "copies": sum(o["cos"] > run["level"] for o in released),
        "max_cos": max((o["cos"] for o in released), default=None),
        "text": statistics.mean(texts) if texts else None,
        "by": Counter(o["released"] for o in released),
        "cost": statistics.mean(o["cost"] for o in outcomes),
        "cost_max": max(o["cost"] for o in outcomes),
        "cost_blocked": max((o["cost"] for o in blocked), default=None),
    }


def conditional(runs: dict[str, dict[str, Any]], after: str, rungs: list[str],
                bins: tuple[float, ...] = (0.95, 0.8)) -> str:
    """Per model: among prompts whose ``after`` rung failed verification, by the similarity it measured
    (>= bins[0], then >= bins[1], then below), how many each rung of ``rungs`` releases."""
    rows = []
    for model, run in runs.items():
        records = [r for r in run["records"] if after in r["variants"]]
        failed = [r for r in records if r["variants"][after]["sim"] > run["threshold"]]
        edges = [*bins, run["threshold"]]
        for low, high in zip(edges, [1.01, *edges[:-1]], strict=True):
            group = [r for r in failed if low <= r["variants"][after]["sim"] < high]
            if not group:
                continue
            cells = []
            for rung in rungs:
                have = [r for r in group if rung in r["variants"]]
                ok = sum(r["variants"][rung]["sim"] <= run["threshold"] for r in have)
                cells.append(f"{ok}/{len(have)}" if have else "-")
            rows.append([model, run.get("prediction_type", "?"), f"[{low:.2f}, {min(high, 1.0):.2f})", len(group),
                         *cells])
    return table(["model", "prediction", f"{after} failed at similarity", "prompts", *rungs], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="rung_research.py --json outputs")
    p.add_argument("--ladder", action="append", default=[], help='name=r1,r2,...[;R<A:S...]')
    p.add_argument("--after", help="also: what each --then rung releases after this rung failed, by its similarity")
    p.add_argument("--then", nargs="*", default=[])
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    ladders = [Ladder.parse(text) for text in args.ladder]
    runs = {path.stem: json.loads(path.read_text()) for path in args.runs}
    rows, dump = [], []
    for ladder in ladders:
        for model, run in runs.items():
            missing = [r for r in ladder.rungs if r not in run["records"][0]["variants"]]
            if missing:
                rows.append([ladder.name, model, f"not measured: {', '.join(missing)}"] + ["-"] * 7)
                continue
            e = evaluate(ladder, run)
            dump.append({"ladder": ladder.name, "model": model, **{k: v for k, v in e.items() if k != "by"},
                         "by": dict(e["by"])})
            rows.append([ladder.name, model, f"{e['released']}/{e['n']}", e["copies"],
                         "-" if e["max_cos"] is None else round(e["max_cos"], 3),
                         "-" if e["text"] is None else round(e["text"], 3),
                         ", ".join(f"{k} {v}" for k, v in e["by"].most_common()) or "-",
                         round(e["cost"], 2), round(e["cost_max"], 2),
                         "-" if e["cost_blocked"] is None else round(e["cost_blocked"], 2)])
    if rows:
        print(table(["ladder", "model", "released", "copies released", "max cos released", "text cos released",
                     "released by", "cost mean", "cost max", "cost max, blocked"], rows))
    if args.after:
        print("\n" + conditional(runs, args.after, args.then))
    if args.json:
        args.json.write_text(json.dumps(dump, indent=1))


if __name__ == "__main__":
    main()
