"""tfdml and pytorch-metric-learning side by side: the same model, data,
batches and budget; one table of test-set retrieval quality (default) or of
timings (``--speed``).

The peer is never a tfdml dependency. Install it once, in its own venv
(faiss-cpu: PML's default ``AccuracyCalculator`` searches with it)::

  python3 -m venv .venv-pml && .venv-pml/bin/pip install \\
      torch==2.13.0 pytorch-metric-learning==2.9.0 faiss-cpu

Then (the full CJK set needs ``bash tools/install_fonts.sh --full`` as root;
``--dataset cjk_glyphs/small`` works with the default packages)::

  .venv/bin/python benchmarks/vs_pml.py --pml-python .venv-pml/bin/python \\
      --dataset cjk_glyphs/full --data-dir data_cache --steps 1024 \\
      --methods ms --seeds 0 --out benchmarks/results

Protocol (fixed, both frameworks):

* data: the class ids sorted; train = the first half of the classes,
  test = ``--test-classes`` (500) classes drawn (seed 0) from the second half;
  64x64 grayscale in [0, 1];
* the same P x K batches (``--classes-per-batch`` 32 x
  ``--samples-per-class`` 4): the index lists are drawn once by this script
  and handed to both trainers;
* model: 4 blocks of Conv3x3 (no bias) - BatchNorm (PyTorch's defaults:
  momentum 0.1 = Keras 0.9, epsilon 1e-5) - ReLU - MaxPool2, widths
  32-64-128-256; global average pooling; Linear 128; L2 normalisation;
  each framework's default weight initialisation;
* Adam lr 1e-3 (each framework's default epsilon), ``--steps`` steps, no
  augmentation;
* methods: ``ms`` = PML ``MultiSimilarityLoss(2, 50, 0.5)`` +
  ``MultiSimilarityMiner(0.1)`` and tfdml ``MultiSimilarityLoss(alpha=2,
  beta=50, base=0.5, epsilon=0.1)``; ``contrastive`` = PML
  ``ContrastiveLoss(pos_margin=0, neg_margin=1)`` (distance form, its
  ``AvgNonZeroReducer``) and tfdml ``ContrastiveLoss(form="distance",
  pos_margin=0, neg_margin=1)`` (its default ``pair_reduction``
  ``"avg_nonzero"``);
* ``triplet`` = PML ``TripletMarginLoss(0.2)`` + ``TripletMarginMiner(0.2,
  "semihard")`` and tfdml ``TripletMarginLoss(margin=0.2,
  mining="semi-hard")``; tfdml only (PML has no such loss): ``osm``
  (``WeightedContrastiveLoss(use_caa=False)``) and ``osm_caa``;
* evaluation: every test image is a query against all others (self
  excluded); the test embeddings of both frameworks are scored by the
  same code (``tfdml.eval.retrieval_metrics``, exact): MAP@R, R-precision,
  P@1. PML's embeddings are what its users get (``model.eval()``, running
  statistics). tfdml's are reported twice: with the moving statistics as
  trained, and after ``tfdml.models.recalibrate_batchnorm`` on 8 training
  batches (tfdml's default in ``train.py``).

Each trainer runs in a fresh process.

Speed (``benchmarks/speed_pml.py`` has the protocol; ``--speed --help``
the options): losses, evaluation, embedding and a training step, each
framework in fresh processes, alternating, ``--rounds`` rounds, per-round
and median times and ratios::

  .venv/bin/python benchmarks/vs_pml.py --speed \\
      --pml-python .venv-pml/bin/python --parts losses,eval,embed,train \\
      --rounds 3 --out benchmarks/results
  .venv/bin/python benchmarks/vs_pml.py --speed --quick --skip-pml  # smoke
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:  # loaded by path (tests), or run by the PML venv
    sys.path.insert(0, HERE)

from _common import Stopwatch  # noqa: E402
from _common import environment  # noqa: E402
from _common import pk_batches  # noqa: E402

WIDTHS = (32, 64, 128, 256)
EMBEDDING_DIM = 128


# -- data and batches (tfdml venv) ------------------------------------------


def load_arrays(dataset, data_dir):
    """(uint8 images [N, H, W], int labels [N]) of a glyph set or npz."""
    if dataset.endswith(".npz"):
        with np.load(dataset, allow_pickle=False) as z:
            return z["X"].reshape(len(z["y"]), *z["X"].shape[1:3]), z["y"]
    import tensorflow_datasets as tfds

    from tfdml.data.builders import glyphs

    name, config = dataset.split("/")
    full = glyphs.build_glyphs(name, config, data_dir=data_dir)
    builder = tfds.builder(full, data_dir=data_dir)
    data = tfds.as_numpy(builder.as_dataset(split="train", batch_size=-1))
    return data["image"][..., 0], data["label"].astype(np.int64)


def protocol(labels, test_classes, seed=0):
    """(train class ids, test class ids): first half / sample of 2nd half."""
    classes = np.unique(labels)
    half = len(classes) // 2
    train, rest = classes[:half], classes[half:]
    rng = np.random.default_rng(seed)
    n = min(test_classes, len(rest))
    test = np.sort(rng.choice(rest, size=n, replace=False))
    return train, test


def prepare(args, seed, work):
    """Writes the shared inputs of one seed; returns the file path."""
    x, y = load_arrays(args.dataset, args.data_dir)
    train_c, test_c = protocol(y, args.test_classes)
    batches = pk_batches(
        y,
        train_c,
        args.steps,
        args.classes_per_batch,
        args.samples_per_class,
        seed,
    )
    recal = pk_batches(
        y, train_c, 8, args.classes_per_batch, args.samples_per_class, 10**6
    )
    test_idx = np.flatnonzero(np.isin(y, test_c))
    used = np.unique(np.concatenate([batches.ravel(), recal.ravel()]))
    # Only the images the run touches travel to the trainers.
    keep = np.concatenate([used, test_idx])
    remap = np.full(len(y), -1, np.int64)
    remap[keep] = np.arange(len(keep))
    path = os.path.join(work, f"inputs_s{seed}.npz")
    np.savez(
        path,
        images=x[keep],
        labels=y[keep],
        batches=remap[batches],
        recal=remap[recal],
        test=remap[test_idx],
    )
    return path, len(train_c), len(test_c), len(test_idx)


# -- the tfdml trainer (tfdml venv, own process) ----------------------------


def tfdml_encoder(shape):
    import keras

    from tfdml.models import FusedBatchNormalization
    from tfdml.models import L2Normalization

    inputs = keras.Input(shape)
    x = inputs
    for i, w in enumerate(WIDTHS):
        x = keras.layers.Conv2D(w, 3, padding="same", use_bias=False)(x)
        # Keras' BatchNorm on TF's fused kernel, as tfdml's own small_cnn
        # (PyTorch's BatchNorm2d is fused too).
        x = FusedBatchNormalization(momentum=0.9, epsilon=1e-5)(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    raw = keras.layers.Dense(EMBEDDING_DIM, name="raw")(x)
    emb = L2Normalization(name="embeddings")(raw)
    return keras.Model(inputs, {"embeddings": emb, "raw": raw})


def tfdml_loss(method):
    from tfdml import losses

    if method == "ms":
        return losses.MultiSimilarityLoss(
            alpha=2.0, beta=50.0, base=0.5, epsilon=0.1
        )
    if method == "contrastive":
        return losses.ContrastiveLoss(
            form="distance", pos_margin=0.0, neg_margin=1.0
        )
    if method == "triplet":
        return losses.TripletMarginLoss(margin=0.2, mining="semi-hard")
    if method == "osm":
        return losses.WeightedContrastiveLoss(use_caa=False)
    if method == "osm_caa":
        return losses.WeightedContrastiveLoss(use_caa=True)
    raise ValueError(f"unknown method {method!r}")


# Methods PML has (the others run on the tfdml side only).
PML_METHODS = ("ms", "contrastive", "triplet")


def run_tfdml(inputs, method, seed, out):
    import keras
    import tensorflow as tf

    from tfdml.models import DMLModel
    from tfdml.models import recalibrate_batchnorm

    keras.utils.set_random_seed(seed)
    z = np.load(inputs)
    images = z["images"][..., None]
    labels = z["labels"]
    batches = z["batches"]

    def gather(idx):
        x = tf.cast(tf.gather(images, idx), tf.float32) / 255.0
        return x, tf.gather(labels, idx)

    ds = (
        tf.data.Dataset.from_tensor_slices(batches)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    encoder = tfdml_encoder(images.shape[1:])
    model = DMLModel(encoder)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss=tfdml_loss(method)
    )
    with Stopwatch() as fit:
        model.fit(
            ds, epochs=1, steps_per_epoch=len(batches), shuffle=False, verbose=0
        )

    def embed():
        fn = tf.function(lambda x: encoder(x, training=False)["embeddings"])
        test = z["test"]
        outs = [
            fn(gather(test[i : i + 512])[0]).numpy()
            for i in range(0, len(test), 512)
        ]
        return np.concatenate(outs)

    as_trained = embed()
    recal = [gather(b)[0] for b in z["recal"]]
    recalibrate_batchnorm(encoder, tf.data.Dataset.from_tensor_slices(recal))
    np.savez(
        out,
        tfdml=as_trained,
        tfdml_recalibrated=embed(),
        labels=labels[z["test"]],
        train_seconds=fit.seconds,
    )


# -- the PML trainer (PML venv, own process; imports no TF) -----------------


def pml_model():
    """The same CNN in PyTorch (raw outputs; L2-normalise them)."""
    import torch

    layers, c_in = [], 1
    for w in WIDTHS:
        layers += [
            torch.nn.Conv2d(c_in, w, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(w),
            torch.nn.ReLU(inplace=True),
            torch.nn.MaxPool2d(2),
        ]
        c_in = w
    layers += [
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(c_in, EMBEDDING_DIM),
    ]
    return torch.nn.Sequential(*layers)


def pml_loss(method):
    """(PML loss, miner or None) of a method in ``PML_METHODS``."""
    from pytorch_metric_learning import losses
    from pytorch_metric_learning import miners

    if method == "ms":
        return (
            losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
            miners.MultiSimilarityMiner(epsilon=0.1),
        )
    if method == "contrastive":
        return losses.ContrastiveLoss(pos_margin=0, neg_margin=1), None
    if method == "triplet":
        return (
            losses.TripletMarginLoss(margin=0.2),
            miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"),
        )
    raise ValueError(f"unknown method {method!r}")


def run_pml(inputs, method, seed, out):
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    z = np.load(inputs)
    images = torch.from_numpy(z["images"]).unsqueeze(1)  # N, 1, H, W uint8
    labels = torch.from_numpy(z["labels"])
    model = pml_model()
    loss_fn, miner = pml_loss(method)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    with Stopwatch() as fit:
        for idx in z["batches"]:
            idx = torch.from_numpy(idx)
            x = images[idx].float() / 255.0
            y = labels[idx]
            emb = torch.nn.functional.normalize(model(x), dim=1)
            pairs = miner(emb, y) if miner is not None else None
            loss = loss_fn(emb, y, pairs)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    test = torch.from_numpy(z["test"])
    outs = []
    with torch.no_grad():
        for i in range(0, len(test), 512):
            x = images[test[i : i + 512]].float() / 255.0
            outs.append(torch.nn.functional.normalize(model(x), dim=1).numpy())
    np.savez(
        out,
        pml=np.concatenate(outs),
        labels=z["labels"][z["test"]],
        train_seconds=fit.seconds,
        torch_version=torch.__version__,
    )


# -- the driver --------------------------------------------------------------


def _worker(python, kind, inputs, method, seed, out, threads):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [
        python,
        os.path.abspath(__file__),
        "--worker",
        kind,
        "--inputs",
        inputs,
        "--method",
        method,
        "--worker-seed",
        str(seed),
        "--worker-out",
        out,
    ]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def score(emb, labels):
    from tfdml.eval import retrieval_metrics

    m = retrieval_metrics(emb, labels, recall_at=(1,))
    return {
        "map@r": float(m["map@r"]),
        "r_precision": float(m["r_precision"]),
        "precision@1": float(m["precision@1"]),
    }


def pml_version(python):
    code = (
        "import pytorch_metric_learning as p, torch; "
        "print(p.__version__, torch.__version__)"
    )
    try:
        return subprocess.run(
            [python, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(
            f"--pml-python {python} cannot import pytorch_metric_learning "
            f"({e}); install it as the module docstring says."
        ) from None


def markdown(rows):
    lines = [
        "| method | framework | seed | MAP@R | R-Prec | P@1 | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['framework']} | {r['seed']} | "
            f"{100 * r['map@r']:.1f} | {100 * r['r_precision']:.1f} | "
            f"{100 * r['precision@1']:.1f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cjk_glyphs/full")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--pml-python", default=None)
    p.add_argument("--methods", default="ms")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=1024)
    p.add_argument("--classes-per-batch", type=int, default=32)
    p.add_argument("--samples-per-class", type=int, default=4)
    p.add_argument("--test-classes", type=int, default=500)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip-pml", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default=None)
    p.add_argument(
        "--speed",
        action="store_true",
        help="timings instead of quality (options: --speed --help)",
    )
    # internal: one trainer in its own process
    p.add_argument("--worker", choices=["tfdml", "pml"], default=None)
    p.add_argument("--inputs")
    p.add_argument("--method")
    p.add_argument("--worker-seed", type=int)
    p.add_argument("--worker-out")
    return p.parse_args(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--speed" in argv:
        import speed_pml

        return speed_pml.main([a for a in argv if a != "--speed"])
    args = parse_args(argv)
    if args.worker:
        run = run_tfdml if args.worker == "tfdml" else run_pml
        run(args.inputs, args.method, args.worker_seed, args.worker_out)
        return 0
    if not args.skip_pml and not args.pml_python:
        raise SystemExit("pass --pml-python PATH or --skip-pml")
    versions = None if args.skip_pml else pml_version(args.pml_python)
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "vs_pml_work")
    os.makedirs(work, exist_ok=True)
    rows = []
    methods = [m for m in args.methods.split(",") if m]
    for seed in [int(s) for s in args.seeds.split(",")]:
        inputs, n_train, n_test, n_imgs = prepare(args, seed, work)
        print(
            f"seed {seed}: {n_train} train classes, {n_test} test classes "
            f"({n_imgs} test images)",
            flush=True,
        )
        for method in methods:
            with_pml = not args.skip_pml and method in PML_METHODS
            kinds = ["tfdml"] + (["pml"] if with_pml else [])
            for kind in kinds:
                python = sys.executable if kind == "tfdml" else args.pml_python
                out = os.path.join(work, f"{kind}_{method}_s{seed}.npz")
                res = _worker(
                    python, kind, inputs, method, seed, out, args.threads
                )
                names = (
                    ["tfdml", "tfdml_recalibrated"]
                    if kind == "tfdml"
                    else ["pml"]
                )
                for name in names:
                    row = {
                        "method": method,
                        "framework": {
                            "tfdml": "tfdml (moving BN statistics)",
                            "tfdml_recalibrated": "tfdml (precise BN)",
                            "pml": "PML (model.eval())",
                        }[name],
                        "seed": seed,
                        "train_seconds": float(res["train_seconds"]),
                        **score(res[name], res["labels"]),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    table = markdown(rows)
    env = environment()
    header = (
        f"Date {env['date_utc']}, {env['machine']}, load average "
        f"{os.getloadavg()[0]:.1f}; TensorFlow {env['tensorflow']}, Keras "
        f"{env['keras']}; PML/torch {versions}; dataset {args.dataset}, "
        f"{args.steps} steps of {args.classes_per_batch}x"
        f"{args.samples_per_class}."
    )
    print("\n" + header + "\n\n" + table)
    name = args.name or "vs_pml_" + args.dataset.replace("/", "_")
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(header + "\n\n" + table + "\n")
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(
            {"header": header, "environment": env, "rows": rows}, f, indent=2
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
