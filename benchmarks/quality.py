"""Retrieval-quality benchmark: every method, same backbone, budget, seeds.

Usage::

  python benchmarks/quality.py --dataset cjk_glyphs/small --methods all \\
      --seeds 3 --steps 300 --out benchmarks/results

  # only re-write the table / plot of an earlier run:
  python benchmarks/quality.py --render benchmarks/results/quality_X.json \\
      --out benchmarks/results --name X

Writes ``quality_<name>.md`` (table), ``.png`` (bar plot) and ``.json`` (raw
per-seed numbers) under ``--out``. (This was ``python -m tfdml.bench``; the
protocol lives here, outside the package, since issue 14.)

Protocol (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020;
split of Oh Song et al., CVPR 2016):

* class-disjoint split (:func:`tfdml.data.split_classes`): the second half
  of the sorted class ids is the test half; validation classes are drawn
  (seeded by the run's seed) from the first half and never trained on;
* every row trains the same backbone (``small_cnn``) from scratch with the
  same optimizer, batch (``P x K``) and step budget; the budget is split
  into ``--epochs`` epochs and validation MAP@R is computed at the end of
  each; the best-on-validation encoder is the one reported (test classes
  are never used for selection);
* each row's method settings (loss, miner, weighting, memory, augment,
  meta, classification head, warm start) are read from its
  ``configs/<name>.yaml`` (:data:`ROWS`), never copied here; a row may
  override a few of them (the variants, the protocol's memory size);
* test metrics (queries = references, self excluded): MAP@R (primary),
  R-Precision, Precision@1, Recall@1/2/4/8, NMI (k-means, k = number of
  test classes), as mean +- std over ``--seeds`` seeds;
* the raw-pixel row: cosine on the flattened, L2-normalised test images
  (no training; identical for every seed).

Each training run goes through :func:`tfdml.training.loop.main` (a run folder
under ``--runs-dir``); results go to ``OUT/quality_<name>.{md,png,json}``.
"""

import argparse
import json
import os
import shlex
import sys
import time

from tfdml._cpu import enable_onednn

enable_onednn()  # before TensorFlow is imported: tfdml/_cpu.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from _common import environment  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
COMMAND = "python benchmarks/quality.py"

METRICS = (
    "map@r",
    "r_precision",
    "precision@1",
    "recall@1",
    "recall@2",
    "recall@4",
    "recall@8",
    "nmi",
)
HEADERS = ("MAP@R", "R-Prec", "P@1", "R@1", "R@2", "R@4", "R@8", "NMI")

# The protocol's memory for the XBM rows (the configs' 8192 slots are for
# their longer runs; every XBM row here has the same size).
_XBM_MEMORY = {"size": 2048, "start_after": 0}

