"""A temporary git repository of pipeline specs, driven through the git CLI like a user would."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

AUTHOR = "Ada Lovelace <ada@example.com>"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Ada Lovelace",
    "GIT_AUTHOR_EMAIL": "ada@example.com",
    "GIT_COMMITTER_NAME": "Ada Lovelace",
    "GIT_COMMITTER_EMAIL": "ada@example.com",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}

# A tool-only pipeline: runs in milliseconds and its output says which version ran.
CALC = """\
name: {name}
tools: [calc]
steps:
  value:
    tool: calc
    args: {{expression: "{expression}"}}
outputs:
  value: "{{{{ steps.value.output }}}}"
"""


def calc_spec(name: str, expression: str) -> str:
    """A spec whose single output is the value of `expression`."""
    return CALC.format(name=name, expression=expression)


class Repo:
    """A git repository in a temporary folder, on branch `main`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")

    def git(self, *args: str) -> str:
        """Run git here; its stdout."""
        done = subprocess.run(
            ["git", *args],
            cwd=self.path,
            env={**os.environ, **GIT_ENV},
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    def commit(self, message: str, **files: str | None) -> str:
        """Write (or, with None, delete) files, commit them all; the new commit's sha."""
        for name, text in files.items():
            path = self.path / name
            if text is None:
                self.git("rm", "-q", name)
            else:
                path.write_text(text)
                self.git("add", name)
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.head()

    def head(self) -> str:
        """The sha of HEAD."""
        return self.git("rev-parse", "HEAD")
