"""Glyph rendering from Debian font packages (class = character, instance =
font). Pinned package lists, package checks and installation, face
selection (one face per family, no mostly-blank faces, no near-duplicate
faces) and rendering. Needs Pillow and fontTools
(``pip install tfdml[glyphs]``).

These are typefaces, not photos or handwriting.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from collections.abc import Sequence

import numpy as np

# Every CJK / Hangul package of the "full" sets (Debian bookworm names).
CJK_PACKAGES = (
    "fonts-noto-cjk fonts-arphic-ukai fonts-arphic-uming "
    "fonts-arphic-bkai00mp fonts-arphic-bsmi00lp fonts-arphic-gbsn00lp "
    "fonts-arphic-gkai00mp fonts-wqy-zenhei fonts-wqy-microhei "
    "fonts-droid-fallback fonts-ipafont-gothic fonts-ipafont-mincho "
    "fonts-ipaexfont-gothic fonts-ipaexfont-mincho fonts-vlgothic "
    "fonts-sawarabi-gothic fonts-sawarabi-mincho fonts-horai-umefont "
    "fonts-komatuna fonts-konatu fonts-mona fonts-motoya-l-cedar "
    "fonts-motoya-l-maruberi fonts-seto fonts-yozvox-yozfont fonts-klee "
    "fonts-morisawa-bizud-gothic fonts-morisawa-bizud-mincho fonts-kiloji "
    "fonts-aoyagi-kouzan-t fonts-aoyagi-soseki fonts-kouzan-mouhitsu "
    "fonts-lxgw-wenkai fonts-cwtex-fs fonts-cwtex-heib fonts-cwtex-kai "
    "fonts-cwtex-ming fonts-cwtex-yen fonts-babelstone-han "
    "fonts-smiley-sans fonts-dejima-mincho fonts-oradano-mincho-gsrr "
    "fonts-mplus fonts-dotgothic16 fonts-misaki fonts-yusei-magic "
    "fonts-unfonts-core fonts-baekmuk fonts-nanum fonts-nanum-extra "
    "fonts-lexi-gulim fonts-lexi-saebom fonts-woowa-bm fonts-unfonts-extra"
).split()

# Small packages (about 36 MB of .debs in all), chosen by `apt-cache show`
# size; 17 distinct CJK faces survive the de-duplication.
SMALL_CJK_PACKAGES = (
    "fonts-sawarabi-gothic fonts-sawarabi-mincho fonts-motoya-l-cedar "
    "fonts-motoya-l-maruberi fonts-aoyagi-kouzan-t fonts-smiley-sans "
    "fonts-mona fonts-komatuna fonts-droid-fallback fonts-arphic-gbsn00lp "
    "fonts-arphic-gkai00mp fonts-dejima-mincho fonts-vlgothic fonts-misaki "
    "fonts-baekmuk"
).split()

# Hangul: the small set's Korean-capable faces plus two tiny packages.
SMALL_HANGUL_PACKAGES = (
    "fonts-droid-fallback fonts-baekmuk fonts-lexi-gulim fonts-lexi-saebom"
).split()

# Tests: three faces, a few dozen classes.
TINY_CJK_PACKAGES = (
    "fonts-sawarabi-gothic fonts-sawarabi-mincho fonts-motoya-l-maruberi"
).split()

ALL_PACKAGES = sorted(set(CJK_PACKAGES) | {"dataset-fashion-mnist"})

CJK_RANGE = (0x4E00, 0xA000)  # CJK Unified Ideographs
HANGUL_RANGE = (0xAC00, 0xD7A4)  # Hangul syllables

# Proportional-width variants (IPA PGothic, VL PGothic, Komatuna P, ...)
# draw the same ideographs as their fixed-width family: never kept.
PROPORTIONAL = re.compile(r"(^|\s|IPA)P(Gothic|Mincho)\b|\sP$")

PREFERRED_STYLES = ("regular", "book", "medium", "normal", "w3", "w4", "r", "")


class MissingPackagesError(RuntimeError):
    """Debian packages are missing and cannot be installed here."""

    def __init__(self, packages: Iterable[str]) -> None:
        self.packages = list(packages)
        super().__init__(
            "missing Debian package(s): "
            + " ".join(self.packages)
            + ". Install them as root with: apt-get update && "
            "DEBIAN_FRONTEND=noninteractive apt-get install -y "
            "--no-install-recommends "
            + " ".join(self.packages)
            + " (or run tools/install_fonts.sh)"
        )


def installed_packages(packages: Sequence[str]) -> set[str]:
    """The subset of ``packages`` that dpkg reports as installed."""
    if shutil.which("dpkg-query") is None:
        return set()
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${Status}\\n", *packages],
        capture_output=True,
        text=True,
    ).stdout
    return {
        line.split()[0]
        for line in out.splitlines()
        if line.strip().endswith("install ok installed")
    }


def missing_packages(packages: Sequence[str]) -> list[str]:
    have = installed_packages(packages)
    return [p for p in packages if p not in have]


def ensure_packages(packages: Sequence[str], install: bool = True) -> list[str]:
    """Installs missing packages with apt-get when root; else raises.

    Raises:
      MissingPackagesError: naming the packages still missing.
    """
    missing = missing_packages(packages)
    if not missing:
        return []
    can = (
        install
        and hasattr(os, "geteuid")
        and os.geteuid() == 0
        and shutil.which("apt-get") is not None
    )
    if not can:
        raise MissingPackagesError(missing)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
    res = subprocess.run([*cmd, *missing], env=env, capture_output=True)
    if res.returncode != 0:
        subprocess.run(
            ["apt-get", "update", "-q"], env=env, capture_output=True
        )
        subprocess.run([*cmd, *missing], env=env, capture_output=True)
    still = missing_packages(missing)
    if still:
        raise MissingPackagesError(still)
    return missing


def fonts_of_packages(packages):
    """Font files (ttf/otf/ttc/otc) installed by the packages (dpkg -L)."""
    out = subprocess.run(
        ["dpkg", "-L", *packages], capture_output=True, text=True
    ).stdout.split()
    return sorted(
        {p for p in out if re.search(r"\.(ttf|otf|ttc|otc)$", p, re.I)}
    )


def list_faces(paths):
    """``(path, face_index, family, style, codepoints)`` of each face."""
    import logging

    from fontTools.ttLib import TTCollection
    from fontTools.ttLib import TTFont

    logging.getLogger("fontTools").setLevel(logging.ERROR)
    faces = []
    for p in paths:
        try:
            if p.lower().endswith((".ttc", ".otc")):
                fonts = TTCollection(p, lazy=True).fonts
            else:
                fonts = [TTFont(p, lazy=True)]
        except Exception:  # noqa: BLE001 - unreadable file: skip it
            continue
        for i, f in enumerate(fonts):
            try:
                name = f["name"]
                fam = (
                    name.getDebugName(16)
                    or name.getDebugName(1)
                    or os.path.basename(p)
                ).strip()
                sty = name.getDebugName(17) or name.getDebugName(2) or ""
                cmap = f.getBestCmap() or {}
            except Exception:  # noqa: BLE001
                continue
            faces.append((p, i, fam, sty.strip(), frozenset(cmap)))
    return faces


def render(font, ch, size):
    """Ink box of ``ch`` fitted to ``size - 4`` px, centred, white on black.

    Returns uint8 ``[size, size]``, or ``None`` if the font fails.
    """
    from PIL import Image
    from PIL import ImageDraw

    canvas = Image.new("L", (size, size), 0)
    try:
        left, top, right, bottom = font.getbbox(ch)
        w, h = right - left, bottom - top
        if w <= 0 or h <= 0:
            return np.asarray(canvas)
        img = Image.new("L", (w, h), 0)
        ImageDraw.Draw(img).text((-left, -top), ch, font=font, fill=255)
    except OSError:  # e.g. broken hinting bytecode
        return None
    s = (size - 4) / max(w, h)
    img = img.resize(
        (max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS
    )
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return np.asarray(canvas)


def select_faces(
    font_paths,
    codepoints,
    min_font_coverage,
    dedup_thresh=11.0,
    dedup_probe=150,
    render_pt=56,
    seed=0,
    log=None,
):
    """Faces to use: coverage, one per family, not blank, not duplicates.

    Returns a list of ``(face_tuple, PIL font)`` sorted by family/style.
    """
    from PIL import ImageFont

    cps = set(codepoints)
    need = (
        min_font_coverage
        if isinstance(min_font_coverage, int)
        else min_font_coverage * len(cps)
    )
    faces = [
        f
        for f in list_faces(font_paths)
        if len(f[4] & cps) >= need and not PROPORTIONAL.search(f[2])
    ]
    best = {}
    for f in faces:
        rank = next(
            (k for k, s in enumerate(PREFERRED_STYLES) if f[3].lower() == s),
            len(PREFERRED_STYLES),
        )
        key = f[2].lower()
        if key not in best or (rank, f[0], f[1]) < best[key][0]:
            best[key] = ((rank, f[0], f[1]), f)
    faces = sorted((v[1] for v in best.values()), key=lambda f: (f[2], f[3]))
    if not faces:
        return []
    rng = np.random.default_rng(seed)
    common = sorted(
        c for c in cps if sum(c in f[4] for f in faces) >= 0.5 * len(faces)
    )
    probe = rng.choice(common, min(dedup_probe, len(common)), replace=False)
    kept, probes = [], []
    for f in faces:
        font = ImageFont.truetype(f[0], render_pt, index=f[1])
        pr = [render(font, chr(c), 32) if c in f[4] else None for c in probe]
        ok = np.array([p is not None and p.max() > 0 for p in pr])
        if ok.mean() < 0.3:  # maps most code points to blank glyphs
            if log:
                log(f"drop mostly-blank face: {f[2]} {f[3]}")
            continue
        pr = np.stack(
            [p if o else np.zeros((32, 32), np.uint8) for p, o in zip(pr, ok)]
        ).astype(np.float32)
        d = [
            np.abs(pr[ok & o2] - q[ok & o2]).mean()
            if (ok & o2).sum() >= 20
            else 1e9
            for q, o2 in probes
        ]
        if d and min(d) < dedup_thresh:
            if log:
                log(f"drop near-duplicate face: {f[2]} {f[3]}")
            continue
        kept.append((f, font))
        probes.append((pr, ok))
    return kept


def render_glyph_set(
    font_paths,
    codepoints,
    min_font_coverage=3000,
    min_fonts_per_char=0.9,
    size=64,
    max_classes=None,
    seed=0,
    log=None,
):
    """Renders the character x font set.

    Returns:
      dict with ``images`` uint8 ``[N, size, size]``, ``labels`` ``[N]``,
      ``font_ids`` ``[N]``, ``chars`` (class -> character), ``fonts``
      (font id -> name). Empty glyphs are never kept.
    """
    kept = select_faces(
        font_paths, codepoints, min_font_coverage, seed=seed, log=log
    )
    if not kept:
        raise ValueError(
            "no font face covers enough code points "
            f"(min_font_coverage={min_font_coverage}) among "
            f"{len(font_paths)} font files"
        )
    cps = sorted(set(codepoints))
    need = (
        min_fonts_per_char
        if isinstance(min_fonts_per_char, int)
        else int(np.ceil(min_fonts_per_char * len(kept)))
    )
    need = max(need, 1)
    cand = [c for c in cps if sum(c in f[4] for f, _ in kept) >= need]
    rng = np.random.default_rng(seed)
    if max_classes and len(cand) > max_classes:
        cand = rng.permutation(cand).tolist()
    images, labels, font_ids, chars = [], [], [], []
    for c in cand:
        if max_classes and len(chars) >= max_classes:
            break
        imgs = []
        for k, (f, font) in enumerate(kept):
            if c in f[4]:
                g = render(font, chr(c), size)
                if g is not None and g.max() > 0:
                    imgs.append((g, k))
        if len(imgs) >= need:
            images += [g for g, _ in imgs]
            font_ids += [k for _, k in imgs]
            labels += [len(chars)] * len(imgs)
            chars.append(chr(c))
    if not chars:
        raise ValueError("no character is drawn by enough faces")
    return {
        "images": np.stack(images).astype(np.uint8),
        "labels": np.asarray(labels, np.int64),
        "font_ids": np.asarray(font_ids, np.int64),
        "chars": chars,
        "fonts": [f"{f[2]} {f[3]}".strip() for f, _ in kept],
    }
