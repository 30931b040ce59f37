"""Writes configs/*.yaml from one table: method settings x data sets.

Usage::

  python tools/make_configs.py            # rewrite the configs it owns
  python tools/make_configs.py --check    # exit 1 if configs/ differ
  python tools/make_configs.py --out DIR  # write into DIR instead

The files it owns are :func:`owned` (``<method>_<data set>.yaml`` for every
row of :data:`METHODS` and each of its data sets). Hand-written configs
(``smoke.yaml``, ``demo_cjk.yaml``, and any other file the table does not
name, e.g. ``proxy_anchor_cjk.yaml``) are left alone. Change a setting here,
run the tool and commit both; ``tests/test_make_configs.py`` regenerates the
files into a temporary folder and diffs them against ``configs/``.

A file is three comment lines (what, recipe, usage) and the sections in the
order data, model, method (loss, miner, weighting, memory, augment, meta),
optimizer, train, eval, written with ``yaml.safe_dump``.
"""

import argparse
import os
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Per:
    """A value that depends on the data set: ``Per(default, sop=...)``."""

    def __init__(self, default, **by_dataset):
        self.default = default
        self.by_dataset = by_dataset

    def get(self, dataset):
        return self.by_dataset.get(dataset, self.default)


def resolve(value, dataset):
    """``value`` with every :class:`Per` replaced by its ``dataset`` value."""
    if isinstance(value, Per):
        return resolve(value.get(dataset), dataset)
    if isinstance(value, dict):
        return {k: resolve(v, dataset) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(resolve(v, dataset) for v in value)
    return value


_RESNET = {
    "image_size": 224,
    "channels": 3,
    "backbone": "resnet50",
    "weights": "imagenet",
    "pooling": "avgmax",
    "freeze_batchnorm": True,
    "embedding_dim": 512,
}

# data set -> (what it is, data section without the batch, model section)
DATASETS = {
    "cjk": (
        "the offline CJK glyph set (TFDS builder cjk_glyphs/small: 400 "
        "characters x Debian font packages, built locally; use --set "
        "data.config=full for the full set); second half of the classes is "
        "test; glyphs are never flipped.",
        {
            "source": "cjk_glyphs",
            "config": "small",
            "val_classes": 0.1,
            "test_fraction": 0.5,
            "augmentation": "crop",
        },
        {
            "image_size": 64,
            "channels": 1,
            "backbone": "small_cnn",
            "embedding_dim": 128,
        },
    ),
    "cub": (
        "CUB-200-2011 (TFDS caltech_birds2011): 100 train / 100 test classes, "
        "20 of the train classes held out for validation.",
        {
            "source": "tfds",
            "name": "caltech_birds2011",
            "val_classes": 20,
            "test_fraction": 0.5,
            "augmentation": "crop_flip",
        },
        _RESNET,
    ),
    "cars": (
        "Cars-196 (TFDS cars196): 98 train / 98 test classes, 20 of the train "
        "classes held out for validation.",
        {
            "source": "tfds",
            "name": "cars196",
            "val_classes": 20,
            "test_fraction": 0.5,
            "augmentation": "crop_flip",
        },
        _RESNET,
    ),
    "sop": (
        "Stanford Online Products (manual-download TFDS builder "
        "stanford_online_products): 11318 train / 11316 test classes, 1000 "
        "train classes held out for validation.",
        {
            "source": "tfds",
            "name": "stanford_online_products",
            "val_classes": 1000,
            "test_fraction": 0.5,
            "augmentation": "crop_flip",
        },
        _RESNET,
    ),
}
ALL = ("cub", "cars", "sop", "cjk")
# Recall@k reported on each data set (SOP: its papers' 1 / 10 / 100 / 1000)
RECALL_AT = Per([1, 2, 4, 8], sop=[1, 10, 100, 1000])

_MS_SCHEDULE = {
    "name": "adam",
    "learning_rate": 3.0e-05,
    "weight_decay": 0.0005,
    "schedule": "multistep",
    "milestones": [12, 24],
    "gamma": 0.1,
}

# recipe -> (P x K batch, optimizer, train budget)
RECIPES = {
    # MS paper / msight: Adam 3e-5, 3000 iterations, x0.1 at 1200 / 2400
    "ms": ((16, 5), _MS_SCHEDULE, {"epochs": 30, "steps_per_epoch": 100}),
    "xbm": ((32, 4), _MS_SCHEDULE, {"epochs": 30, "steps_per_epoch": 100}),
    # IAA paper: Adam, wd 1e-5, 100 epochs, x0.2 at 40 and 60
    "iaa": (
        Per((32, 4), sop=(42, 3)),
        {
            "name": "adam",
            "learning_rate": Per(1.0e-04, cub=5.0e-05, cars=5.0e-05),
            "weight_decay": 1.0e-05,
            "schedule": "multistep",
            "milestones": [40, 60],
            "gamma": 0.2,
        },
        {
            "epochs": 100,
            "steps_per_epoch": Per(100, cub=45, cars=62, sop=300),
        },
    ),
    "mmsi": (
        (16, 5),
        {"name": "adam", "learning_rate": 1.0e-05, "weight_decay": 0.0005},
        {"epochs": 120, "steps_per_epoch": 300},
    ),
    # the MMSI paper's MS script: lr 1e-7 (CJK: 1e-5, see mmsi_ms_finetune)
    "mmsi_ms": (
        (16, 5),
        {
            "name": "adam",
            "learning_rate": Per(1.0e-07, cjk=1.0e-05),
            "weight_decay": 0.0005,
        },
        {"epochs": 120, "steps_per_epoch": 300},
    ),
    "finetune": (
        (16, 5),
        {"name": "adam", "learning_rate": 1.0e-05, "weight_decay": 0.0005},
        {"init_from": "runs/ms_cjk", "epochs": 10, "steps_per_epoch": 100},
    ),
    # OSM + CAA official solvers: SGD momentum 0.9, x0.5 steps
    "osm": (
        (8, 7),
        {
            "name": "sgd",
            "momentum": 0.9,
            "learning_rate": Per(0.0005, cars=0.001),
            "weight_decay": Per(0.0003, cars=5.0e-05),
            "schedule": "multistep",
            "milestones": Per([5, 10, 15, 20], cars=[15, 30, 45, 60]),
            "gamma": 0.5,
        },
        {"epochs": Per(25, cars=80), "steps_per_epoch": 100},
    ),
}

_CONTRASTIVE = {"name": "ContrastiveLoss", "form": "similarity"}
_MS = {
    "name": "MultiSimilarityLoss",
    "alpha": 2.0,
    "beta": 40.0,
    "base": 0.5,
    "epsilon": 0.1,
}
_TRIPLET_SEMIHARD = {
    "name": "TripletMarginLoss",
    "margin": 0.2,
    "mining": "semi-hard",
}
_IAA = {
    "method": "iaa",
    "num_copies": 3,
    "lam": Per(0.8, sop=0.6),
    "num_neighbors": 25,
    "beta": 0.1,
    "gamma": 0.1,
    "tau": 40,
}
_MMSI_MS = {
    "name": "MMSIMultiSimilarityLoss",
    "alpha": 2.0,
    "beta": 40.0,
    "base": 0.5,
    "coefficient": 2.0,
    "epsilon": Per(0.05, sop=0.03),
}
# warm-up gate: ~98 % of the training classes seen before meta updates
_GATE = Per(0, cub=78, cars=76, sop=1000)
_MMSI_MS_META = {
    "method": "mmsi",
    "val_classes_per_batch": 10,
    "val_samples_per_class": 1,
    "d_size": Per(100, sop=1000),
    "min_classes_before_update": _GATE,
}
_OSM = {
    "name": "WeightedContrastiveLoss",
    "margin": 1.2,
    "sigma": 0.8,
    "lambda_": 0.5,
    "caa_mu": 1.0,
    "caa_sigma": 0.68,
}
_IAA_TITLE = (
    "IAA + {method} (paper behaviour): M = 3 synthetic per "
    "sample, lambda {augment[lam]}, K = 25 neighbour classes, beta = gamma = "
    "0.1, tau = 40; Adam, wd 1e-5, 100 epochs, x0.2 at 40 and 60"
)
_MMSI_TITLE = (
    "MMSI + {method} (official code settings): batch 80 = 16 x 5, "
    "validation batch 10 x 1 from the training classes, warm-up gate ~98 % "
    "of the training classes, Adam lr {optimizer[learning_rate]}, wd 5e-4; "
    "d_size {meta[d_size]}"
)
_FINETUNE = (
    "fine-tunes the MS run's best encoder (train.init_from: runs/ms_cjk; "
    "train configs/ms_cjk.yaml first) for 1000 steps at Adam 1e-5 (the "
    "paper's MS script uses 1e-7 for ~36k steps: at this budget nothing "
    "would move), batch 80 = 16 x 5, validation batch 10 x 1, d_size 100, "
    "MMSI code-form MS (scales 2 / 40, base 0.5, coefficient 2); compare "
    "with configs/ms_finetune_cjk.yaml (MS continued, same steps and lr)"
)
_XBM_COMMENT = (
    "memory term = mean over the non-zero memory positives + mean over the "
    "non-zero\nmemory negatives, per anchor (PML's AvgNonZero); the summed "
    'form ("sum", the\nofficial code) lets ~M/B times more memory negatives '
    "than positives drive\nevery embedding away from its stored copy "
    "(docs/training_methods.md, XBM)"
)

_XBM_NORMALIZE_COMMENT = (
    "store unit rows (the official code enqueues normalised features): the "
    "same loss,\nwithout re-normalising the M stored rows at every step"
)

# method -> settings. title: the recipe comment (str.format with the
# resolved config and {method}); recipe: a RECIPES key; datasets; the
# method's sections (loss, miner, weighting, memory, augment, meta); model /
# train: the method's keys of those sections; label: the first comment's
# name (default: the method); comments: {(section, key): text} written
# above that key.
METHODS = {
    "contrastive": {
        "title": "contrastive loss, MS-paper training recipe (Adam 3e-5, wd "
        "5e-4, 3000 iterations, x0.1 at 1200/2400, 16 x 5)",
        "recipe": "ms",
        "loss": _CONTRASTIVE,
    },
    "triplet": {
        "title": "triplet loss, same recipe as ms",
        "recipe": "ms",
        "loss": _TRIPLET_SEMIHARD,
    },
    "ms": {
        "title": "MS loss, msight code values: alpha 2, beta "
        "40, base 0.5, eps 0.1; Adam 3e-5, wd 5e-4, 3000 iterations, x0.1 at "
        "1200/2400, batch 80 = 16 x 5",
        "recipe": "ms",
        "loss": _MS,
    },
    "gpw": {
        "title": "General Pair-based Weighting (MS weighting + MS mining), MS "
        "recipe",
        "recipe": "ms",
        "loss": {"name": "GeneralPairWeightingLoss"},
        "miner": {"name": "MultiSimilarityMiner", "epsilon": 0.1},
        "weighting": {
            "name": "MultiSimilarityWeighting",
            "alpha": 2.0,
            "beta": 40.0,
            "base": 0.5,
        },
    },
    "xbm_contrastive": {
        "title": "contrastive + cross-batch memory (XBM, Wang et al. CVPR "
        "2020); memory about the training-set size (not from the paper)",
        "recipe": "xbm",
        "loss": {**_CONTRASTIVE, "pos_margin": 1.0, "neg_margin": 0.5},
        "memory": {
            "size": Per(8192, cub=5800, cars=8000, sop=55000),
            "start_after": Per(0, sop=1000),
            "memory_reduction": "avg_nonzero",
            "memory_weight": 1.0,
            "normalize": True,
        },
        "comments": {
            ("memory", "memory_reduction"): _XBM_COMMENT,
            ("memory", "normalize"): _XBM_NORMALIZE_COMMENT,
        },
    },
    "iaa_contrastive": {
        "title": _IAA_TITLE,
        "recipe": "iaa",
        "loss": _CONTRASTIVE,
        "augment": _IAA,
    },
    "iaa_ms": {
        "title": _IAA_TITLE,
        "recipe": "iaa",
        "loss": _MS,
        "augment": _IAA,
    },
    "iaa_triplet": {
        "title": _IAA_TITLE,
        "recipe": "iaa",
        "loss": {**_TRIPLET_SEMIHARD, "mining": "hard"},
        "augment": _IAA,
    },
    "mmsi_contrastive": {
        "title": _MMSI_TITLE,
        "recipe": "mmsi",
        "loss": {"name": "MMSIContrastiveLoss", "margin": 0.8},
        "meta": {**_MMSI_MS_META, "d_size": 1},
    },
    "mmsi_ms": {
        "title": _MMSI_TITLE + ", positive scale 2, negative scale 40, base "
        "0.5, coefficient 2/scale (MMSI code form); the paper fine-tunes an "
        "MS checkpoint (model.weights)",
        "recipe": "mmsi_ms",
        "loss": _MMSI_MS,
        "meta": _MMSI_MS_META,
    },
    "osm_caa": {
        "title": "OSM + CAA weighted contrastive (official solver): batch "
        "56 = 8 x 7, SGD momentum 0.9, official solver lr / wd / x0.5 "
        "steps; the classification head only supplies CAA's true-class "
        "probabilities (classification_loss_weight 0: no CE gradient, so CAA "
        "is close to a no-op while p ~ 1/C; docs/training_methods.md). Rows "
        "that isolate "
        "each part (CJK): osm_caa_osm_alone_cjk.yaml (OSM alone), "
        "osm_caa_ce_cjk.yaml (+ CE head, weight 1), osm_caa_gce_cjk.yaml (+ "
        "official Gaussian-weighted CE, weight 1)",
        "recipe": "osm",
        "loss": {**_OSM, "use_caa": True},
        "model": {"classification_head": True},
        "train": {"classification_loss_weight": 0.0},
    },
    # CJK-only rows (the quality benchmark's, benchmarks/quality.py)
    "osm_caa_osm_alone": {
        "label": "osm_caa_osm_alone_cjk",
        "datasets": ("cjk",),
        "title": "OSM alone (the best row "
        "measured): the weighted contrastive loss with online soft mining, no "
        "class-aware attention, no classification head; otherwise as "
        "osm_caa_cjk.yaml",
        "recipe": "osm",
        "loss": {**_OSM, "use_caa": False},
        "train": {"classification_loss_weight": 0.0},
    },
    "osm_caa_ce": {
        "label": "osm_caa_ce_cjk",
        "datasets": ("cjk",),
        "title": "OSM + CAA + a classification head trained with plain sparse "
        "CE, weight 1 (the former osm_caa row: the CE's backbone gradient is "
        "5-6x the OSM loss's at init, measured here); otherwise as "
        "osm_caa_cjk.yaml",
        "recipe": "osm",
        "loss": {**_OSM, "use_caa": True},
        "model": {"classification_head": True},
        "train": {
            "classification_loss_weight": 1.0,
            "classification_loss": "sparse_ce",
        },
    },
    "osm_caa_gce": {
        "label": "osm_caa_gce_cjk",
        "datasets": ("cjk",),
        "title": "OSM + CAA + the official Gaussian-weighted CE on the "
        "classification head (WeightedSoftmaxWithLoss: sample weights N(p; "
        "0.5, 0.18) of the true-class probability, L1-normalised"
        "), weight 1 as the official prototxt; otherwise as "
        "osm_caa_cjk.yaml",
        "recipe": "osm",
        "loss": {**_OSM, "use_caa": True},
        "model": {"classification_head": True},
        "train": {
            "classification_loss_weight": 1.0,
            "classification_loss": "gaussian_weighted",
        },
    },
    "ms_finetune": {
        "datasets": ("cjk",),
        "title": "Control for configs/mmsi_ms_finetune_cjk.yaml: MS continued "
        "from the MS run's best encoder (train.init_from: runs/ms_cjk) for "
        "the same 1000 steps at the same Adam 1e-5 (constant), batch 80 = 16 "
        "x 5; the loss as in configs/ms_cjk.yaml",
        "recipe": "finetune",
        "loss": _MS,
    },
    "mmsi_ms_finetune": {
        "label": "mmsi_ms_finetune_cjk",
        "datasets": ("cjk",),
        "title": "MMSI + MS in its regime (official code settings): "
        + _FINETUNE,
        "recipe": "finetune",
        "loss": _MMSI_MS,
        "meta": _MMSI_MS_META,
    },
    "mmsi_ms_finetune_ones": {
        "label": "mmsi_ms_finetune_ones_cjk",
        "datasets": ("cjk",),
        "title": 'Control row "MMSI base with w = 1" (meta.weights_mode: '
        "ones; the S-form selection with weight 1, no meta step): " + _FINETUNE,
        "recipe": "finetune",
        "loss": _MMSI_MS,
        "meta": {**_MMSI_MS_META, "weights_mode": "ones"},
    },
    "mmsi_ms_finetune_random": {
        "label": "mmsi_ms_finetune_random_cjk",
        "datasets": ("cjk",),
        "title": 'Control row "random weights with MMSI\'s sparsity" '
        "(meta.weights_mode: random_sparse; the meta weights permuted within "
        "each polarity): " + _FINETUNE,
        "recipe": "finetune",
        "loss": _MMSI_MS,
        "meta": {**_MMSI_MS_META, "weights_mode": "random_sparse"},
    },
}

METHOD_SECTIONS = ("loss", "miner", "weighting", "memory", "augment", "meta")
TRAIN_ORDER = (
    "init_from",
    "classification_loss_weight",
    "classification_loss",
    "epochs",
    "steps_per_epoch",
    "seed",
)


def owned():
    """``{file name: (method, data set)}`` of the configs this tool writes."""
    out = {}
    for method, spec in METHODS.items():
        for dataset in spec.get("datasets", ALL):
            out[f"{method}_{dataset}.yaml"] = (method, dataset)
    return out


def build(method, dataset):
    """``(comment lines, config dict)`` of one file."""
    spec = METHODS[method]
    about, data, model = DATASETS[dataset]
    (p, k), optimizer, train = resolve(RECIPES[spec["recipe"]], dataset)
    config = {
        "data": {**data, "classes_per_batch": p, "samples_per_class": k},
        "model": {**model, **spec.get("model", {})},
    }
    for section in METHOD_SECTIONS:
        if section in spec:
            config[section] = resolve(spec[section], dataset)
    train = {**train, **spec.get("train", {}), "seed": 0}
    config["optimizer"] = dict(optimizer)
    config["train"] = {key: train[key] for key in TRAIN_ORDER if key in train}
    config["eval"] = {"recall_at": RECALL_AT.get(dataset)}
    name = f"{method}_{dataset}"
    title = spec["title"].format(method=method.split("_")[-1], **config)
    comments = [
        f"# {spec.get('label', method)} on {about}",
        f"# {title}",
        f"# Usage: python train.py --config configs/{name}.yaml",
    ]
    return comments, config


def render(method, dataset):
    """The text of ``configs/<method>_<dataset>.yaml``."""
    comments, config = build(method, dataset)
    text = yaml.safe_dump(config, sort_keys=False)
    for (section, key), comment in METHODS[method].get("comments", {}).items():
        lines = "".join(f"  # {line}\n" for line in comment.split("\n"))
        anchor = f"\n{section}:\n"
        start = text.index(anchor) + len(anchor)
        at = text.index(f"  {key}:", start)
        text = text[:at] + lines + text[at:]
    return "\n".join(comments) + "\n" + text


def write(out_dir):
    """Writes every owned config into ``out_dir``; returns the names."""
    os.makedirs(out_dir, exist_ok=True)
    for name, (method, dataset) in owned().items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(render(method, dataset))
    return sorted(owned())


def differences(config_dir):
    """Owned files whose text in ``config_dir`` is not the generated one."""
    bad = []
    for name, (method, dataset) in sorted(owned().items()):
        path = os.path.join(config_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            bad.append(f"{name} (missing)")
            continue
        if text != render(method, dataset):
            bad.append(name)
    return bad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "configs"))
    p.add_argument(
        "--check",
        action="store_true",
        help="only compare --out with the table; exit 1 on a difference",
    )
    args = p.parse_args(argv)
    if args.check:
        bad = differences(args.out)
        for name in bad:
            print(f"differs from tools/make_configs.py: {name}")
        return 1 if bad else 0
    names = write(args.out)
    print(f"wrote {len(names)} configs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
