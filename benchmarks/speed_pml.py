"""``vs_pml.py --speed``: tfdml and pytorch-metric-learning timed side by side.

Run through ``benchmarks/vs_pml.py --speed`` (its docstring has the PML
install command; PML is never a tfdml dependency)::

  .venv/bin/python benchmarks/vs_pml.py --speed --pml-python \\
      .venv-pml/bin/python --parts losses,eval,embed,train --rounds 3

Parts (``--parts``, any subset, in this order):

* ``losses``: forward + backward w.r.t. fixed random L2-normalised
  embeddings (d = 128, P x K labels, K = 4) at B = 128, 512, 2048:
  multi-similarity (PML loss + ``MultiSimilarityMiner(0.1)``), contrastive
  (distance form, margins 0 / 1), triplet semi-hard (PML loss +
  ``TripletMarginMiner(0.2, "semihard")``) and XBM contrastive with 8192
  pre-filled slots (PML ``CrossBatchMemory``; tfdml ``CrossBatchMemory``
  used as ``DMLModel`` uses it: batch + memory references,
  ``memory.per_anchor``, then ``enqueue``). tfdml runs in the mode
  ``DMLModel`` trains with (``tf.function``, ``jit_compile`` as Keras
  resolves it for the compiled model: off on a CPU-only machine); PML in
  eager PyTorch on a leaf tensor. Median of ``--repeats`` calls after two
  warm-up calls. XBM is the same work arranged differently: PML enqueues
  the batch and scores it against the memory in one loss; tfdml scores it
  against batch and memory as two terms (its default ``"avg_nonzero"``
  memory reduction), then enqueues.
* ``eval``: exact P@1, R-precision and MAP@R, queries = references (self
  excluded), d = 128: 28,500 points (500 classes x 57; class centres on
  the sphere + Gaussian noise) at MAP@R ~0.2 (``hard``) and ~0.9
  (``easy``); with ``--eval-200k`` (default off in ``--quick``) also 200k
  points, 10,000 classes x 20, trained-like (``200k-clustered``) and near
  random (``200k-random``). tfdml ``tfdml.eval.retrieval_metrics(x, y,
  metrics=(...))``; PML ``AccuracyCalculator(include=(...),
  k="max_bin_count").get_accuracy(x, y)`` (faiss exact search). Every set
  in a fresh process: the first call (what a user pays; the calculator's
  construction included) and a second, warm call. Both frameworks'
  metrics must agree to 1e-4 (the script exits 1 otherwise).
* ``embed``: 28,538 random 64x64x1 images through the 4-block CNN of
  ``vs_pml.py`` in inference mode, batch 256: ``tfdml.eval.embed`` vs
  ``model.eval()`` + ``torch.no_grad()``; first call and a warm call.
* ``train``: one training step of the same CNN, batch 128 (32 x 4),
  64x64x1, multi-similarity, Adam 1e-3: ``DMLModel.fit`` over a prefetched
  dataset repeating one fixed batch vs the PML loop; time per step after
  ``--train-warmup`` steps.

Protocol: ``--rounds`` rounds; in each, every (part, set) runs once per
framework, each in a fresh process; the framework that goes first
alternates from round to round (A B, B A, ...). Per case: the per-round
times, the per-round ratio tfdml / PML (< 1: tfdml faster), the medians and
the median of the per-round ratios. Workers get ``TF_ENABLE_ONEDNN_OPTS=1``
unless it is set. The Markdown table and a JSON file (with the machine,
versions, date and load averages) go to ``--out``.
"""

import argparse
import datetime
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import vs_pml  # noqa: E402  (the shared model and loss definitions)
from _common import Stopwatch  # noqa: E402
from _common import cpu_count  # noqa: E402
from _common import cpu_model  # noqa: E402
from _common import pk_images  # noqa: E402
from _common import pk_labels  # noqa: E402
from _common import timed_calls  # noqa: E402

