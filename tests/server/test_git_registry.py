"""The git-backed registry end to end: refs, renames, deletions, rewrites, bad commits, provenance.

Each test makes its own repository with the git CLI and serves it; the pipelines are tool-only,
so runs take milliseconds and their outputs say which version ran.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from engine import Engine
from server.app import create_app
from server.config import ServerConfig
from server.errors import BadRefError
from server.git_registry import Lru
from server.git_repo import GitRepo, check_ref
from tests.server.git_fixtures import AUTHOR, Repo, calc_spec

Client = TestClient[Litestar]
NAME = "calc-x"


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    """A repository whose first commit (tagged v1.0.0) computes 1 + 1."""
    repo = Repo(tmp_path / "specs")
    repo.commit("first", **{"calc.yaml": calc_spec(NAME, "1 + 1")})
    repo.git("tag", "-a", "v1.0.0", "-m", "release 1")
    return repo


def serve(tmp_path: Path, repo: Repo, engine: Engine, **options: Any) -> Iterator[Client]:
    """An app over `repo` and a scratch database; polling off unless asked for."""
    (tmp_path / "none").mkdir(exist_ok=True)
    config = ServerConfig(
        database_url=options.pop("database_url", f"sqlite:///{tmp_path / 'compound.db'}"),
        pipelines_dir=str(tmp_path / "none"),
        pipelines_repo=str(repo.path),
        poll_interval_s=options.pop("poll_interval_s", 0),
        **options,
    )
    with TestClient(create_app(config, engine)) as client:
        yield client


@pytest.fixture
def client(tmp_path: Path, repo: Repo, demo_engine: Engine, database_url: str) -> Iterator[Client]:
    """The app over `repo`, on SQLite and on PostgreSQL (runs, provenance, re-runs, and the
    versions git pipelines are stored as all go through the store)."""
    yield from serve(tmp_path, repo, demo_engine, database_url=database_url)


def run(client: Client, target: str, **body: Any) -> dict[str, Any]:
    """Run `target` (`name` or `name@ref`) and wait; the finished run."""
    response = client.post(f"/v1/pipelines/{target}/runs", json={"inputs": {}, **body})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["status"] == "succeeded", answer
    return answer


def reload(client: Client) -> dict[str, Any]:
    """Follow new commits now; the registry status."""
    response = client.post("/v1/registry/reload")
    assert response.status_code == 200, response.text
    return response.json()


def not_found(client: Client, ref: str) -> str:
    """The message of the 404 that running `ref` gets."""
    response = client.post(f"/v1/pipelines/{ref}/runs", json={})
    assert response.status_code == 404, response.text
    body = response.json()["error"]
    assert body["code"] == "pipeline_not_found"
    return body["message"]


def test_tags_branches_and_commits_resolve_to_exact_content(client: Client, repo: Repo) -> None:
    v1 = repo.git("rev-list", "-n1", "v1.0.0")
    v2 = repo.commit("second", **{"calc.yaml": calc_spec(NAME, "2 + 2")})
    repo.git("checkout", "-q", "-b", "exp", v1)
    v3 = repo.commit("experiment", **{"calc.yaml": calc_spec(NAME, "3 + 3")})
    repo.git("checkout", "-q", "main")
    assert reload(client)["head"] == v2

    cases = {NAME: (4, v2), f"{NAME}@v1.0.0": (2, v1), f"{NAME}@{v1[:8]}": (2, v1)}
    cases |= {f"{NAME}@{v1}": (2, v1), f"{NAME}@exp": (6, v3), f"{NAME}@main": (4, v2)}
    hashes = {}
    for ref, (value, commit) in cases.items():
        ran = run(client, ref)
        assert ran["outputs"] == {"value": value}, ref
        stored = client.get(f"/v1/runs/{ran['run_id']}").json()
        assert (stored["pipeline"], stored["ref"], stored["commit"]) == (NAME, ref, commit)
        hashes.setdefault(commit, set()).add(stored["content_hash"])
    assert all(len(h) == 1 for h in hashes.values())
    assert len(set.union(*hashes.values())) == 3  # three contents, three hashes

    explained = client.post(f"/v1/pipelines/{NAME}@v1.0.0/explain", json={}).json()
    assert explained["content_hash"] in hashes[v1] and "CallTool value" in explained["plan"]
    detail = client.get(f"/v1/pipelines/{NAME}@v1.0.0").json()
    assert detail["commit"] == v1 and "1 + 1" in detail["spec_text"]
    # The exp branch was stored last, yet the listing shows what `name` serves.
    listed = {p["name"]: p for p in client.get("/v1/pipelines").json()["pipelines"]}
    assert listed[NAME]["content_hash"] == hashes[v2].pop()


def test_versions_list_the_history_with_tags_and_authors(client: Client, repo: Repo) -> None:
    v2 = repo.commit("second", **{"calc.yaml": calc_spec(NAME, "2 + 2")})
    reload(client)
    listing = client.get(f"/v1/pipelines/{NAME}/versions").json()
    commits = listing["commits"]
    assert [c["commit"] for c in commits] == [v2, repo.git("rev-list", "-n1", "v1.0.0")]
    assert commits[1]["tags"] == ["v1.0.0"] and commits[0]["tags"] == []
    assert commits[0]["author"] == AUTHOR and commits[0]["subject"] == "second"
    assert all(c["valid"] and len(c["content_hash"]) == 64 for c in commits)
    assert commits[0]["content_hash"] != commits[1]["content_hash"]
    stored = {v["content_hash"] for v in listing["versions"]}
    assert commits[0]["content_hash"] in stored  # the served head is stored


def test_refs_that_do_not_resolve_are_404_naming_the_ref(client: Client) -> None:
    assert f"{NAME}@nope" in not_found(client, f"{NAME}@nope")
    assert f"{NAME}@deadbeef" in not_found(client, f"{NAME}@deadbeef")
    # Option injection and revision syntax are refused before git sees them.
    for bad in ("-c", "--output=x", "HEAD~1", "main^", "a..b", "v1@{0}"):
        assert "not a valid" in not_found(client, f"{NAME}@{bad}")
    assert "nothing" in not_found(client, "nothing@v1.0.0")
    response = client.get(f"/v1/pipelines/{NAME}@nope")
    assert response.status_code == 404 and f"{NAME}@nope" in response.text


def test_a_ref_before_the_pipeline_existed_names_the_commit(client: Client, repo: Repo) -> None:
    repo.commit("another", **{"other.yaml": calc_spec("other", "5 * 5")})
    reload(client)
    assert run(client, "other")["outputs"] == {"value": 25}
    message = not_found(client, "other@v1.0.0")
    assert "other@v1.0.0" in message and repo.git("rev-list", "-n1", "v1.0.0") in message


def test_renames_keep_history_and_deletions_keep_old_versions(client: Client, repo: Repo) -> None:
    repo.git("mv", "calc.yaml", "renamed.yaml")
    moved = repo.commit("rename")
    reload(client)
    assert run(client, NAME)["outputs"] == {"value": 2}
    commits = client.get(f"/v1/pipelines/{NAME}/versions").json()["commits"]
    assert [c["path"] for c in commits] == ["renamed.yaml", "calc.yaml"]
    assert commits[0]["commit"] == moved

    gone = repo.commit("delete", **{"renamed.yaml": None})
    status = reload(client)
    assert status["removed"] == {NAME: gone} and NAME not in status["pipelines"]
    assert "deleted" in not_found(client, NAME)
    assert run(client, f"{NAME}@v1.0.0")["outputs"] == {"value": 2}
    assert run(client, f"{NAME}@{moved[:10]}")["outputs"] == {"value": 2}
    commits = client.get(f"/v1/pipelines/{NAME}/versions").json()["commits"]
    assert commits[0]["deleted"] and not commits[0]["valid"] and len(commits) == 3


def test_a_bad_commit_is_reported_and_does_not_replace_the_last_good_one(
    client: Client, repo: Repo
) -> None:
    bad_tool = calc_spec(NAME, "9").replace("tools: [calc]", "tools: [no.such.tool]")
    huge = "# padding\n" * 30_000  # over the 256 KiB spec limit: reported, never read
    bad = repo.commit(
        "break it", **{"calc.yaml": bad_tool, "junk.yaml": "name: [\n", "huge.yaml": huge}
    )
    status = reload(client)
    assert status["head"] == bad and status["pipelines"][NAME] != bad
    problems = {p["path"]: p for p in status["problems"]}
    assert set(problems) == {"calc.yaml", "junk.yaml", "huge.yaml"}
    assert "the limit for a spec" in problems["huge.yaml"]["problems"][0]
    assert problems["calc.yaml"]["name"] == NAME and problems["calc.yaml"]["commit"] == bad
    assert any("no.such.tool" in m for m in problems["calc.yaml"]["problems"])
    assert run(client, NAME)["outputs"] == {"value": 2}  # still the last good version
    commits = client.get(f"/v1/pipelines/{NAME}/versions").json()["commits"]
    assert not commits[0]["valid"] and commits[0]["problems"] and commits[1]["valid"]
    response = client.post(f"/v1/pipelines/{NAME}@{bad}/runs", json={})
    assert response.status_code == 422  # asking for the bad commit itself: it does not validate

    fixed = repo.commit("fix it", **{"calc.yaml": calc_spec(NAME, "7 * 6")})
    status = reload(client)
    assert status["pipelines"][NAME] == fixed
    assert sorted(p["path"] for p in status["problems"]) == ["huge.yaml", "junk.yaml"]
    assert run(client, NAME)["outputs"] == {"value": 42}


def test_history_rewrites_old_commits_stay_runnable_or_say_they_are_gone(
    client: Client, repo: Repo
) -> None:
    used = repo.commit("second", **{"calc.yaml": calc_spec(NAME, "2 + 2")})
    same = repo.commit("same content, new commit", **{"other.txt": "x"})
    unused = repo.commit("third", **{"calc.yaml": calc_spec(NAME, "3 + 3")})
    kept = repo.commit("fourth", **{"calc.yaml": calc_spec(NAME, "5 + 5")})
    reload(client)
    assert run(client, f"{NAME}@{used}")["outputs"] == {"value": 4}
    assert run(client, f"{NAME}@{same}")["commit"] == same  # same blob: stored under `used`

    repo.git("reset", "-q", "--hard", "v1.0.0")  # force-push style rewrite of main
    rewritten = repo.commit("rewritten", **{"calc.yaml": calc_spec(NAME, "10 * 10")})
    assert reload(client)["head"] == rewritten
    assert run(client, NAME)["outputs"] == {"value": 100}
    # Unreachable now, but git still holds the objects.
    assert run(client, f"{NAME}@{kept[:12]}")["outputs"] == {"value": 10}

    repo.git("tag", "-d", "v1.0.0")
    repo.git("reflog", "expire", "--expire=now", "--all")
    repo.git("gc", "-q", "--prune=now")
    # Used before: served from the database, with its commit; never used: gone, said clearly.
    again = run(client, f"{NAME}@{used}")
    assert again["outputs"] == {"value": 4} and again["commit"] == used
    # Stored under another commit, but a run recorded this one: found through the run.
    also = run(client, f"{NAME}@{same[:9]}")
    assert also["outputs"] == {"value": 4} and also["commit"] == same
    message = not_found(client, f"{NAME}@{unused}")
    assert unused in message and "not in the repository" in message


def test_a_short_sha_made_of_digits_names_a_commit_not_a_version(
    client: Client, repo: Repo
) -> None:
    # git abbreviates to hex, so about 1 commit in 27 has 7 leading decimal digits
    for i in range(400):
        sha = repo.commit(f"commit {i}", **{"calc.yaml": calc_spec(NAME, f"{i} + 1")})
        if sha[:7].isdigit():
            break
    else:
        pytest.fail("no commit with a 7-digit prefix in 400 tries")
    reload(client)
    answer = run(client, f"{NAME}@{sha[:7]}")
    assert answer["outputs"] == {"value": i + 1} and answer["commit"] == sha
    assert run(client, f"{NAME}@1")["outputs"] == {"value": 2}  # short digits: stored version 1


def test_concurrent_runs_of_two_versions(client: Client, repo: Repo) -> None:
    repo.commit("second", **{"calc.yaml": calc_spec(NAME, "2 + 2")})
    reload(client)
    refs = [f"{NAME}@v1.0.0", NAME] * 4
    with ThreadPoolExecutor(max_workers=len(refs)) as pool:
        runs = list(pool.map(lambda ref: run(client, ref), refs))
    assert [r["outputs"]["value"] for r in runs] == [2, 4] * 4
    assert len({r["content_hash"] for r in runs}) == 2


def test_rerun_uses_the_recorded_spec_after_the_branch_moved(client: Client, repo: Repo) -> None:
    first = run(client, NAME, inputs={})
    repo.commit("second", **{"calc.yaml": calc_spec(NAME, "2 + 2")})
    reload(client)
    assert run(client, NAME)["outputs"] == {"value": 4}
    response = client.post(f"/v1/runs/{first['run_id']}/rerun", json={})
    assert response.status_code == 200, response.text
    again = response.json()
    assert again["outputs"] == {"value": 2} and again["rerun_of"] == first["run_id"]
    for key in ("pipeline", "version", "content_hash", "commit", "ref"):
        assert again[key] == first[key], key
    assert client.post("/v1/runs/no-such-run/rerun", json={}).status_code == 404


def test_polling_follows_new_commits(tmp_path: Path, repo: Repo, demo_engine: Engine) -> None:
    for client in serve(tmp_path, repo, demo_engine, poll_interval_s=0.05):
        new = repo.commit("second", **{"calc.yaml": calc_spec(NAME, "2 + 2")})
        deadline = time.monotonic() + 10
        while client.get("/v1/registry").json()["head"] != new:
            assert time.monotonic() < deadline, "the registry did not follow the commit"
            time.sleep(0.05)
        assert run(client, NAME)["outputs"] == {"value": 4}
        assert client.post("/v1/pipelines:reload").json()["head"] == new


def test_posted_specs_are_committed_with_author_and_message(
    tmp_path: Path, repo: Repo, demo_engine: Engine, database_url: str
) -> None:
    for client in serve(tmp_path, repo, demo_engine, commit_posted=True, database_url=database_url):
        spec = calc_spec(NAME, "6 * 7")
        headers = {"content-type": "application/yaml"}
        refused = client.post("/v1/pipelines", content=spec, headers=headers)
        assert refused.status_code == 400 and "author" in refused.json()["error"]["message"]
        bad = client.post(
            "/v1/pipelines", content=spec, headers=headers, params={"author": "nobody"}
        )
        assert bad.status_code == 400

        params = {"author": "Grace Hopper <grace@example.com>", "message": "answer everything"}
        posted = client.post("/v1/pipelines", content=spec, headers=headers, params=params)
        assert posted.status_code == 201, posted.text
        sha = posted.json()["commit"]
        assert repo.git("rev-parse", "main") == sha
        log = repo.git("log", "-1", "--format=%an <%ae>|%s", sha)
        assert log == "Grace Hopper <grace@example.com>|answer everything"
        assert repo.git("show", f"{sha}:calc.yaml") == spec.rstrip("\n")
        ran = run(client, NAME)
        assert ran["outputs"] == {"value": 42} and ran["commit"] == sha


def test_registry_status_names_the_served_commits(client: Client, repo: Repo) -> None:
    status = client.get("/v1/registry").json()
    assert status["enabled"] and status["branch"] == "main" and status["head"] == repo.head()
    assert status["pipelines"] == {NAME: repo.head()} and status["problems"] == []


def test_no_registry_without_a_repository(tmp_path: Path, demo_engine: Engine) -> None:
    config = ServerConfig(
        database_url=f"sqlite:///{tmp_path / 'compound.db'}", pipelines_dir=str(tmp_path)
    )
    with TestClient(create_app(config, demo_engine)) as client:
        assert client.get("/v1/registry").json() == {
            "enabled": False,
            "branch": None,
            "head": None,
            "checked_at": None,
            "pipelines": {},
            "removed": {},
            "problems": [],
        }
        assert client.post("/v1/pipelines:reload").status_code == 200


@pytest.mark.parametrize("ref", ["-c", "--upload-pack=x", "a..b", "x~1", "x^", "a:b", "@{-1}", ""])
def test_refs_are_checked_before_git_sees_them(ref: str) -> None:
    with pytest.raises(BadRefError):
        check_ref(ref)


@pytest.mark.parametrize("ref", ["main", "v1.2.0", "feature/x", "0123abcd", "release-1_2+b"])
def test_plain_refs_pass(ref: str) -> None:
    assert check_ref(ref) == ref


def test_branch_names_with_slashes_resolve(client: Client, repo: Repo) -> None:
    repo.git("checkout", "-q", "-b", "feature/x")
    repo.commit("feature", **{"calc.yaml": calc_spec(NAME, "8 + 8")})
    repo.git("checkout", "-q", "main")
    assert run(client, NAME, ref="feature/x")["outputs"] == {"value": 16}
    both = client.post(f"/v1/pipelines/{NAME}@main/runs", json={"ref": "feature/x"})
    assert both.status_code == 400


def test_pipelines_of_one_commit_may_call_each_other(client: Client, repo: Repo) -> None:
    caller = (
        "name: caller\nsteps:\n  c:\n    pipeline: {name: callee}\n"
        'outputs:\n  v: "{{ steps.c.output.value }}"\n'
    )
    added = repo.commit(
        "two", **{"callee.yaml": calc_spec("callee", "3 * 3"), "caller.yaml": caller}
    )
    assert reload(client)["pipelines"]["caller"] == added
    assert run(client, "caller")["outputs"] == {"v": 9}

    repo.commit("drop the callee", **{"callee.yaml": None})
    status = reload(client)
    assert status["pipelines"]["caller"] == added  # its call no longer binds: last good stays
    assert [p["name"] for p in status["problems"]] == ["caller"]
    assert "callee" in status["problems"][0]["problems"][0]
    # The last good caller stays whole: it still calls the callee of its own commit.
    kept = run(client, "caller")
    assert kept["outputs"] == {"v": 9} and kept["commit"] == added
    assert [(c["name"], c["commit"]) for c in kept["sub_pipelines"]] == [("callee", added)]
    assert run(client, f"callee@{added[:8]}")["outputs"] == {"value": 9}
    explained = client.post(f"/v1/pipelines/caller@{added[:8]}/explain", json={})
    assert explained.status_code == 200, explained.text  # binds against its own commit
    analyzed = client.get(f"/v1/runs/{kept['run_id']}/explain")
    assert analyzed.status_code == 200, analyzed.text
    assert not_found(client, "callee").endswith(f"deleted from branch main at commit {repo.head()}")


CALLER = (
    "name: caller\nsteps:\n  c:\n    pipeline: {{name: {callee}}}\n"
    'outputs:\n  v: "{{{{ steps.c.output.value }}}}"\n'
)


def test_a_tagged_caller_runs_the_callee_of_its_own_commit(client: Client, repo: Repo) -> None:
    tagged = repo.commit(
        "two",
        **{
            "callee.yaml": calc_spec("callee", "3 * 3"),
            "caller.yaml": CALLER.format(callee="callee"),
        },
    )
    repo.git("tag", "caller-v1")
    repo.commit("callee changes", **{"callee.yaml": calc_spec("callee", "4 * 4")})
    reload(client)
    assert run(client, "caller")["outputs"] == {"v": 16}  # the branch: today's callee
    old = run(client, "caller@caller-v1")
    assert old["outputs"] == {"v": 9} and old["commit"] == tagged
    [call] = old["sub_pipelines"]
    assert (call["ref"], call["name"], call["commit"], call["caller"]) == (
        "callee",
        "callee",
        tagged,
        None,
    )
    assert call["content_hash"] != run(client, "callee")["content_hash"]
    stored = client.get(f"/v1/runs/{old['run_id']}").json()
    assert stored["sub_pipelines"] == old["sub_pipelines"]
    again = client.post(f"/v1/runs/{old['run_id']}/rerun", json={}).json()
    assert again["outputs"] == {"v": 9} and again["sub_pipelines"] == old["sub_pipelines"]


def test_an_explicit_callee_ref_wins_and_nested_calls_stay_in_their_commit(
    client: Client, repo: Repo
) -> None:
    first = repo.commit(
        "callee v1",
        **{"callee.yaml": calc_spec("callee", "3 * 3"), "inner.yaml": calc_spec("inner", "1")},
    )
    repo.git("tag", "callee-v1")
    middle = (
        "name: middle\nsteps:\n  c:\n    pipeline: {name: inner}\n"
        'outputs:\n  value: "{{ steps.c.output.value }}"\n'
    )
    pinned = repo.commit(
        "pinned caller",
        **{
            "callee.yaml": calc_spec("callee", "5 * 5"),
            "inner.yaml": calc_spec("inner", "2"),
            "middle.yaml": middle,
            "caller.yaml": CALLER.format(callee="callee@callee-v1"),
            "outer.yaml": CALLER.format(callee="middle").replace("name: caller", "name: outer"),
        },
    )
    repo.git("tag", "pinned")
    repo.commit("inner changes", **{"inner.yaml": calc_spec("inner", "7")})
    reload(client)
    assert run(client, "caller@pinned")["outputs"] == {"v": 9}  # callee@callee-v1, not 25
    nested = run(client, "outer@pinned")
    assert nested["outputs"] == {"v": 2}  # middle and inner both from `pinned`, not inner 7
    calls = {(c["caller"], c["name"]): c["commit"] for c in nested["sub_pipelines"]}
    assert calls == {(None, "middle"): pinned, ("middle", "inner"): pinned}
    assert run(client, "outer")["outputs"] == {"v": 7}
    assert first != pinned


CHAT = """\
name: ask
chat: {{input: messages, output: answer}}
inputs:
  messages: {{type: array, items: {{type: object}}}}
