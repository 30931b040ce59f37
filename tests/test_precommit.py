"""``.pre-commit-config.yaml`` runs the ruff that requirements.txt pins."""

import os
import re

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_precommit_ruff_matches_the_pinned_ruff():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        (pin,) = re.findall(r"^ruff==(\S+)", f.read(), re.M)
    with open(os.path.join(ROOT, ".pre-commit-config.yaml")) as f:
        (repo,) = yaml.safe_load(f)["repos"]
    assert repo["repo"] == "https://github.com/astral-sh/ruff-pre-commit"
    assert repo["rev"] == f"v{pin}"
    assert [h["id"] for h in repo["hooks"]] == ["ruff-check", "ruff-format"]
