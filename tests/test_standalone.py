"""The repository stands alone (issue 25): a fresh clone passes `make test` with nothing beside it.

No tracked file outside bench/results (historical records, left as written) may name the folder that once sat
beside the repository, and every `bench/data/*.jsonl` that a script, test or document names must be in the clone.
.ci/run makes the first check too, before the tests.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BESIDE = "../" + "shared"  # in pieces, so that this file does not name it
OUTSIDE_RECORDS = (".", ":!bench/results")


def git(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def checkout() -> Path:
    """The repository root when it is a git checkout of its own (not an export, not a folder of another one)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    top = git("rev-parse", "--show-toplevel")
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != REPO:
        pytest.skip("not a git checkout of the repository")
    return REPO


def test_no_tracked_file_outside_bench_results_names_the_folder_beside_the_repository(checkout):
    found = git("grep", "-n", "-F", BESIDE, "--", *OUTSIDE_RECORDS)
    assert found.returncode in (0, 1), found.stderr  # 1: no match
    assert found.stdout == "", f"tracked files name {BESIDE}, which a clone does not have:\n{found.stdout}"


def test_every_data_file_named_outside_bench_results_is_in_the_repository(checkout):
    found = git("grep", "-h", "-o", "-E", r"bench/data/[A-Za-z0-9_.-]+\.jsonl", "--", *OUTSIDE_RECORDS)
    assert found.returncode in (0, 1), found.stderr
    named = set(found.stdout.split())
    assert named, "no bench/data file is named anywhere: the pattern has gone stale"
    tracked = set(git("ls-files", "bench/data").stdout.split())
    assert sorted(named - tracked) == []
    assert all(re.fullmatch(r"bench/data/\S+", name) and (REPO / name).is_file() for name in named)
