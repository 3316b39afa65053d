"""`compound run`, `compound explain` and `compound validate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from executor import events
from planner import load_spec
from server.cli import build_parser, main
from server.pipeline_cli import UsageError, parse_inputs, progress_line
from tests.server.conftest import DEMO_MODEL

REPO = Path(__file__).resolve().parents[2]
PIPELINES = REPO / "pipelines"
SPEC = """\
name: hello
inputs:
  q: {type: string}
  n: {type: integer, default: 1}
models: {m: demo-base}
tools: [calc]
steps:
  two:
    tool: calc
    args: {expression: "{{ inputs.n }} + 1"}
  say:
    generate: {model: m, prompt: "{{ inputs.q }}", max_tokens: 4}
outputs:
  two: "{{ steps.two.output }}"
  say: "{{ steps.say.output }}"
"""


@pytest.fixture
def config_file(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A compound.yaml serving the tiny checkpoint as the demo model."""
    file = tmp_path / "compound.yaml"
    file.write_text(
        "engine: {device: cpu, memory_budget_bytes: 1073741824}\n"
        f"models:\n  - {{name: {DEMO_MODEL}, path: {tiny_model_dir}}}\n"
        f"pipelines_dir: {PIPELINES}\n"
    )
    return file


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    """A small valid spec."""
    file = tmp_path / "hello.yaml"
    file.write_text(SPEC)
    return file


def write(tmp_path: Path, name: str, text: str) -> Path:
    """A file in tmp_path."""
    file = tmp_path / name
    file.write_text(text)
    return file


# -- validate ------------------------------------------------------------------------------------


def test_validate_passes_quietly(
    config_file: Path, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", "--config", str(config_file), str(spec_file)]) == 0
    assert capsys.readouterr().out == ""


def test_validate_prints_file_line_column_pointer_message(
    config_file: Path, spec_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write(tmp_path, "bad.yaml", SPEC.replace("max_tokens: 4", "max_tokens: 0"))
    unbound = write(tmp_path, "unbound.yaml", SPEC.replace("m: demo-base", "m: nowhere"))
    code = main(["validate", "--config", str(config_file), str(spec_file), str(bad), str(unbound)])
    assert code == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{bad}:12:") and ": /steps/say/generate/max_tokens: " in lines[0]
    assert lines[1].startswith(f"{unbound}:5:") and ": /models/m: " in lines[1]
    assert "nowhere" in lines[1]


def test_validate_no_bind_only_loads(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unbound = write(tmp_path, "unbound.yaml", SPEC.replace("m: demo-base", "m: nowhere"))
    assert main(["validate", "--no-bind", "--config", str(config_file), str(unbound)]) == 0
    assert main(["validate", "--config", str(config_file), str(unbound)]) == 1
    capsys.readouterr()


def test_validate_without_a_config_here_only_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    unbound = write(tmp_path, "unbound.yaml", SPEC.replace("m: demo-base", "m: nowhere"))
    assert main(["validate", str(unbound)]) == 0
    broken = write(tmp_path, "broken.json", '{"name": "x", "steps": {}}')
    assert main(["validate", str(broken)]) == 1
    assert capsys.readouterr().out.startswith(f"{broken}:1:")


def test_validate_reports_unreadable_files_and_bad_configs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", "--no-bind", str(tmp_path / "absent.yaml")]) == 1
    assert "absent.yaml: cannot read" in capsys.readouterr().out
    assert main(["validate", "--config", str(tmp_path / "nope.yaml"), "x.yaml"]) == 2
    assert "cannot read" in capsys.readouterr().err


# -- explain -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "start"), [("text", "Plan hello:"), ("mermaid", "flowchart")])
def test_explain_prints_the_plan(
    config_file: Path, spec_file: Path, fmt: str, start: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", "--config", str(config_file), "--format", fmt, str(spec_file)]) == 0
    assert capsys.readouterr().out.startswith(start)


def test_explain_json_and_errors(
    config_file: Path, spec_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", "--config", str(config_file), "--format", "json", str(spec_file)]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), dict)
    unbound = write(tmp_path, "unbound.yaml", SPEC.replace("m: demo-base", "m: nowhere"))
    assert main(["explain", "--config", str(config_file), str(unbound)]) == 1
    assert capsys.readouterr().err.startswith(f"{unbound}:5:")
    assert main(["explain", "--config", str(tmp_path / "none.yaml"), str(spec_file)]) == 2


# -- run -----------------------------------------------------------------------------------------


def test_run_prints_outputs_and_progress(
    config_file: Path, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", "--config", str(config_file), str(spec_file), "-i", "q=hi", "-i", "n=41"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    outputs = json.loads(captured.out)
    assert outputs["two"] == 42 and isinstance(outputs["say"], str)
    assert "] run hello started" in captured.err and "] two finished" in captured.err
    assert "] run finished in" in captured.err


def test_run_a_shipped_failing_pipeline_exits_1(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = PIPELINES / "city-facts.yaml"
    assert main(["run", "--config", str(config_file), str(spec)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "run failed (step facts)" in captured.err and "facts attempt 3" in captured.err


def test_run_with_invalid_inputs(
    config_file: Path, spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--config", str(config_file), str(spec_file)]) == 1
    assert "invalid inputs: /q: missing required input" in capsys.readouterr().err
    assert main(["run", "--config", str(config_file), str(spec_file), "-i", "oops"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err


def test_parse_inputs_reads_json_unless_the_input_is_a_string() -> None:
    spec = load_spec(SPEC)
    assert parse_inputs(spec, ["q=42", "n=41", "extra=[1, 2]", "word=plain"], None) == {
        "q": "42",
        "n": 41,
        "extra": [1, 2],
        "word": "plain",
    }
    assert parse_inputs(spec, ["n=2"], '{"q": "a", "n": 1}') == {"q": "a", "n": 2}
    with pytest.raises(UsageError, match="JSON object"):
        parse_inputs(spec, [], "[1]")
    with pytest.raises(UsageError, match="not JSON"):
        parse_inputs(spec, [], "{")


def test_progress_lines() -> None:
    line = progress_line(events.StepRetried(run_id="r", step="a", attempt=2, error="boom"))
    assert line == "a attempt 2 after: boom"
    assert progress_line(events.TokenDelta(run_id="r", step="a", text="x")) is None


def test_parser_lists_the_pipeline_commands() -> None:
    args = build_parser().parse_args(["run", "s.yaml", "-i", "a=1", "--input", "b=2"])
    assert (args.command, args.spec, args.inputs, args.config) == (
        "run",
        "s.yaml",
        ["a=1", "b=2"],
        None,
    )
    args = build_parser().parse_args(["validate", "a.yaml", "b.json", "--no-bind"])
    assert (args.specs, args.no_bind) == (["a.yaml", "b.json"], True)
    assert build_parser().parse_args(["explain", "a.yaml"]).format == "text"
