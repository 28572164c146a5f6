"""``memguard scan`` (local engine) on a pipeline saved with ``save_pretrained``."""

import json

import pytest
from click.testing import CliRunner

from guard import score_prompts
from guard.cli import main

PROMPTS = ["a red cat on the beach", "", "  watercolor city street  ", "old man with a hat", "\t", "a dog"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sd_pipe):
    path = tmp_path_factory.mktemp("model") / "tiny-sd"
    sd_pipe.save_pretrained(path)
    return path


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def run(*args):
    return CliRunner().invoke(main, ["scan", *map(str, args)])


def test_scan_writes_one_row_per_non_blank_line_in_order(model_dir, prompts_file, tmp_path, sd_pipe):
    out = tmp_path / "scores.jsonl"
    result = run("--model", model_dir, "--prompts", prompts_file, "--out", out, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [p for p in PROMPTS if p.strip()]
    assert [r["prompt"] for r in rows] == expected
    assert [r["index"] for r in rows] == list(range(len(expected)))
    direct = score_prompts(sd_pipe, expected)
    for row, score in zip(rows, direct):
        assert {"prompt", "norm", "cos", "score"} <= set(row)
        assert row["score"] == pytest.approx(score.score, abs=1e-5)
        assert (row["t_hi"], row["t_lo"], row["samples"], row["seed"]) == (981, 41, 1, 51)


def test_scan_resumes_after_an_interrupted_write(model_dir, prompts_file, tmp_path):
    full, partial = tmp_path / "full.jsonl", tmp_path / "partial.jsonl"
    assert run("--model", model_dir, "--prompts", prompts_file, "--out", full).exit_code == 0
    lines = full.read_text().splitlines(keepends=True)
    partial.write_text("".join(lines[:2]) + lines[2][:15])  # a torn third line
    result = run("--model", model_dir, "--prompts", prompts_file, "--out", partial, "--resume")
    assert result.exit_code == 0, result.output
    assert partial.read_text() == full.read_text()


@pytest.mark.parametrize("change", ["seed", "prompts", "steps"])
def test_resume_refuses_another_run_and_names_the_difference(model_dir, prompts_file, tmp_path, change):
    """The failure this replaced: `scan --resume` with another --seed or prompt file exited 0 and mixed both runs'
    rows in one file."""
    out = tmp_path / "scores.jsonl"
    assert run("--model", model_dir, "--prompts", prompts_file, "--out", out, "--seed", 51).exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]))  # interrupted after two rows
    kept = out.read_text()
    args = ["--model", model_dir, "--prompts", prompts_file, "--out", out, "--resume", "--seed", 51]
    if change == "seed":
        args[-1], expected = 7, "scored with seed 51, this run scores with seed 7"
    elif change == "steps":
        args += ["--steps", 25]
        expected = "scored with t_hi"
    else:
        other = tmp_path / "other.txt"
        other.write_text("a blue house\nanother prompt\nthird one\n")
        args[3], expected = other, "was scored for another prompt than line 1"
    result = run(*args)
    assert result.exit_code != 0 and expected in result.output and "rerun without --resume" in result.output
    assert out.read_text() == kept  # nothing of the refused run was written


def test_scan_errors_are_one_clear_line(model_dir, prompts_file, tmp_path):
    missing_model = run("--model", tmp_path / "nope", "--prompts", prompts_file, "--out", tmp_path / "o.jsonl")
    assert missing_model.exit_code == 1
    assert "cannot load model from" in missing_model.output and "Traceback" not in missing_model.output
    missing_prompts = run("--model", model_dir, "--prompts", tmp_path / "none.txt", "--out", tmp_path / "o.jsonl")
    assert missing_prompts.exit_code == 1 and "prompt file not found" in missing_prompts.output
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    no_prompts = run("--model", model_dir, "--prompts", blank, "--out", tmp_path / "o.jsonl")
    assert no_prompts.exit_code == 1 and "no non-blank lines" in no_prompts.output


def test_scan_takes_its_scoring_settings_from_a_policy(model_dir, prompts_file, tmp_path, sd_pipe):
    policy = tmp_path / "policy.yaml"
    policy.write_text("name: p\nscoring: {noise_seed: 7, samples: 2, inference_steps: 25}\n"
                      "profile: {g_norm: 1.0, g_cos: -1.0}\n")
    out = tmp_path / "scores.jsonl"
    result = run("--model", model_dir, "--prompts", prompts_file, "--out", out, "--policy", policy)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    direct = score_prompts(sd_pipe, [rows[0]["prompt"]], seed=7, samples=2, inference_steps=25,
                           profile={"g_norm": 1.0, "g_cos": -1.0})[0]
    assert (rows[0]["seed"], rows[0]["samples"], rows[0]["g_cos"]) == (7, 2, -1.0)
    assert (rows[0]["t_hi"], rows[0]["t_lo"]) == (direct.t_hi, direct.t_lo) != (981, 41)
    assert rows[0]["score"] == pytest.approx(direct.score, abs=1e-5)
    explicit = tmp_path / "explicit.jsonl"  # an explicit option wins over the policy
    assert run("--model", model_dir, "--prompts", prompts_file, "--out", explicit, "--policy", policy,
               "--samples", 1).exit_code == 0
    assert json.loads(explicit.read_text().splitlines()[0])["samples"] == 1


def test_every_command_reports_errors_in_one_form(model_dir, tmp_path):
    """The failure this replaced: some commands said `Error: ...` (click's own), others `memguard: error: ...`."""
    outs = [
        CliRunner().invoke(main, ["scan", "--model", str(model_dir), "--prompts", str(tmp_path / "none.txt"),
                                  "--out", str(tmp_path / "o.jsonl")]),  # an error of memguard's
        CliRunner().invoke(main, ["serve"]),  # a usage error raised by the command
        CliRunner().invoke(main, ["scan", "--model", str(model_dir)]),  # a usage error of click's option parsing
        CliRunner().invoke(main, ["calibrate", "--model", str(model_dir), "--out", str(tmp_path / "p.json"),
                                  "--nmem", str(tmp_path / "none.txt")]),
    ]
    for result in outs:
        assert result.exit_code != 0
        errors = [line for line in result.output.splitlines() if "rror" in line and not line.startswith("Try ")]
        assert errors and all(line.startswith("memguard: error: ") for line in errors), result.output


@pytest.mark.parametrize("command", ["summary", "verify", "report"])
def test_audit_commands_report_errors_in_the_same_form(tmp_path, command):
    extra = ["--out", str(tmp_path / "r.html")] if command == "report" else []
    result = CliRunner().invoke(main, ["audit", command, str(tmp_path / "missing.jsonl"), *extra])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].startswith("memguard: error: "), result.output
