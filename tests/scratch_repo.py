"""A throwaway git repository holding this project's working tree, for tests and the detector
that need real commits (``bench compare --confirm`` re-runs each side from its own commit)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IDENTITY = ["-c", "user.name=attention-bench", "-c", "user.email=bench@localhost", "-c", "commit.gpgsign=false"]


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *IDENTITY, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def project_files(root: Path = ROOT) -> list[str]:
    """The project's files as they are now: tracked and untracked, not ignored, not results."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"],
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and not f.startswith("results/") and (root / f).is_file()]


def make_scratch_repo(dest: Path, root: Path = ROOT) -> Path:
    """``dest``: a new git repository with one commit holding the project's working tree."""
    dest.mkdir(parents=True)
    for f in project_files(root):
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, dest / f)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "the project as it is")
    return dest


def commit_change(repo: Path, path: str, pattern: str, replacement: str, message: str) -> str:
    """Replace ``pattern`` (a regex, exactly once) in ``path``, commit, and return the new commit."""
    file = repo / path
    text, n = re.subn(pattern, replacement, file.read_text(), count=1, flags=re.M)
    if n != 1:
        raise RuntimeError(f"{path}: {pattern!r} not found")
    file.write_text(text)
    git(repo, "commit", "-q", "-am", message)
    return git(repo, "rev-parse", "HEAD")
