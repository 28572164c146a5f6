"""The README's runnable example works as printed."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_on_the_shipped_model_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    (example,) = [block for block in blocks if "SHIPPED_MODEL" in block]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "allow"
    action, method, verified = printed[1].split()
    assert action == "rewrite" and method in {"guidance_schedule", "prompt_embedding", "initial_noise", "combined"}
    assert verified == "True"
    assert printed[2].startswith("blocked: rule block-memorized matched")
    assert (tmp_path / "demo-audit.jsonl").exists()