steps:
  c:
    pipeline: {{name: callee}}
outputs:
  answer: "{{{{ steps.c.output.value }}}} after {{{{ inputs.messages | length }}}}"
"""


def test_a_chat_model_names_a_tag_of_a_git_pipeline(client: Client, repo: Repo) -> None:
    tagged = repo.commit(
        "chat", **{"ask.yaml": CHAT.format(), "callee.yaml": calc_spec("callee", "3 * 3")}
    )
    repo.git("tag", "ask-v1")
    repo.commit("callee changes", **{"callee.yaml": calc_spec("callee", "4 * 4")})
    reload(client)
    messages = [{"role": "user", "content": "how much?"}]
    answers = {}
    for model in ("ask@ask-v1", "ask"):
        response = client.post("/v1/chat/completions", json={"model": model, "messages": messages})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == model
        run_id = response.headers["x-compound-run-id"]
        answers[model] = (
            body["choices"][0]["message"]["content"],
            client.get(f"/v1/runs/{run_id}").json(),
        )
    text, tagged_run = answers["ask@ask-v1"]
    assert text == "9 after 1" and answers["ask"][0] == "16 after 1"
    assert (tagged_run["ref"], tagged_run["commit"]) == ("ask@ask-v1", tagged)
    assert [c["commit"] for c in tagged_run["sub_pipelines"]] == [tagged]
    assert answers["ask"][1]["commit"] == repo.head() and answers["ask"][1]["ref"] == "ask"
    missing = client.post(
        "/v1/chat/completions", json={"model": "ask@no-such-tag", "messages": messages}
    )
    assert missing.status_code == 404, missing.text


CALLS_CALLEE = (
    "name: caller\nsteps:\n  c:\n    pipeline: {name: callee}\n"
    'outputs:\n  v: "{{ steps.c.output.value }}"\n'
)


def post_calc(client: Client, i: int) -> Any:
    """POST (and commit) a calc pipeline `posted-<i>` computing `i * 2`."""
    return client.post(
        "/v1/pipelines",
        content=calc_spec(f"posted-{i}", f"{i} * 2"),
        headers={"content-type": "application/yaml"},
        params={"author": AUTHOR, "message": f"post {i}"},
    )


def test_concurrent_posts_all_land_in_the_history(
    tmp_path: Path, repo: Repo, demo_engine: Engine
) -> None:
    for client in serve(tmp_path, repo, demo_engine, commit_posted=True):
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(partial(post_calc, client), range(8)))
        assert [a.status_code for a in answers] == [201] * 8, [a.text for a in answers]
        files = set(repo.git("ls-tree", "--name-only", "main").split())
        assert files == {"calc.yaml"} | {f"posted-{i}.yaml" for i in range(8)}
        assert len(repo.git("rev-list", "main").split()) == 9  # one commit per post
        assert not list(Path(repo.path / ".git").glob("compound-index-*"))  # scratch removed
        assert run(client, "posted-7")["outputs"] == {"value": 14}


def test_only_tags_branches_and_published_commits_resolve(client: Client, repo: Repo) -> None:
    hidden = repo.commit("not published", **{"calc.yaml": calc_spec(NAME, "666")})
    repo.git("reset", "-q", "--hard", "HEAD~1")  # ORIG_HEAD and the reflog still hold it
    repo.git("update-ref", "refs/remotes/origin/evil", hidden)
    repo.git("notes", "add", "-m", "a note", "HEAD")
    (repo.path / "calc.yaml").write_text(calc_spec(NAME, "667"))
    repo.git("stash", "-q")
    labels = ["stash", "refs/stash", "HEAD", "ORIG_HEAD", "origin/evil", "refs/notes/commits"]
    for label in [*labels, "remotes/origin/evil", hidden, hidden[:10]]:
        response = client.post(f"/v1/pipelines/{NAME}/runs", json={"ref": label})
        assert response.status_code == 404, (label, response.text)
        assert f"{NAME}@{label}" in response.json()["error"]["message"], label
    assert "not in the history of branch main" in not_found(client, f"{NAME}@{hidden}")

    # A side branch is published by name; a caller there calls the callee of its own commit.
    repo.git("checkout", "-q", "-b", "side")
    side = repo.commit(
        "side", **{"callee.yaml": calc_spec("callee", "5 * 5"), "caller.yaml": CALLS_CALLEE}
    )
    repo.git("checkout", "-q", "main")
    ran = run(client, "caller@side")
    assert ran["outputs"] == {"v": 25} and ran["commit"] == side
    main = repo.head()
    assert run(client, f"{NAME}@{main[:8]}")["outputs"] == {"value": 2}


def test_a_spec_that_does_not_load_keeps_its_name_and_last_good_version(
    client: Client, repo: Repo
) -> None:
    breakages = {
        "yaml typo": calc_spec(NAME, "2") + "  bad: [\n",
        "unknown field": calc_spec(NAME, "3") + "extra_field: 1\n",
    }
    for message, text in breakages.items():
        bad = repo.commit(message, **{"calc.yaml": text})
        status = reload(client)
        assert status["removed"] == {} and NAME in status["pipelines"], message
        problems = {p["path"]: p for p in status["problems"]}
        assert problems["calc.yaml"]["name"] == NAME and problems["calc.yaml"]["commit"] == bad
        assert run(client, NAME)["outputs"] == {"value": 2}, message
    repo.commit("fix", **{"calc.yaml": calc_spec(NAME, "4 + 4")})
    assert reload(client)["problems"] == []
    assert run(client, NAME)["outputs"] == {"value": 8}


def test_a_refresh_never_scans_an_older_head_over_a_newer_one(client: Client, repo: Repo) -> None:
    registry = client.app.state.pipelines.registry
    resolved, release = threading.Event(), threading.Event()
    real = registry.repo.resolve

    def slow(ref: str) -> str:
        sha = real(ref)
        if threading.current_thread().name == "slow-poll":
            resolved.set()
            release.wait(10)
        return sha

    registry.repo.resolve = slow
    old = repo.commit("old", **{"calc.yaml": calc_spec(NAME, "2 + 3")})
    poll = threading.Thread(target=registry.refresh, name="slow-poll")
    poll.start()
    assert resolved.wait(10)  # the slow poll has read `old` as the head
    new = repo.commit("new", **{"calc.yaml": calc_spec(NAME, "3 + 3")})
    fast = threading.Thread(target=registry.refresh)
    fast.start()
    fast.join(0.5)  # reading the head outside the lock, it would scan `new` now...
    release.set()  # ...and the slow poll would then scan `old` over it
    poll.join(10)
    fast.join(10)
    assert old != new and registry.status().head == new
    assert run(client, NAME)["outputs"] == {"value": 6}


def test_a_caller_keeps_its_last_good_version_while_its_callee_is_broken(
    client: Client, repo: Repo
) -> None:
    good = repo.commit(
        "two", **{"callee.yaml": calc_spec("callee", "3 * 3"), "caller.yaml": CALLS_CALLEE}
    )
    reload(client)
    assert run(client, "caller")["outputs"] == {"v": 9}
    bad = calc_spec("callee", "4").replace("tools: [calc]", "tools: [no.such.tool]")
    repo.commit("break callee", **{"callee.yaml": bad})
    status = reload(client)
    assert status["pipelines"]["caller"] == good and status["pipelines"]["callee"] == good
    problems = {p["path"]: p["problems"] for p in status["problems"]}
    assert any("no.such.tool" in m for m in problems["callee.yaml"])
    assert any("callee" in m and "does not validate" in m for m in problems["caller.yaml"])
    assert run(client, "caller")["outputs"] == {"v": 9}  # the caller and callee of `good`
    fixed = repo.commit("fix callee", **{"callee.yaml": calc_spec("callee", "5 * 5")})
    status = reload(client)
    assert status["pipelines"] == {
        NAME: status["pipelines"][NAME],
        "callee": fixed,
        "caller": fixed,
    }
    assert run(client, "caller")["outputs"] == {"v": 25}


def test_history_paths_are_literal_not_globs(repo: Repo) -> None:
    star = repo.commit("star", **{"a*.yaml": calc_spec("star", "1")})
    other = repo.commit("other", **{"ab.yaml": calc_spec("ab", "2")})
    git = GitRepo(repo.path)
    assert git.history("main", "a?.yaml") == []  # as a glob it would match both files
    starred = [c.commit for c in git.history("main", "a*.yaml")]
    assert starred[0] == star and other not in starred


def test_a_ref_too_long_to_record_is_refused_with_a_4xx(client: Client) -> None:
    ref = f"{'n' * 64}@{'v' * 200}"  # a valid name and a valid ref: 265 characters
    for response in (
        client.post(f"/v1/pipelines/{ref}/runs", json={"inputs": {}}),
        client.post(f"/v1/pipelines/{NAME}@{'v' * 200}{'w' * 60}/runs", json={"inputs": {}}),
    ):
        assert response.status_code == 404, response.text
        assert "at most 256 characters" in response.json()["error"]["message"]


def test_caches_keep_only_the_most_recently_used() -> None:
    cache: Lru[str, int] = Lru(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # `a` is now the most recent
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, None, 3, 2)
