"""The ``needs_fonts`` marker (tests/conftest.py): a test skips exactly
when its Debian packages are missing, naming them and the fix."""

import pytest

from tests import conftest
from tfdml.data.builders import fonts as fonts_lib


class _Item:
    """What ``pytest_runtest_setup`` reads of a test item."""

    def __init__(self, *marks):
        self.marks = [m.mark for m in marks]

    def iter_markers(self, name):
        return [m for m in self.marks if m.name == name]


def _pretend_missing(monkeypatch, missing):
    monkeypatch.setattr(
        fonts_lib,
        "missing_packages",
        lambda packages: [p for p in packages if p in missing],
    )


def test_reason_names_only_the_missing_packages(monkeypatch):
    _pretend_missing(monkeypatch, {"fonts-b"})
    assert conftest.fonts_skip_reason(["fonts-a", "fonts-b"]) == (
        "font packages missing: fonts-b; "
        "run bash tools/install_fonts.sh (as root)"
    )
    assert conftest.fonts_skip_reason(["fonts-a"]) is None


def test_default_is_the_tiny_cjk_set(monkeypatch):
    _pretend_missing(monkeypatch, set(fonts_lib.TINY_CJK_PACKAGES))
    reason = conftest.fonts_skip_reason()
    assert reason.split(";")[0].split(": ")[1].split() == list(
        fonts_lib.TINY_CJK_PACKAGES
    )


def test_real_lookup_names_an_absent_package():
    reason = conftest.fonts_skip_reason(["fonts-tfdml-no-such-package"])
    assert "fonts-tfdml-no-such-package" in reason


def test_marker_skips_only_when_missing(monkeypatch):
    item = _Item(pytest.mark.needs_fonts(["fonts-b"]))
    _pretend_missing(monkeypatch, {"fonts-b"})
    with pytest.raises(pytest.skip.Exception, match="missing: fonts-b;"):
        conftest.pytest_runtest_setup(item)
    _pretend_missing(monkeypatch, set())
    conftest.pytest_runtest_setup(item)  # installed: the test runs
    bare = _Item(pytest.mark.needs_fonts)
    _pretend_missing(monkeypatch, {fonts_lib.TINY_CJK_PACKAGES[0]})
    with pytest.raises(pytest.skip.Exception):
        conftest.pytest_runtest_setup(bare)

    def no_lookup(packages):
        raise AssertionError("unmarked tests never look packages up")

    monkeypatch.setattr(fonts_lib, "missing_packages", no_lookup)
    conftest.pytest_runtest_setup(_Item(pytest.mark.slow))