# row -> (label, base row for "does it beat its base", configs/<name>.yaml
# holding the method settings (None: none), overrides {section: values to
# update, or None to drop the section}).
ROWS = {
    "raw_pixels": ("raw pixels (no training)", None, None, None),
    "contrastive": ("contrastive", None, "contrastive_cjk", None),
    "triplet": ("triplet semi-hard", None, "triplet_cjk", None),
    "ms": ("MS", None, "ms_cjk", None),
    "lifted": (
        "lifted structure",
        None,
        None,
        {"loss": {"name": "LiftedStructureLoss"}},
    ),
    "gpw_ms": ("GPW (MS preset)", "ms", "gpw_cjk", None),
    # OSM + CAA, each part on its own: the OSM loss alone, with CAA, and
    # the official code's extra softmax cross-entropy head (weight 1).
    "osm": (
        "OSM alone (no CAA, no CE head)",
        "contrastive",
        "osm_caa_osm_alone_cjk",
        None,
    ),
    "osm_caa": ("OSM + CAA", "osm", "osm_caa_cjk", None),
    "osm_caa_ce": (
        "OSM + CAA + CE head (weight 1)",
        "osm_caa",
        "osm_caa_ce_cjk",
        None,
    ),
    "xbm_contrastive": (
        "XBM + contrastive (memory term averaged over non-zero pairs)",
        "contrastive_xbm_margins",
        "xbm_contrastive_cjk",
        {"memory": _XBM_MEMORY},
    ),
    "xbm_contrastive_joint": (
        "XBM + contrastive, one summed loss over batch + memory (old row)",
        "contrastive_xbm_margins",
        "xbm_contrastive_cjk",
        {"memory": {**_XBM_MEMORY, "memory_reduction": "joint"}},
    ),
    # XBM's row changes two things against "contrastive" (margins and the
    # memory); these two rows separate them, and delay the memory (XBM's
    # "slow drift" needs features that have stopped moving fast).
    "contrastive_xbm_margins": (
        "contrastive, XBM's margins (1.0 / 0.5), no memory",
        "contrastive",
        "xbm_contrastive_cjk",
        {"memory": None},
    ),
    "xbm_contrastive_warmup": (
        "XBM + contrastive, memory after half the steps",
        "contrastive_xbm_margins",
        "xbm_contrastive_cjk",
        # make_config turns the fraction into memory.start_after steps
        {"memory": {"size": 2048, "start_after_fraction": 0.5}},
    ),
    "mmsi_contrastive": (
        "MMSI + contrastive",
        "contrastive",
        "mmsi_contrastive_cjk",
        None,
    ),
    "mmsi_ms": ("MMSI + MS", "ms", "mmsi_ms_cjk", None),
    "mmsi_ms_separate": (
        "MMSI + MS (separate normalisation)",
        "mmsi_ms",
        "mmsi_ms_cjk",
        {"meta": {"normalization": "separate"}},
    ),
    # MMSI in its regime: fine-tune the MS row's best encoder of the same
    # seed (the config's train.init_from) at the config's small constant
    # lr, against MS continued for the same steps and lr, and two controls
    # of the meta weights.
    "ms_finetune": (
        "MS continued from MS (warm start, lr 1e-5)",
        None,
        "ms_finetune_cjk",
        None,
    ),
    "mmsi_ms_finetune": (
        "MMSI + MS fine-tuned from MS (lr 1e-5)",
        "ms_finetune",
        "mmsi_ms_finetune_cjk",
        None,
    ),
    "mmsi_ms_finetune_ones": (
        "control: MMSI base with w = 1 (fine-tuned)",
        "ms_finetune",
        "mmsi_ms_finetune_ones_cjk",
        None,
    ),
    "mmsi_ms_finetune_random": (
        "control: random weights with MMSI's sparsity (fine-tuned)",
        "ms_finetune",
        "mmsi_ms_finetune_random_cjk",
        None,
    ),
    "mmsi_ms_finetune_separate": (
        "MMSI + MS fine-tuned, separate normalisation",
        "ms_finetune",
        "mmsi_ms_finetune_cjk",
        {"meta": {"normalization": "separate"}},
    ),
    "iaa_contrastive": (
        "IAA + contrastive",
        "contrastive",
        "iaa_contrastive_cjk",
        None,
    ),
    "iaa_ms": ("IAA + MS", "ms", "iaa_ms_cjk", None),
    # against the semi-hard triplet row: the same loss as its base (the
    # config trains IAA with hard mining)
    "iaa_triplet": (
        "IAA + triplet",
        "triplet",
        "iaa_triplet_cjk",
        {"loss": {"mining": "semi-hard"}},
    ),
}

# Sections that are the method (taken whole from a row's config); the rest
# (data, model size, optimizer, schedule, budget) is the protocol's.
METHOD_SECTIONS = ("loss", "miner", "weighting", "memory", "augment", "meta")
# Single keys of the protocol's sections that belong to the method.
METHOD_KEYS = {
    "model": ("classification_head",),
    "train": ("classification_loss_weight", "classification_loss"),
}


def read_config(name, config_dir=None):
    """The raw (unresolved) mapping of ``configs/<name>.yaml``."""
    path = os.path.join(config_dir or CONFIG_DIR, f"{name}.yaml")
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def method_sections(row, config_dir=None):
    """``{section: values}`` of a row: its config's method settings, then
    the row's overrides; a warm start (the config's ``train.init_from``)
    becomes ``{"warm_start": {"from": row, "learning_rate": lr}}``."""
    _, _, name, overrides = ROWS[row]
    sections = {}
    if name is not None:
        raw = read_config(name, config_dir)
        for section in METHOD_SECTIONS:
            if raw.get(section):
                sections[section] = dict(raw[section])
        for section, keys in METHOD_KEYS.items():
            values = {
                k: raw[section][k] for k in keys if k in raw.get(section, {})
            }
            if values:
                sections[section] = values
        init_from = raw.get("train", {}).get("init_from")
        if init_from:
            sections["warm_start"] = {
                "from": _row_of_run(init_from),
                "learning_rate": raw["optimizer"]["learning_rate"],
            }
    for section, values in (overrides or {}).items():
        if values is None:
            sections.pop(section, None)
        else:
            sections[section] = {**sections.get(section, {}), **values}
    return sections or None


