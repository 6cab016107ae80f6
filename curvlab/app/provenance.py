"""Which code made a result: the git commit of the checkout a benchmark or analysis ran from."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


#: Folders of results, not code: a change there (the results a study has just written) is not dirty
OUTPUTS = ("analyses/results", "benchmarks/results", "figures")


def git_commit(checkout: Path) -> str | None:
    """The commit of ``checkout`` (``+dirty`` with uncommitted changes to tracked files outside
    :data:`OUTPUTS`);
    ``CURVLAB_GIT_COMMIT`` where the tree travelled without ``.git`` (a copy run on another
    machine); ``None`` outside a git checkout."""
    if os.environ.get("CURVLAB_GIT_COMMIT"):
        return os.environ["CURVLAB_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *(f":(exclude){path}" for path in OUTPUTS)],
                               cwd=checkout, capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None
