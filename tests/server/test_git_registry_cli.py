"""`compound diff`, `compound validate` over a pipelines repository, and `serve`'s git flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import _serve_overrides, build_parser, check_pipelines_repo, main
from server.config import ServerConfig
from tests.server.git_fixtures import Repo, calc_spec

TWO_STEPS = """\
name: calc-x
tools: [calc]
steps:
  value:
    tool: calc
    args: {expression: "1 + 1"}
  more:
    tool: calc
    args: {expression: "2 + 2"}
outputs:
  value: "{{ steps.value.output }}"
  more: "{{ steps.more.output }}"
"""


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    """calc-x: one step at tag v1, two steps on main."""
    repo = Repo(tmp_path / "specs")
    repo.commit("one step", **{"calc.yaml": calc_spec("calc-x", "1 + 1")})
    repo.git("tag", "v1")
    repo.commit("two steps", **{"calc.yaml": TWO_STEPS})
    return repo


def test_diff_shows_the_spec_and_plan_differences(
    repo: Repo, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(repo.path)  # no compound.yaml here: any model, the built-in tools
    assert main(["diff", "calc-x@v1", "calc-x@main"]) == 1
    out = capsys.readouterr().out
    assert "--- calc-x@v1 (calc.yaml at" in out and "+++ calc-x@main" in out
    assert "+  more:" in out
    assert "--- EXPLAIN calc-x@v1 [plan]" in out
    assert "-Plan calc-x: 1 tasks" in out and "+Plan calc-x: 2 tasks" in out
    assert "+  CallTool more [tool:calc]" in out


def test_diff_of_identical_versions_is_empty(
    repo: Repo, capsys: pytest.CaptureFixture[str]
) -> None:
    head = repo.head()
    assert main(["diff", "calc-x@main", f"calc-x@{head[:7]}", "--repo", str(repo.path)]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("ref", ["calc-x@nope", "calc-x@--output=x", "other@v1"])
def test_diff_errors_exit_2_naming_the_ref(
    repo: Repo, ref: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["diff", "calc-x@v1", ref, "--repo", str(repo.path)]) == 2
    assert ref.partition("@")[2] in capsys.readouterr().out


def test_diff_shows_why_a_version_does_not_plan(
    repo: Repo, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = TWO_STEPS.replace("tools: [calc]", "tools: [calc, no.such.tool]")
    repo.commit("break", **{"calc.yaml": broken})
    assert main(["diff", "calc-x@v1", "calc-x@main", "--repo", str(repo.path)]) == 1
    assert "+does not validate:" in capsys.readouterr().out


def test_validate_checks_every_file_of_a_repository_and_duplicate_names(
    repo: Repo, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(repo.path)
    assert main(["validate"]) == 0  # no file named: every spec here
    (repo.path / "copy.yaml").write_text(calc_spec("calc-x", "3"))
    (repo.path / "bad.yaml").write_text("name: [\n")
    assert main(["validate"]) == 1
    out = capsys.readouterr().out
    assert "calc.yaml, copy.yaml: pipeline name 'calc-x' declared by 2 files" in out
    assert out.count("bad.yaml") == 1
    assert main(["validate", "calc.yaml"]) == 0  # as a pre-commit hook: only changed files
    assert main(["validate", "calc.yaml", "copy.yaml"]) == 0  # names are checked repo-wide


def test_validate_binds_calls_to_unchanged_pipelines_next_to_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "callee.yaml").write_text(calc_spec("callee", "1"))
    caller = folder / "caller.yaml"
    caller.write_text(
        "name: caller\nsteps:\n  c:\n    pipeline: {name: callee}\n"
        'outputs:\n  v: "{{ steps.c.output }}"\n'
    )
    config = tmp_path / "compound.yaml"
    config.write_text(f"pipelines_dir: {tmp_path / 'empty'}\n")
    assert main(["validate", "--config", str(config), str(caller)]) == 0, capsys.readouterr()


def test_serve_takes_the_registry_options() -> None:
    args = build_parser().parse_args(
        ["serve", "--pipelines-repo", "specs", "--pipelines-branch", "prod", "--commit-posted"]
    )
    overrides = _serve_overrides(args)
    assert overrides["pipelines_repo"] == str(Path("specs").resolve())
    assert overrides["pipelines_branch"] == "prod" and overrides["commit_posted"] is True
    plain = _serve_overrides(build_parser().parse_args(["serve"]))
    assert plain == {}  # nothing given: the config file decides


def test_serve_refuses_a_repository_it_cannot_serve(repo: Repo, tmp_path: Path) -> None:
    assert check_pipelines_repo(ServerConfig(pipelines_repo=str(repo.path))) is None
    missing = check_pipelines_repo(ServerConfig(pipelines_repo=str(tmp_path / "nowhere")))
    assert missing is not None and "no such directory" in missing
    no_branch = ServerConfig(pipelines_repo=str(repo.path), pipelines_branch="prod")
    assert "'prod' names no commit" in (check_pipelines_repo(no_branch) or "")
    config = tmp_path / "compound.yaml"
    config.write_text(f"pipelines_repo: {tmp_path / 'nowhere'}\n")
    assert main(["serve", "--config", str(config)]) == 2
