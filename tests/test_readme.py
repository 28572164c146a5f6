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
    assert action == "rewrite"
    assert method in {"guidance_schedule", "token", "prompt_embedding", "initial_noise", "combined"}
    assert verified == "True"
    assert printed[2].startswith("blocked: rule block-memorized matched")
    assert (tmp_path / "demo-audit.jsonl").exists()


def _readme_commands():
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_commands", README.parent / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_shell_block_is_run_by_ci_or_a_test_or_marked_a_template():
    commands = _readme_commands()
    blocks = commands.shell_blocks(README.read_text(encoding="utf-8"))
    unmarked = [line for marker, _, line in blocks if marker is None]
    assert not unmarked, f"README.md shell blocks at lines {unmarked} are neither ci:, tested: nor template"
    for marker, _, line in blocks:
        if marker.startswith("tested:"):
            test_file = README.parent / marker.split(":", 1)[1]
            assert test_file.is_file(), f"README.md line {line}: {test_file} does not exist"


def test_ci_runs_the_readme_setup_and_test_commands_which_are_pasteable_shell():
    import subprocess

    commands = _readme_commands()
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    for name in ("setup", "test"):
        body = commands.block(name)
        assert f"readme_commands.py {name}" in ci
        subprocess.run(["bash", "-n"], input=body, text=True, check=True)  # valid shell
        assert not re.search(r"\[--|<[A-Z_]+>| DIR( |$)|\|[a-z]+\]", body), f"{name} holds a usage placeholder"
    setup = commands.block("setup")
    assert setup.index("torch==2.13.0") < setup.index("pip install -e ."), "torch must be pinned before the project"


def test_a_broken_readme_command_is_found(tmp_path):
    """The failure this replaced: a usage line pasted onto the set-up command (a pipe into `gradient]`)."""
    commands = _readme_commands()
    broken = ("<!-- ci: setup -->\n```bash\npip install -e . && memguard explain --model DIR \"p\" "
              "[--method occlusion|gradient]\n```\n")
    body = commands.block("setup", broken)
    assert re.search(r"\[--|<[A-Z_]+>| DIR( |$)|\|[a-z]+\]", body)
    assert commands.shell_blocks("```bash\nls\n```\n")[0][0] is None  # an unmarked block is reported