def _row_of_run(init_from):
    """The row trained by the config that wrote ``runs/<config>``."""
    config = os.path.basename(os.path.normpath(init_from))
    rows = [r for r, spec in ROWS.items() if spec[2] == config and not spec[3]]
    if len(rows) != 1:
        raise ValueError(
            f"train.init_from={init_from!r}: no benchmark row trains "
            f"configs/{config}.yaml"
        )
    return rows[0]


def method_table(config_dir=None):
    """``{row: (label, base row, sections)}``, sections read from the
    configs."""
    return {
        row: (label, base, method_sections(row, config_dir))
        for row, (label, base, _, _) in ROWS.items()
    }


METHODS = method_table()


def parse_dataset(spec):
    """``"cjk_glyphs/small"`` -> data config; ``"synthetic"`` for tests."""
    if spec == "synthetic":
        return {
            "source": "synthetic",
            "num_classes": 16,
            "examples_per_class": 6,
            "size": 16,
            "synthetic_channels": 1,
        }
    name, _, config = spec.partition("/")
    if name not in ("cjk_glyphs", "hangul_glyphs", "fashion_mnist"):
        raise ValueError(
            "dataset must be cjk_glyphs/<config>, hangul_glyphs/<config>, "
            f"fashion_mnist or synthetic; received {spec!r}"
        )
    out = {"source": name}
    if config:
        out["config"] = config
    return out


def parse_methods(text):
    """``"all"`` or a comma list of :data:`METHODS` keys."""
    if text == "all":
        return list(METHODS)
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(
            f"methods: unknown {unknown or text!r}; expected 'all' or a "
            f"comma list of {sorted(METHODS)}"
        )
    return names


