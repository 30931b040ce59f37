"""Offline TFDS builders on a tiny font subset (3 faces, 24 classes)."""

import gzip
import os
import subprocess

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfdml import data
from tfdml.data.builders import fonts as fonts_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))

# What tools/install_fonts.sh installs (without --full).
SCRIPT_PACKAGES = sorted(
    set(fonts_lib.SMALL_CJK_PACKAGES)
    | set(fonts_lib.SMALL_HANGUL_PACKAGES)
    | set(fonts_lib.TINY_CJK_PACKAGES)
    | {"dataset-fashion-mnist"}
)


def _examples(data_dir, name="cjk_glyphs/tiny"):
    ds = tfds.load(name, data_dir=data_dir, split="train")
    rows = sorted(
        (
            (int(e["label"]), int(e["font_id"])),
            e["image"].numpy(),
            e["character"].numpy().decode(),
            int(e["codepoint"]),
            e["font_name"].numpy().decode(),
        )
        for e in ds
    )
    return rows


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("glyphs"))
    assert data.build_cjk_glyphs(d, tiny=True) == "cjk_glyphs/tiny"
    return d


@pytest.mark.needs_fonts
def test_tiny_counts_features_no_empty(tiny_dir):
    rows = _examples(tiny_dir)
    builder = tfds.builder("cjk_glyphs/tiny", data_dir=tiny_dir)
    names = builder.info.features["label"].names
    assert len(names) == 24 and len(set(names)) == 24
    assert len(rows) == 24 * 3  # every class drawn by all 3 faces
    labels = np.array([r[0][0] for r in rows])
    assert np.all(np.bincount(labels) == 3)
    fonts = {r[4] for r in rows}
    assert fonts == {
        "MotoyaLMaru W3 mono",
        "Sawarabi Gothic Medium",
        "Sawarabi Mincho Medium",
    }
    for (label, font_id), image, char, cp, _ in rows:
        assert image.shape == (32, 32, 1) and image.dtype == np.uint8
        assert image.max() > 0  # no empty glyphs
        assert (image > 0).mean() < 0.9  # not a filled box either
        assert char == names[label] and ord(char) == cp
        assert 0x4E00 <= cp < 0xA000
    # the same character in different fonts differs (distinct designs)
    by_class = {}
    for (label, _), image, *_ in rows:
        by_class.setdefault(label, []).append(image.astype(float))
    diffs = [np.abs(v[0] - v[1]).mean() for v in by_class.values()]
    assert np.mean(diffs) > 5.0


@pytest.mark.needs_fonts
def test_build_twice_is_identical(tiny_dir, tmp_path):
    again = str(tmp_path)
    data.build_cjk_glyphs(again, tiny=True)
    a, b = _examples(tiny_dir), _examples(again)
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra[0] == rb[0] and ra[2:] == rb[2:]
        np.testing.assert_array_equal(ra[1], rb[1])


@pytest.mark.needs_fonts
def test_glyph_source_and_sampler(tiny_dir):
    src = data.source_from_config(
        {"source": "cjk_glyphs", "config": "tiny", "data_dir": tiny_dir}
    )
    assert len(src) == 72 and len(src.classes) == 24
    assert src.class_names is not None and len(src.class_names) == 24
    s = data.split_classes(src.labels, val_classes=2, seed=0)
    ds = data.balanced_dataset(src, s["train"], 5, 3, 16, 1, seed=0)
    for x, y in ds.take(3):
        assert x.shape == (15, 16, 16, 1)
        assert set(y.numpy().tolist()) <= set(s["train"].tolist())


@pytest.mark.needs_fonts(
    [
        "fonts-sawarabi-gothic",
        "fonts-komatuna",
        "fonts-misaki",
        "fonts-baekmuk",
    ]
)
def test_near_duplicate_blank_and_proportional_faces_are_dropped():
    root = "/usr/share/fonts/truetype"
    sawarabi = f"{root}/sawarabi-gothic/sawarabi-gothic-medium.ttf"
    komatuna = f"{root}/komatuna/komatuna.ttf"
    komatuna_p = f"{root}/komatuna/komatuna-p.ttf"  # proportional variant
    misaki = f"{root}/misaki/misaki_gothic.ttf"
    misaki_mincho = f"{root}/misaki/misaki_mincho.ttf"  # same kanji
    headline = f"{root}/baekmuk/hline.ttf"  # maps hanja to blank glyphs
    paths = [sawarabi, komatuna, komatuna_p, misaki, misaki_mincho, headline]
    faces = fonts_lib.list_faces(paths)
    assert len(faces) == 6  # all of them cover the CJK range
    logged = []
    kept = fonts_lib.select_faces(
        paths,
        range(*fonts_lib.CJK_RANGE),
        min_font_coverage=3000,
        dedup_probe=60,
        log=logged.append,
    )
    families = sorted(f[2] for f, _ in kept)
    assert families == ["Komatuna", "MisakiGothic", "Sawarabi Gothic"]
    assert any("near-duplicate" in m and "MisakiMincho" in m for m in logged)
    assert any("mostly-blank" in m and "Headline" in m for m in logged)


@pytest.mark.needs_fonts(["fonts-sawarabi-gothic"])
def test_missing_packages_are_named():
    with pytest.raises(fonts_lib.MissingPackagesError) as err:
        fonts_lib.ensure_packages(
            ["fonts-sawarabi-gothic", "fonts-tfdml-no-such-package"],
            install=False,
        )
    assert err.value.packages == ["fonts-tfdml-no-such-package"]
    assert "fonts-tfdml-no-such-package" in str(err.value)
    assert "sawarabi" not in str(err.value)
    assert fonts_lib.ensure_packages(["fonts-sawarabi-gothic"]) == []


def test_install_script_lists_match_the_module():
    script = os.path.join(REPO, "tools", "install_fonts.sh")
    out = subprocess.run(
        ["bash", script, "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert set(out) == set(SCRIPT_PACKAGES)
    text = open(script).read()
    full = text.split('FULL_PACKAGES="')[1].split('"')[0].split()
    assert full == fonts_lib.CJK_PACKAGES


@pytest.mark.needs_fonts(SCRIPT_PACKAGES)
def test_install_script_succeeds_when_installed():
    script = os.path.join(REPO, "tools", "install_fonts.sh")
    rc = subprocess.run(["bash", script], capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_builder_reads_idx_files(tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    rng = np.random.default_rng(0)
    xs = {"train": rng.integers(0, 256, (7, 28, 28)), "t10k": None}
    xs["t10k"] = rng.integers(0, 256, (3, 28, 28))
    ys = {"train": np.arange(7) % 10, "t10k": np.array([9, 0, 4])}
    for prefix in ("train", "t10k"):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", xs[prefix])
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", ys[prefix])
    np.testing.assert_array_equal(
        data.builders.glyphs.read_idx(str(root / "t10k-labels-idx1-ubyte.gz")),
        ys["t10k"],
    )
    builder = tfds.builder(
        "fashion_mnist_deb", data_dir=str(tmp_path / "tfds"), root=str(root)
    )
    builder.download_and_prepare()
    assert builder.info.splits["train"].num_examples == 7
    assert builder.info.splits["test"].num_examples == 3
    assert builder.info.features["label"].names[9] == "Ankle boot"
    got = sorted(
        (int(e["label"]), e["image"].numpy().tobytes())
        for e in builder.as_dataset(split="test")
    )
    want = sorted(
        (int(y), x.astype(np.uint8)[:, :, None].tobytes())
        for x, y in zip(xs["t10k"], ys["t10k"])
    )
    assert got == want
