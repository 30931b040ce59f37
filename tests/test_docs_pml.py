"""docs/coming_from_pml.md cannot rot: every tfdml name it gives exists, and
every Python block on the page runs."""

import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "coming_from_pml.md")

#: Named on the page ("being added") while other work adds them (issue 16):
#: allowed to be missing. Remove a name here (and "being added" on the page)
#: once the class exists.
PLANNED = set()  # names the page may list before they exist (none now)


def _text():
    with open(PAGE, encoding="utf-8") as f:
        return f.read()


def _names(text):
    """Every ``tfdml.a.B`` inside backticks (call arguments stripped)."""
    spans = re.findall(r"`([^`]*)`", text)
    return sorted(
        {m for s in spans for m in re.findall(r"\btfdml(?:\.\w+)+", s)}
    )


def _resolve(name):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def test_every_tfdml_name_on_the_page_exists():
    names = _names(_text())
    assert len(names) > 20, names  # the table is there
    missing = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert set(missing) <= PLANNED, sorted(set(missing) - PLANNED)


def test_planned_names_are_on_the_page():
    assert PLANNED <= set(_names(_text()))


def test_the_checker_catches_a_missing_name():
    text = "| `ContrastiveLoss` | `tfdml.losses.NoSuchLoss(margin=1)` |"
    (name,) = _names(text)
    assert name == "tfdml.losses.NoSuchLoss"
    with pytest.raises(AttributeError):
        _resolve(name)


def test_pml_classes_of_the_brief_are_mapped():
    text = _text()
    for pml in (
        "ContrastiveLoss",
        "TripletMarginLoss",
        "MultiSimilarityLoss",
        "SupConLoss",
        "NTXentLoss",
        "BatchHardMiner",
        "AvgNonZeroReducer",
        "MeanReducer",
        "CrossBatchMemory",
        "AccuracyCalculator",
        "MPerClassSampler",
    ):
        assert re.search(rf"^\| `{pml}", text, re.M), pml


def test_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", _text(), re.S)
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, PAGE, "exec"), {"__name__": "docs_block"})


def test_linked_from_index_and_readme():
    for path in ("docs/index.md", "README.md"):
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            assert "coming_from_pml.md" in f.read(), path