PARTS = ("losses", "eval", "embed", "train")
LOSSES = ("ms", "contrastive", "triplet", "xbm")
DIM = vs_pml.EMBEDDING_DIM
K = 4
LABELS = {"tfdml": "tfdml", "pml": "PML"}
METRICS_TFDML = ("precision@1", "r_precision", "map@r")
METRICS_PML = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
TOLERANCE = 1e-4
# name -> (classes, per class, noise norm); noise tuned at 500 classes x 57
# for MAP@R ~0.2 (hard) and ~0.9 (easy).
EVAL_SETS = {
    "hard": (500, 57, 1.85),
    "easy": (500, 57, 1.2),
    "200k-clustered": (10_000, 20, 1.2),
    "200k-random": (10_000, 20, 6.0),
}


# -- synthetic inputs (written by the driver, read by both workers) ----------


def unit_rows(rng, n, d=DIM):
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def eval_set(classes, per_class, noise, seed=0, d=DIM):
    """Class centres on the unit sphere + Gaussian noise of norm ~noise."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng, classes, d)
    y = np.repeat(np.arange(classes), per_class)
    x = centres[y] + (noise / np.sqrt(d)) * rng.standard_normal(
        (len(y), d), dtype=np.float32
    )
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def write_inputs(cfg, work):
    """The losses' embeddings and the eval sets as npz files in ``work``."""
    paths = {}
    if "losses" in cfg["parts"]:
        rng = np.random.default_rng(0)
        arrays = {}
        for b in cfg["batch_sizes"]:
            arrays[f"emb{b}"] = unit_rows(rng, b)
            arrays[f"lab{b}"] = pk_labels(b // K, K).astype(np.int64)
        m = cfg["memory_size"]
        arrays["mem_emb"] = unit_rows(rng, m)
        arrays["mem_lab"] = pk_labels(-(-m // K), K)[:m].astype(np.int64)
        paths["losses"] = os.path.join(work, "losses.npz")
        np.savez(paths["losses"], **arrays)
    if "eval" in cfg["parts"]:
        for name in cfg["eval_sets"]:
            classes, per, noise = EVAL_SETS[name]
            if not name.startswith("200k"):
                classes = cfg["eval_classes"]
            x, y = eval_set(classes, per, noise)
            paths[f"eval:{name}"] = os.path.join(work, f"eval_{name}.npz")
            np.savez(paths[f"eval:{name}"], x=x, y=y)
    return paths


# -- the workers (one process each; the PML ones import no TensorFlow) -------


def _versions_tfdml():
    import keras
    import tensorflow as tf

    import tfdml

    try:
        from tensorflow.python.util import _pywrap_util_port

        mkl = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        mkl = None
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tfdml": tfdml.__version__,
        "onednn_built": mkl,
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "intra_op_threads": (
            tf.config.threading.get_intra_op_parallelism_threads()
        ),
    }


def _versions_pml():
    import pytorch_metric_learning
    import torch

    out = {
        "torch": torch.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "torch_mkldnn": bool(torch.backends.mkldnn.is_available()),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import faiss

        out["faiss"] = faiss.__version__
    except ImportError:
        out["faiss"] = None
    return out


def _dml_jit(loss, memory=None):
    """The ``jit_compile`` Keras resolves for a compiled ``DMLModel``."""
    import keras

    from tfdml.models import DMLModel
    from tfdml.models import L2Normalization

    inputs = keras.Input((DIM,))
    raw = keras.layers.Dense(DIM)(inputs)
    emb = L2Normalization()(raw)
    model = DMLModel(
        keras.Model(inputs, {"embeddings": emb, "raw": raw}), memory=memory
    )
    model.compile(optimizer="adam", loss=loss)
    return bool(model.jit_compile)


def tfdml_losses(cfg, unit):
    import tensorflow as tf

    from tfdml.memory import CrossBatchMemory

    data = np.load(cfg["inputs"]["losses"])
    cases, modes = [], set()
    for name in cfg["losses"]:
        for b in cfg["batch_sizes"]:
            emb = tf.constant(data[f"emb{b}"])
            labels = tf.constant(data[f"lab{b}"], tf.int32)
            loss = vs_pml.tfdml_loss("contrastive" if name == "xbm" else name)
            memory = None
            if name == "xbm":
                m = cfg["memory_size"]
                # unit rows stored (as configs/xbm_*.yaml and the official
                # code): the same loss, no per-step re-normalisation
                memory = CrossBatchMemory(m, DIM, normalize=True)
                memory.enqueue(
                    data["mem_emb"],
                    data["mem_lab"],
                    np.arange(m, dtype=np.int32) + 10**6,
                )
            jit = _dml_jit(loss, memory)
            modes.add(f"tf.function(jit_compile={jit})")
            step = _tfdml_loss_step(loss, memory)
            fn = tf.function(step, jit_compile=jit)

            def call(fn=fn, emb=emb, labels=labels):
                value, grad = fn(emb, labels)
                value.numpy(), grad.numpy()

            sec, first = timed_calls(call, repeats=cfg["repeats"], warmup=2)
            cases.append(
                {"case": f"{name} B={b}", "seconds": sec, "first_s": first}
            )
    return {"cases": cases, "mode": ", ".join(sorted(modes))}


def _tfdml_loss_step(loss, memory):
    """loss + gradient w.r.t. the embeddings (+ the enqueue, with XBM), as
    ``DMLModel.train_step`` computes them."""
    import tensorflow as tf

    if memory is None:

        def step(emb, labels):
            with tf.GradientTape() as tape:
                tape.watch(emb)
                value = loss(labels, emb)
            return value, tape.gradient(value, emb)

        return step
    from tfdml.losses import References

    seen = tf.Variable(0, dtype=tf.int32, trainable=False)

    def step(emb, labels):
        n = tf.shape(labels)[0]
        ids = seen + tf.range(n)
        with tf.GradientTape() as tape:
            tape.watch(emb)
            m_emb, m_lab, m_ids, m_valid = memory.references()
            per = memory.per_anchor(
                loss,
                emb,
                labels,
                ids,
                References(
                    tf.concat([emb, m_emb], 0),
                    tf.concat([labels, m_lab], 0),
                    tf.concat([ids, m_ids], 0),
                    tf.concat([tf.ones_like(labels, tf.bool), m_valid], 0),
                ),
            )
            value = tf.reduce_mean(per)
        grad = tape.gradient(value, emb)
        memory.enqueue(tf.stop_gradient(emb), labels, ids)
        seen.assign_add(n)
        return value, grad

    return step


def pml_losses(cfg, unit):
    import torch
    from pytorch_metric_learning import losses

    data = np.load(cfg["inputs"]["losses"])
    cases = []
    for name in cfg["losses"]:
        for b in cfg["batch_sizes"]:
            emb = torch.from_numpy(data[f"emb{b}"]).requires_grad_()
            labels = torch.from_numpy(data[f"lab{b}"])
            if name == "xbm":
                m = cfg["memory_size"]
                loss_fn = losses.CrossBatchMemory(
                    losses.ContrastiveLoss(pos_margin=0, neg_margin=1),
                    embedding_size=DIM,
                    memory_size=m,
                )
                loss_fn.embedding_memory[:] = torch.from_numpy(data["mem_emb"])
                loss_fn.label_memory[:] = torch.from_numpy(data["mem_lab"])
                loss_fn.has_been_filled = True
                loss_fn.queue_idx = 0
                miner = None
            else:
                loss_fn, miner = vs_pml.pml_loss(name)

            def call(emb=emb, labels=labels, loss_fn=loss_fn, miner=miner):
                emb.grad = None
                if miner is None:
                    value = loss_fn(emb, labels)
                else:
                    value = loss_fn(emb, labels, miner(emb, labels))
                value.backward()

            sec, first = timed_calls(call, repeats=cfg["repeats"], warmup=2)
            cases.append(
                {"case": f"{name} B={b}", "seconds": sec, "first_s": first}
            )
    return {"cases": cases, "mode": "eager"}


def _eval_cases(unit, first, warm, metrics, import_s, n):
    cases = [
        {"case": f"{unit} (N={n:,}) first call", "seconds": first},
        {"case": f"{unit} (N={n:,}) warm call", "seconds": warm},
    ]
    if import_s is not None:
        cases.insert(0, {"case": "import", "seconds": import_s})
    for c in cases:
        c["metrics"] = metrics
    return cases


def tfdml_eval(cfg, unit):
    with Stopwatch() as imported:
        from tfdml.eval import retrieval_metrics

    data = np.load(cfg["inputs"][f"eval:{unit}"])
    x, y = data["x"], data["y"]
    kwargs, path = {}, "all metrics (no metrics= keyword)"
    if "metrics" in inspect.signature(retrieval_metrics).parameters:
        kwargs, path = {"metrics": METRICS_TFDML}, "metrics=(P@1, R-P, MAP@R)"
    m, first, warm = _first_and_warm(lambda: retrieval_metrics(x, y, **kwargs))
    metrics = {k: float(m[k]) for k in METRICS_TFDML}
    first_set = unit == cfg["eval_sets"][0]
    import_s = imported.seconds if first_set else None
    cases = _eval_cases(unit, first, warm, metrics, import_s, len(y))
    return {"cases": cases, "mode": path}


def pml_eval(cfg, unit):
    with Stopwatch() as imported:
        from pytorch_metric_learning.utils.accuracy_calculator import (
            AccuracyCalculator,
        )

    data = np.load(cfg["inputs"][f"eval:{unit}"])
    x, y = data["x"], data["y"]
    with Stopwatch() as first:  # the calculator's construction included
        calc = AccuracyCalculator(include=METRICS_PML, k="max_bin_count")
        m = calc.get_accuracy(x, y)  # reference=None: query = reference
    with Stopwatch() as warm:
        calc.get_accuracy(x, y)
    metrics = {a: float(m[b]) for a, b in zip(METRICS_TFDML, METRICS_PML)}
    first_set = unit == cfg["eval_sets"][0]
    import_s = imported.seconds if first_set else None
    cases = _eval_cases(
        unit, first.seconds, warm.seconds, metrics, import_s, len(y)
    )
    return {"cases": cases, "mode": "AccuracyCalculator (faiss)"}


def _images(n, channels_first):
    """``n`` 64x64x1 noise images (:func:`_common.pk_images`), channels
    first for PyTorch: both frameworks get the same pixels."""
    x, _ = pk_images(64, n, 1)
    if channels_first:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def _first_and_warm(run):
    """(output, seconds of the first call, seconds of a second call)."""
    with Stopwatch() as first:
        out = run()
    with Stopwatch() as warm:
        run()
    return out, first.seconds, warm.seconds


def _embed_cases(n, first, warm):
    return [
        {"case": f"embed {n:,} images, first call", "seconds": first},
        {"case": f"embed {n:,} images, warm call", "seconds": warm},
    ]


def tfdml_embed(cfg, unit):
    import tensorflow as tf

    import tfdml.eval

    images = _images(cfg["embed_n"], False)
    encoder = vs_pml.tfdml_encoder(images.shape[1:])
    bs = cfg["embed_batch"]
    embed = getattr(tfdml.eval, "embed", None)
    if embed is None:  # older tfdml: the same loop by hand
        mode = "tf.function loop"
        fn = tf.function(lambda x: encoder(x, training=False)["embeddings"])

        def run():
            return np.concatenate(
                [
                    fn(tf.constant(images[i : i + bs])).numpy()
                    for i in range(0, len(images), bs)
                ]
            )
    else:
        mode = "tfdml.eval.embed"

        def run():
            out = embed(encoder, images, batch_size=bs)
            return out["embeddings"] if isinstance(out, dict) else out

    out, first, warm = _first_and_warm(run)
    assert out.shape == (len(images), DIM), out.shape
    return {"cases": _embed_cases(len(images), first, warm), "mode": mode}


def pml_embed(cfg, unit):
    import torch

    images = torch.from_numpy(_images(cfg["embed_n"], True))
    model = vs_pml.pml_model()
    model.eval()
    bs = cfg["embed_batch"]

    def run():
        with torch.no_grad():
            return torch.cat(
                [
                    torch.nn.functional.normalize(
                        model(images[i : i + bs]), dim=1
                    )
                    for i in range(0, len(images), bs)
                ]
            ).numpy()

    out, first, warm = _first_and_warm(run)
    assert out.shape == (len(images), DIM), out.shape
    return {
        "cases": _embed_cases(len(images), first, warm),
        "mode": "eval() + no_grad",
    }


def _train_cases(cfg, warmup_s, seconds, loss):
    b = cfg["train_p"] * K
    return [
        {
            "case": f"train warm-up ({cfg['train_warmup']} steps)",
            "seconds": warmup_s,
        },
        {
            "case": f"train step (B={b})",
            "seconds": seconds / cfg["train_steps"],
            "images": b,
            "last_loss": loss,
        },
    ]


def tfdml_train(cfg, unit):
    import keras
    import tensorflow as tf

    from tfdml.data import without_autotune
    from tfdml.models import DMLModel

    keras.utils.set_random_seed(0)
    x, y = pk_images(64, cfg["train_p"], K)
    # As train.py's pipeline: no autotune model thread, whose back-off sleep
    # stalled the end of fit (tfdml.data.without_autotune).
    ds = without_autotune(
        tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(2)
    )
    model = DMLModel(vs_pml.tfdml_encoder(x.shape[1:]))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss=vs_pml.tfdml_loss("ms")
    )
    with Stopwatch() as warmup:
        model.fit(
            ds,
            steps_per_epoch=cfg["train_warmup"],
            epochs=1,
            verbose=0,
            shuffle=False,
        )
    with Stopwatch() as steps:
        hist = model.fit(
            ds,
            steps_per_epoch=cfg["train_steps"],
            epochs=1,
            verbose=0,
            shuffle=False,
        )
    loss = float(hist.history["loss"][-1])
    return {
        "cases": _train_cases(cfg, warmup.seconds, steps.seconds, loss),
        "mode": f"DMLModel.fit, jit_compile={bool(model.jit_compile)}",
    }


def pml_train(cfg, unit):
    import torch

    torch.manual_seed(0)
    x = torch.from_numpy(_images(cfg["train_p"] * K, True))
    y = torch.from_numpy(pk_labels(cfg["train_p"], K).astype(np.int64))
    model = vs_pml.pml_model()
    loss_fn, miner = vs_pml.pml_loss("ms")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step():
        emb = torch.nn.functional.normalize(model(x), dim=1)
        loss = loss_fn(emb, y, miner(emb, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    with Stopwatch() as warmup:
        for _ in range(cfg["train_warmup"]):
            step()
    with Stopwatch() as steps:
        for _ in range(cfg["train_steps"]):
            loss = step()
    return {
        "cases": _train_cases(cfg, warmup.seconds, steps.seconds, float(loss)),
        "mode": "eager loop",
    }


WORKERS = {
    ("tfdml", "losses"): tfdml_losses,
    ("pml", "losses"): pml_losses,
    ("tfdml", "eval"): tfdml_eval,
    ("pml", "eval"): pml_eval,
    ("tfdml", "embed"): tfdml_embed,
    ("pml", "embed"): pml_embed,
    ("tfdml", "train"): tfdml_train,
    ("pml", "train"): pml_train,
}


def worker_main(args):
    with open(args.config) as f:
        cfg = json.load(f)
    load = os.getloadavg()[0]
    with Stopwatch() as wall:
        if cfg.get("threads"):
            if args.worker == "pml":
                import torch

                torch.set_num_threads(cfg["threads"])
            else:
                import tensorflow as tf

                tf.config.threading.set_intra_op_parallelism_threads(
                    cfg["threads"]
                )
        out = WORKERS[args.worker, args.part](cfg, args.unit)
    out["wall_s"] = wall.seconds
    out["load_start"], out["load_end"] = load, os.getloadavg()[0]
    out["versions"] = (
        _versions_tfdml() if args.worker == "tfdml" else _versions_pml()
    )
    with open(args.worker_out, "w") as f:
        json.dump(out, f)
    return 0


# -- the driver --------------------------------------------------------------


def _run_worker(python, fw, part, unit, config, out, threads):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # tfdml importable without an install (the PML worker imports none of it)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (ROOT, env.get("PYTHONPATH")) if p
    )
    cmd = [
        python,
        os.path.abspath(__file__),
        "--worker",
        fw,
        "--part",
        part,
        "--unit",
        unit,
        "--config",
        config,
        "--worker-out",
        out,
    ]
    proc = subprocess.run(
        cmd, env=env, cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{fw} worker for {part}/{unit} failed")
    with open(out) as f:
        return json.load(f)


def machine():
    return {
        "cpu": cpu_model() or platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": cpu_count(),
    }


def units(cfg):
    out = []
    for part in cfg["parts"]:
        if part == "eval":
            out += [("eval", name) for name in cfg["eval_sets"]]
        else:
            out.append((part, "all"))
    return out


def _fmt(t):
    if t is None:
        return "-"
    return f"{t:.3g}" if t < 100 else f"{t:.0f}"


def combine(records, frameworks, rounds):
    """Rows per (part, case): per-round seconds per framework, ratios and
    medians; ``records``: (round, framework, part, unit, worker result)."""
    rows, modes = {}, {}
    for r, fw, part, unit, res in records:
        modes.setdefault((part, fw), res.get("mode"))
        for c in res["cases"]:
            row = rows.setdefault(
                (part, c["case"]),
                {
                    "part": part,
                    "case": c["case"],
                    **{fw_: [None] * rounds for fw_ in frameworks},
                    "images": c.get("images"),
                    "metrics": {},
                },
            )
            row[fw][r] = c["seconds"]
            if "metrics" in c:
                row["metrics"].setdefault(fw, []).append(c["metrics"])
    out = []
    for row in rows.values():
        for fw in frameworks:
            got = [t for t in row[fw] if t is not None]
            row[f"{fw}_median"] = statistics.median(got) if got else None
        if "pml" in frameworks:
            ratios = [
                a / b if a is not None and b else None
                for a, b in zip(row["tfdml"], row["pml"])
            ]
            row["ratio"] = ratios
            got = [x for x in ratios if x is not None]
            row["median_ratio"] = statistics.median(got) if got else None
        row["mode"] = {fw: modes.get((row["part"], fw)) for fw in frameworks}
        out.append(row)
    return out


def agreement(rows):
    """Eval cases where tfdml and PML metrics differ by more than 1e-4."""
    bad = []
    for row in rows:
        m = row["metrics"]
        if "tfdml" not in m or "pml" not in m:
            continue
        for a, b in zip(m["tfdml"], m["pml"]):
            for k in METRICS_TFDML:
                if abs(a[k] - b[k]) > TOLERANCE:
                    bad.append(
                        f"{row['case']}: {k} tfdml {a[k]:.6f} vs PML {b[k]:.6f}"
                    )
    return sorted(set(bad))


def _note(row, frameworks):
    if row["images"]:
        parts = [
            f"{LABELS[fw]} {row['images'] / row[f'{fw}_median']:.0f} img/s"
            for fw in frameworks
            if row[f"{fw}_median"]
        ]
        return ", ".join(parts)
    if row["case"].startswith("embed"):
        n = int(row["case"].split()[1].replace(",", ""))
        return ", ".join(
            f"{LABELS[fw]} {n / row[f'{fw}_median']:.0f} img/s"
            for fw in frameworks
            if row[f"{fw}_median"]
        )
    if row["metrics"] and not row["case"] == "import":
        cells = []
        for fw in frameworks:
            if fw in row["metrics"]:
                m = row["metrics"][fw][0]
                cells.append(f"{LABELS[fw]} MAP@R {m['map@r']:.4f}")
        return ", ".join(cells)
    return ""


COLUMNS = (
    "part",
    "case",
    "tfdml s per round",
    "PML s per round",
    "ratio per round",
    "tfdml median s",
    "PML median s",
    "median ratio",
    "notes",
)


def markdown(rows, frameworks):
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:

        def per_round(values):
            return " / ".join(_fmt(v) for v in values)

        pml = "pml" in frameworks
        cells = [
            row["part"],
            row["case"],
            per_round(row["tfdml"]),
            per_round(row["pml"]) if pml else "-",
            " / ".join(f"{v:.2f}" if v else "-" for v in row["ratio"])
            if pml
            else "-",
            _fmt(row["tfdml_median"]),
            _fmt(row["pml_median"]) if pml else "-",
            f"{row['median_ratio']:.2f}"
            if pml and row["median_ratio"]
            else "-",
            _note(row, frameworks),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(meta, frameworks):
    m, v = meta["machine"], meta["versions"]
    tf_v = v.get("tfdml", {})
    pml_v = v.get("pml", {})
    lines = [
        f"tfdml vs PML speed, {meta['date']}. Machine: {m['cpu']}, "
        f"{m['cores']} cores ({m['usable_cores']} usable), {meta['platform']}."
        f" Load average (1 min) before {meta['load_before'][0]:.2f}, after "
        f"{meta['load_after'][0]:.2f} (5 min: {meta['load_before'][1]:.2f} / "
        f"{meta['load_after'][1]:.2f}).",
        f"TensorFlow {tf_v.get('tensorflow')}, Keras {tf_v.get('keras')}, "
        f"tfdml {tf_v.get('tfdml')}; oneDNN built in: "
        f"{tf_v.get('onednn_built')}, TF_ENABLE_ONEDNN_OPTS="
        f"{tf_v.get('TF_ENABLE_ONEDNN_OPTS')}."
        + (
            f" PyTorch {pml_v.get('torch')}, PML "
            f"{pml_v.get('pytorch_metric_learning')}, faiss "
            f"{pml_v.get('faiss')} ({pml_v.get('torch_threads')} threads)."
            if "pml" in frameworks
            else " PML not run (--skip-pml)."
        ),
        f"{meta['rounds']} round(s), fresh process per framework and part, "
        "first framework alternating per round"
        + (" (--quick sizes)" if meta["quick"] else "")
        + ". Ratio = tfdml time / PML time (< 1: tfdml faster); median "
        "ratio = median of the per-round ratios.",
        "Modes: "
        + "; ".join(
            f"{part} {LABELS[fw]}: {mode}"
            for (part, fw), mode in meta["modes"].items()
        )
        + ".",
    ]
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="vs_pml.py --speed", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--parts", default=",".join(PARTS), help="of " + ",".join(PARTS)
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny sizes")
    p.add_argument(
        "--pml-python",
        default=None,
        help="the PML venv's python (default: .venv-pml/bin/python if any)",
    )
    p.add_argument("--skip-pml", action="store_true", help="tfdml side only")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument(
        "--name", default=None, help="file stem (vs_pml_speed[_quick])"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="per worker (0: default)"
    )
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--batch-sizes", default=None, help="128,512,2048")
    p.add_argument("--repeats", type=int, default=None, help="10 (quick 3)")
    p.add_argument("--memory-size", type=int, default=8192)
    p.add_argument(
        "--eval-200k",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also the 200k-point sets (default: on, off with --quick)",
    )
    p.add_argument("--eval-sets", default=None, help="hard,easy[,200k-...]")
    p.add_argument("--eval-classes", type=int, default=None, help="500 (50)")
    p.add_argument("--embed-n", type=int, default=None, help="28538 (512)")
    p.add_argument("--embed-batch", type=int, default=256)
    p.add_argument("--train-p", type=int, default=32, help="classes/batch")
    p.add_argument("--train-warmup", type=int, default=None, help="5 (1)")
    p.add_argument("--train-steps", type=int, default=None, help="30 (2)")
    # internal: one worker in its own process
    hide = argparse.SUPPRESS
    p.add_argument("--worker", choices=["tfdml", "pml"], help=hide)
    p.add_argument("--part", choices=PARTS, help=hide)
    p.add_argument("--unit", help=hide)
    p.add_argument("--config", help=hide)
    p.add_argument("--worker-out", help=hide)
    return p.parse_args(argv)


def _config(args):
    q = args.quick
    parts = [s for s in args.parts.split(",") if s]
    for part in parts:
        if part not in PARTS:
            raise SystemExit(f"--parts: unknown part {part!r} (of {PARTS})")
    losses = [s for s in args.losses.split(",") if s]
    for name in losses:
        if name not in LOSSES:
            raise SystemExit(f"--losses: unknown loss {name!r} (of {LOSSES})")
    big = args.eval_200k if args.eval_200k is not None else not q
    sets = args.eval_sets or "hard,easy" + (
        ",200k-clustered,200k-random" if big else ""
    )
    sets = [s for s in sets.split(",") if s]
    for name in sets:
        if name not in EVAL_SETS:
            raise SystemExit(f"--eval-sets: unknown set {name!r}")
    batch = args.batch_sizes or ("128" if q else "128,512,2048")
    return {
        "parts": [p for p in PARTS if p in parts],
        "losses": losses,
        "batch_sizes": [int(b) for b in batch.split(",") if b],
        "repeats": args.repeats or (3 if q else 10),
        "memory_size": args.memory_size,
        "eval_sets": sets,
        "eval_classes": args.eval_classes or (50 if q else 500),
        "embed_n": args.embed_n or (512 if q else 28_538),
        "embed_batch": args.embed_batch,
        "train_p": args.train_p,
        "train_warmup": args.train_warmup or (1 if q else 5),
        "train_steps": args.train_steps or (2 if q else 30),
        "threads": args.threads,
    }


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return worker_main(args)
    cfg = _config(args)
    frameworks = ["tfdml"] if args.skip_pml else ["tfdml", "pml"]
    pml_python = args.pml_python
    if not args.skip_pml:
        default = os.path.join(ROOT, ".venv-pml", "bin", "python")
        if pml_python is None and os.path.exists(default):
            pml_python = default
        if pml_python is None:
            raise SystemExit("pass --pml-python PATH or --skip-pml")
        vs_pml.pml_version(pml_python)  # a clear error when PML is missing
    pythons = {"tfdml": sys.executable, "pml": pml_python}
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "platform": platform.platform(),
        "quick": args.quick,
        "rounds": args.rounds,
        "config": cfg,
        "load_before": list(os.getloadavg()),
    }
    records = []
    with tempfile.TemporaryDirectory(prefix="vs_pml_speed_") as work:
        cfg["inputs"] = write_inputs(cfg, work)
        config = os.path.join(work, "config.json")
        with open(config, "w") as f:
            json.dump(cfg, f)
        for r in range(args.rounds):
            order = frameworks if r % 2 == 0 else frameworks[::-1]
            for part, unit in units(cfg):
                for fw in order:
                    out = os.path.join(work, f"{fw}_{part}_{unit}_{r}.json")
                    res = _run_worker(
                        pythons[fw], fw, part, unit, config, out, args.threads
                    )
                    records.append((r, fw, part, unit, res))
                    print(
                        f"round {r + 1}/{args.rounds} {part}/{unit} {fw}: "
                        + ", ".join(
                            f"{c['case']} {_fmt(c['seconds'])} s"
                            for c in res["cases"]
                        ),
                        flush=True,
                    )
    del cfg["inputs"]
    meta["load_after"] = list(os.getloadavg())
    meta["versions"] = {fw: res["versions"] for _, fw, _, _, res in records}
    meta["modes"] = {}
    for _, fw, part, _, res in records:
        meta["modes"].setdefault((part, fw), res.get("mode"))
    rows = combine(records, frameworks, args.rounds)
    bad = agreement(rows)
    text = header(meta, frameworks) + "\n\n" + markdown(rows, frameworks)
    if bad:
        text += "\n\nMETRIC MISMATCH (> 1e-4), a bug:\n" + "\n".join(bad)
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    name = args.name or ("vs_pml_speed_quick" if args.quick else "vs_pml_speed")
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(text + "\n")
    meta["modes"] = {f"{p}/{fw}": m for (p, fw), m in meta["modes"].items()}
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(
            {
                "meta": meta,
                "columns": list(COLUMNS),
                "rows": rows,
                "mismatches": bad,
                "workers": [
                    {"round": r, "framework": fw, "part": p, "unit": u, **res}
                    for r, fw, p, u, res in records
                ],
            },
            f,
            indent=2,
        )
    if bad:
        print("tfdml and PML metrics disagree: see above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
