"""The shape of ``guard.audit``: no import cycle inside it (counting imports in functions and under
TYPE_CHECKING), and a sink that signs through the ``Signer`` protocol without knowing the checkpoint format."""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from guard.audit import AuditLog, CheckpointSigner, Signer, generate_keypair, verify_log

AUDIT = Path(__file__).resolve().parents[1] / "guard" / "audit"


def audit_imports() -> dict[str, set[str]]:
    """Module -> the ``guard.audit`` modules it imports anywhere in its source (any depth, any branch)."""
    modules = {p.stem for p in AUDIT.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in AUDIT.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from .x import y / from . import x
                    names = [node.module] if node.module else [a.name for a in node.names]
                elif node.level == 0 and node.module and node.module.startswith("guard.audit"):
                    rest = node.module[len("guard.audit"):].lstrip(".")
                    names = [rest] if rest else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name[len("guard.audit."):] for a in node.names if a.name.startswith("guard.audit.")]
            found |= {n.split(".")[0] for n in names if n and n.split(".")[0] in modules}
        graph[path.stem] = found - {path.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by depth-first search (enough to show one exists)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "active"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "active":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle_inside_guard_audit():
    graph = audit_imports()
    assert {"chain", "sink", "signing", "trail", "verify", "trail_verify"} <= set(graph)
    assert cycles(graph) == []
    assert graph["chain"] - {"__init__"} == set()  # the bottom: imports nothing of the package
    assert "signing" not in graph["sink"] and "sink" not in graph["signing"]


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_sink_code_names_no_checkpoint_field():
    """The sink's code (docstrings aside) has no string naming a checkpoint's event or fields."""
    tree = ast.parse((AUDIT / "sink.py").read_text())
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    strings = {node.value for node in ast.walk(tree)
               if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}
    format_fields = {"checkpoint", "signature", "signed_seq", "signed_hash", "prev_checkpoint_seq", "prev_signature",
                     "key_id", "alg", "v"}
    assert strings & format_fields == set()
    assert {"seq", "hash"} <= strings  # the chain fields, which are the sink's own


class ToySigner:
    """A Signer of a different format entirely (HMAC, other field names): the sink must work with it unchanged."""

    key_id = "toy"
    marker = b'"event":"seal"'

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def is_checkpoint(self, record: Mapping[str, Any]) -> bool:
        return record.get("event") == "seal"

    def seal(self, *, head_seq: int, head_hash: str, previous: Mapping[str, Any] | None, reason: str,
             fields: Mapping[str, Any]) -> dict[str, Any]:
        body = {"event": "seal", "head": [head_seq, head_hash], "after": previous["mac"] if previous else None,
                "why": reason, **fields}
        mac = hmac.new(self.secret, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()
        return {**body, "mac": mac}


def test_the_sink_signs_through_any_signer(tmp_path):
    toy = ToySigner(b"k")
    private, _ = generate_keypair(tmp_path / "keys")
    assert isinstance(toy, Signer) and isinstance(CheckpointSigner.from_file(private), Signer)
    path = tmp_path / "a.jsonl"
    with AuditLog(path, signer=toy, checkpoint_every=3, checkpoint_seconds=3600) as log:
        for i in range(7):
            log.append({"event": "decision", "i": i})
    with AuditLog(path, signer=toy, checkpoint_every=3, checkpoint_seconds=3600) as again:  # finds its last seal
        again.append({"event": "decision", "i": 7})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    seals = [r for r in records if r["event"] == "seal"]
    assert [(s["seq"], s["why"]) for s in seals] == [(4, "count"), (8, "count"), (10, "close"), (12, "close")]
    assert all(s["after"] == p["mac"] for p, s in zip(seals, seals[1:]))  # each chained to the one before
    assert all(records[s["seq"] - 2]["hash"] == s["head"][1] for s in seals)  # each signs the record before it
    assert verify_log(path).ok