def make_config(args, method, seed, run_dir):
    """The resolved train config of one (method, seed) run."""
    from tfdml.training import config as config_lib

    # raw_pixels trains nothing; its (unused) loss is the contrastive one
    sections = dict(
        METHODS[method][2]
        or {"loss": {"name": "ContrastiveLoss", "form": "similarity"}}
    )
    warm = sections.pop("warm_start", None)
    steps_per_epoch = max(1, args.steps // args.epochs)
    raw = {
        "data": {
            **parse_dataset(args.dataset),
            "data_dir": args.data_dir,
            "classes_per_batch": args.classes_per_batch,
            "samples_per_class": args.samples_per_class,
            "val_classes": args.val_classes,
            "test_fraction": 0.5,
            "augmentation": "none",
        },
        "model": {
            "image_size": args.image_size,
            "channels": 1,
            "backbone": "small_cnn",
            "embedding_dim": args.embedding_dim,
        },
        "optimizer": {"name": "adam", "learning_rate": args.learning_rate},
        "train": {
            "epochs": args.epochs,
            "steps_per_epoch": steps_per_epoch,
            "seed": int(seed),
            "run_dir": run_dir,
            "overwrite": True,
            "verbose": 0,
            "keep_checkpoints": 1,
        },
        "eval": {"plots": False, "batch_size": 256},
        "export": {"enabled": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {})
        if section in ("loss", "miner", "weighting"):
            raw[section] = dict(values)
        else:
            raw[section].update(values)
    if warm is not None:
        raw["train"]["init_from"] = source_run_dir(args, warm["from"], seed)
        raw["optimizer"]["learning_rate"] = warm["learning_rate"]
    frac = raw.get("memory", {}).pop("start_after_fraction", None)
    if frac is not None:
        total = args.epochs * steps_per_epoch
        raw["memory"]["start_after"] = int(round(frac * total))
    if raw["data"].get("data_dir") is None:
        del raw["data"]["data_dir"]
    return config_lib.resolve(raw)


def protocol_splits(labels, seed, val_classes=0.1):
    """The protocol's class split for one seed (see module docstring)."""
    from tfdml.data import split_classes

    return split_classes(
        labels, test_fraction=0.5, val_classes=val_classes, seed=seed
    )


def test_metrics(emb, labels, seed=0):
    """Retrieval metrics + NMI on the test classes (queries = refs)."""
    from tfdml.eval import nmi_ami
    from tfdml.eval import retrieval_metrics

    m = retrieval_metrics(
        emb,
        labels,
        recall_at=(1, 2, 4, 8),
        seed=seed,
        metrics=[k for k in METRICS if k != "nmi"],
    )
    out = {k: float(m[k]) for k in METRICS if k != "nmi"}
    out["nmi"] = float(nmi_ami(emb, labels, seed=seed)["nmi"])
    return out


def raw_pixel_metrics(cfg):
    """The raw-pixel row: cosine on flattened L2-normalised test pixels."""
    from tfdml.training.build import Data

    data = Data(cfg)
    x, y = data.arrays("test")
    flat = x.reshape(len(x), -1).astype(np.float64)
    flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    return test_metrics(flat.astype(np.float32), y), len(y)


def source_run_dir(args, method, seed):
    """Run folder of ``method`` at ``seed`` (also a warm start's source)."""
    return os.path.abspath(os.path.join(args.runs_dir, f"{method}_s{seed}"))


def ensure_source_run(args, method, seed):
    """Trains a warm-start row's source run if it has no encoder yet."""
    from tfdml.training import loop

    warm = (METHODS[method][2] or {}).get("warm_start")
    if warm is None:
        return
    src = source_run_dir(args, warm["from"], seed)
    if os.path.exists(os.path.join(src, "best_encoder.keras")):
        return
    cfg = make_config(args, warm["from"], seed, src)
    rc = loop.main(cfg)
    if rc != loop.EXIT_OK:
        raise RuntimeError(f"{warm['from']} seed {seed}: exit {rc}")


def run_one(args, method, seed):
    """Trains one (method, seed) and returns its test metrics (best-val)."""
    import keras

    from tfdml.training import loop
    from tfdml.training import run_dir as run_dir_lib
    from tfdml.training.build import Data
    from tfdml.training.report import embed_dataset

    run_dir = source_run_dir(args, method, seed)
    ensure_source_run(args, method, seed)
    cfg = make_config(args, method, seed, run_dir)
    if method == "raw_pixels":
        metrics, _ = raw_pixel_metrics(cfg)
        return metrics, {}
    keras.utils.set_random_seed(int(seed))
    t0 = time.time()
    rc = loop.main(cfg)
    seconds = time.time() - t0
    if rc != loop.EXIT_OK:
        raise RuntimeError(f"{method} seed {seed}: training exit {rc}")
    state = run_dir_lib.read_state(run_dir) or {}
    best = os.path.join(run_dir, "best_encoder.keras")
    if not os.path.exists(best):
        raise RuntimeError(f"{method} seed {seed}: no best_encoder.keras")
    encoder = keras.saving.load_model(best, compile=False)
    data = Data(cfg)
    emb, y = embed_dataset(
        encoder, data.eval_dataset("test", cfg["eval"]["batch_size"])
    )
    info = {
        "train_seconds": round(seconds, 1),
        "best_epoch": state.get("best_epoch"),
        "best_val_map@r": state.get("best"),
    }
    return test_metrics(emb, y, seed=seed), info


def summarize(raw):
    """``{method: {metric: (mean, std)}}`` over the seeds of ``raw``."""
    out = {}
    for method, runs in raw.items():
        ok = [r["metrics"] for r in runs if r.get("metrics")]
        if not ok:
            continue
        out[method] = {
            k: (
                float(np.mean([r[k] for r in ok])),
                # sample std (ddof 1): few seeds; 0 for a single seed
                float(np.std([r[k] for r in ok], ddof=1 if len(ok) > 1 else 0)),
            )
            for k in METRICS
        }
        out[method]["n"] = len(ok)
    return out


def markdown_table(summary):
    """Markdown rows ``mean ± std`` (x100) for each method of ``summary``."""
    lines = [
        "| method | seeds | " + " | ".join(HEADERS) + " |",
        "|---" * (len(HEADERS) + 2) + "|",
    ]
    for method, stats in summary.items():
        cells = [
            f"{100 * stats[k][0]:.1f} ± {100 * stats[k][1]:.1f}"
            for k in METRICS
        ]
        n = stats.get("n", "")
        name = METHODS[method][0]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons(summary):
    """Sentences: each seed method's MAP@R against its base loss."""
    out = []
    for method, stats in summary.items():
        base = METHODS[method][1]
        if base is None or base not in summary:
            continue
        m, s = stats["map@r"]
        bm, bs = summary[base]["map@r"]
        # std of the difference of two independent seed means' samples
        sd = float(np.hypot(s, bs))
        gain = m - bm
        if min(stats["n"], summary[base]["n"]) < 2:
            verdict = "no verdict (needs >= 2 seeds on both sides)"
        elif gain > 2 * sd:
            verdict = "GAIN (> 2 std)"
        elif gain < -2 * sd:
            verdict = "LOSS (> 2 std)"
        else:
            verdict = "no clear gain (within 2 std)"
        out.append(
            f"* {METHODS[method][0]} ({100 * m:.1f} ± {100 * s:.1f}) vs its "
            f"base {METHODS[base][0]} ({100 * bm:.1f} ± {100 * bs:.1f}): "
            f"{verdict}, MAP@R {100 * gain:+.1f} (2 std = {200 * sd:.1f})."
        )
    return out


def caveats(args, raw, summary):
    """Sentences read off the numbers: pixel baseline, under-training."""
    out = []
    if "raw_pixels" in summary:
        pix = summary["raw_pixels"]["map@r"][0]
        better = [
            METHODS[m][0]
            for m, st in summary.items()
            if m != "raw_pixels" and st["map@r"][0] > pix
        ]
        if better:
            out.append(
                f"* Rows above the raw-pixel MAP@R ({100 * pix:.1f}): "
                + ", ".join(better)
                + "."
            )
        else:
            out.append(
                f"* No trained row reaches the raw-pixel MAP@R "
                f"({100 * pix:.1f}) within this budget: at "
                f"{args.steps} steps from scratch the small CNN is far "
                "from converged; the table compares methods at a fixed "
                "short budget, not their converged quality."
            )
    runs = [
        r
        for m, rs in raw.items()
        if m != "raw_pixels"
        for r in rs
        if r.get("best_epoch") is not None
    ]
    last = sum(int(r["best_epoch"]) >= args.epochs for r in runs)
    if runs:
        out.append(
            f"* The best validation epoch was the last one in {last} of "
            f"{len(runs)} runs (still improving when the budget ended)."
        )
    return out


def bar_plot(summary, path, title):
    """Grouped bars: MAP@R, R@1 and NMI per method, std as error bars."""
    from tfdml.eval.plots import _plt

    plt = _plt()
    names = list(summary)
    keys = ("map@r", "precision@1", "nmi")
    x = np.arange(len(names))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names) + 2), 4.2))
    for i, k in enumerate(keys):
        ax.bar(
            x + (i - 1) * width,
            [summary[n][k][0] for n in names],
            width,
            yerr=[summary[n][k][1] for n in names],
            capsize=2,
            label={"precision@1": "P@1 (= R@1)"}.get(k, k.upper()),
        )
    ax.set_xticks(x)
    ax.set_xticklabels(
        [METHODS[n][0] for n in names], rotation=35, ha="right", fontsize=8
    )
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("test classes (mean ± std over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(args, raw, env, command, name):
    """Writes ``quality_<name>.{json,md,png}`` under ``args.out``."""
    summary = summarize(raw)
    base = os.path.join(args.out, f"quality_{name}")
    doc = {
        "command": command,
        "environment": env,
        "protocol": protocol_dict(args),
        "runs": raw,
        "summary": {
            m: {
                **{k: {"mean": s[k][0], "std": s[k][1]} for k in METRICS},
                "seeds": s["n"],
            }
            for m, s in summary.items()
        },
    }
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    title = (
        f"{args.dataset}: {args.steps} steps, batch "
        f"{args.classes_per_batch}x{args.samples_per_class}, "
        f"{len(args.seed_list)} seeds"
    )
    if summary:
        bar_plot(summary, base + ".png", title)
    failed = [
        f"* {METHODS[m][0]}: {r['error']}"
        for m, runs in raw.items()
        for r in runs
        if r.get("error")
    ]
    p = protocol_dict(args)
    md = [
        f"# Retrieval quality on {args.dataset}",
        "",
        "These are **typefaces** (CJK ideographs rendered from Debian font "
        "packages; class = character, instance = font), not photos or "
        "handwriting. Numbers here do not transfer to CUB / Cars / SOP.",
        "",
        "Test classes only (the second half of the class ids, never used "
        "for training or model selection); the encoder of each run is its "
        "best epoch on validation MAP@R (validation classes drawn from the "
        "training half). Values x100, mean ± std over seeds.",
        "",
        markdown_table(summary),
        "",
        f"![quality](quality_{name}.png)",
        "",
        "## Seed methods against their base loss (MAP@R)",
        "",
        *(comparisons(summary) or ["* (no seed-method rows in this run)"]),
        "",
        "## Reading the table",
        "",
        *caveats(args, raw, summary),
        "",
        "## Protocol",
        "",
        *[f"* {k}: {v}" for k, v in p.items()],
        "",
        "## Environment",
        "",
        *[f"* {k}: {v}" for k, v in env.items()],
        f"* command: `{command}`",
    ]
    if failed:
        md += ["", "## Runs that failed (left out of the table)", "", *failed]
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    return base


def protocol_dict(args):
    return {
        "dataset": args.dataset,
        "split": "class-disjoint: second half of the sorted class ids is "
        f"test; {args.val_classes} of the first half is validation "
        "(seeded per run), the rest trains",
        "backbone": "small_cnn (Conv-BN-ReLU 32/64/128 + 128) -> avg pool "
        f"-> Dense {args.embedding_dim} -> L2, from scratch, every row",
        "input": f"{args.image_size}x{args.image_size} grayscale, no "
        "augmentation",
        "batch": f"P x K = {args.classes_per_batch} x {args.samples_per_class}",
        "budget": f"{args.steps} steps = {args.epochs} epochs x "
        f"{max(1, args.steps // args.epochs)} steps, every row",
        "optimizer": f"Adam, lr {args.learning_rate}, constant, every row",
        "selection": "validation MAP@R after every epoch; best epoch kept",
        "seeds": args.seed_list,
        "metrics": "MAP@R (primary), R-Precision, P@1, Recall@1/2/4/8 "
        "(exact, queries = references, self excluded), NMI (k-means, "
        "k = number of test classes)",
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cjk_glyphs/small")
    p.add_argument("--methods", default="all")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--classes-per-batch", type=int, default=16)
    p.add_argument("--samples-per-class", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--embedding-dim", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--val-classes", type=float, default=0.1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument(
        "--runs-dir",
        default=os.path.join("runs", "bench"),
        help="run folders (checkpoints, encoders) of the trained rows",
    )
    p.add_argument("--name", default=None, help="results file suffix")
    p.add_argument(
        "--render",
        default=None,
        metavar="JSON",
        help="only re-write the table / plot of an earlier run's JSON "
        "(its protocol is read from the command recorded there)",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="record a failing method and continue",
    )
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1; received {args.seeds}")
    if args.steps < 1 or args.epochs < 1 or args.epochs > args.steps:
        p.error(
            f"need 1 <= --epochs <= --steps; received epochs={args.epochs}, "
            f"steps={args.steps}"
        )
    try:
        parse_dataset(args.dataset)
        args.method_list = parse_methods(args.methods)
    except ValueError as e:
        p.error(str(e))
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    return args


def _recorded_argv(command):
    """The flags of a recorded command line (``python benchmarks/quality.py
    ...`` or the older ``python -m tfdml.bench ...``)."""
    words = shlex.split(command)
    first = next(
        (i for i, w in enumerate(words) if w.startswith("--")), len(words)
    )
    return words[first:]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = f"{COMMAND} " + shlex.join(argv)
    name = args.name or args.dataset.replace("/", "_")
    os.makedirs(args.out, exist_ok=True)
    if args.render:
        # Re-writes the table and plot from a JSON of an earlier run.
        with open(args.render, encoding="utf-8") as f:
            doc = json.load(f)
        # The protocol of the earlier run, from its recorded command line.
        old = parse_args(_recorded_argv(doc["command"]))
        old.out, old.render = args.out, args.render
        base = write_results(
            old, doc["runs"], doc["environment"], doc["command"], name
        )
        print(f"[bench] re-rendered {base}.md / .png / .json", flush=True)
        return 0
    env = environment()
    raw = {m: [] for m in args.method_list}
    # Seeds outer: a cut-short run still has every method at some seeds.
    for seed in args.seed_list:
        for method in args.method_list:
            if method == "raw_pixels" and seed != args.seed_list[0]:
                continue  # no training: identical for every seed
            t0 = time.time()
            try:
                metrics, info = run_one(args, method, seed)
                entry = {"seed": seed, "metrics": metrics, **info}
            except Exception as e:  # noqa: BLE001
                if not args.keep_going:
                    raise
                entry = {"seed": seed, "error": f"{type(e).__name__}: {e}"}
            entry["seconds"] = round(time.time() - t0, 1)
            raw[method].append(entry)
            print(
                f"[bench] {method} seed {seed}: "
                + (
                    f"MAP@R {entry['metrics']['map@r']:.4f}"
                    if "metrics" in entry
                    else entry["error"]
                )
                + f" ({entry['seconds']} s)",
                flush=True,
            )
            write_results(args, raw, env, command, name)
    base = write_results(args, raw, env, command, name)
    print(f"[bench] wrote {base}.md / .png / .json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
