"""What the benchmark scripts share: the machine header, timers, P x K data.

Imported by the scripts in this folder (``sys.path`` holds the script's
folder when it runs; the scripts that the tests load by path insert it).
Nothing here imports TensorFlow at module level, so a script can still turn
oneDNN on (``tfdml._cpu.enable_onednn``) before TensorFlow starts.
"""

import datetime
import os
import platform
import time

import numpy as np


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()``
    elsewhere)."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def cpu_count():
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def environment():
    """The machine header of a results file (``quality_*.json`` / ``.md``)."""
    import keras
    import tensorflow as tf

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "machine": f"{platform.machine()} {cpu_model()}, "
        f"{cpu_count()} CPU cores visible, {platform.system()} "
        f"{platform.release()}".replace(" ,", ","),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }


def machine_line():
    """``TF x, Keras y, <devices>, N CPU cores, <cpu>``: the tail of the
    one-line header the timing scripts print above their tables."""
    import keras
    import tensorflow as tf

    devices = ", ".join(d.device_type for d in tf.config.list_logical_devices())
    return (
        f"TF {tf.__version__}, Keras {keras.__version__}, {devices}, "
        f"{os.cpu_count()} CPU cores, {platform.processor() or 'cpu'}"
    )


def fetch(out):
    """Calls ``.numpy()`` on every tensor of a (nested) output so that
    asynchronous work is counted. Plain Python: the PML workers of
    ``speed_pml.py`` time with it and never import TensorFlow."""
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            fetch(item)
    elif hasattr(out, "numpy"):
        out.numpy()


def timed_calls(fn, args=(), repeats=10, warmup=1):
    """``(median s, first s)``: the median wall time of ``fn(*args)`` over
    ``repeats`` calls after ``warmup`` calls (trace / compile), and the
    time of the first call (what a user pays once). Outputs are fetched
    (:func:`fetch`)."""
    with Stopwatch() as first:
        fetch(fn(*args))
    for _ in range(warmup - 1):
        fetch(fn(*args))
    times = []
    for _ in range(repeats):
        with Stopwatch() as t:
            fetch(fn(*args))
        times.append(t.seconds)
    return float(np.median(times)), first.seconds


def median_time(fn, args, repeats):
    """Median wall time (s) of ``fn(*args)`` over ``repeats`` calls after
    one warm-up call (:func:`timed_calls`)."""
    return timed_calls(fn, args, repeats)[0]


class Stopwatch:
    """``with Stopwatch() as t: ...``; then ``t.seconds``."""

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start
        return False


def pk_labels(classes, per_class):
    """``[classes * per_class]`` int32: ``per_class`` rows of each class,
    class-major (one P x K batch)."""
    return np.repeat(np.arange(classes), per_class).astype(np.int32)


def pk_images(size, classes, per_class, seed=0, channels=1):
    """One P x K batch of uniform-noise images ``[P*K, size, size, c]``
    float32 in [0, 1) and its labels (:func:`pk_labels`)."""
    rng = np.random.default_rng(seed)
    x = rng.random((classes * per_class, size, size, channels))
    return x.astype(np.float32), pk_labels(classes, per_class)


def pk_batches(labels, classes, steps, p, k, seed):
    """``[steps, p * k]`` indices into ``labels``: each row draws ``p``
    distinct classes of ``classes`` (those with >= ``k`` images) and ``k``
    distinct images of each, class-major; seeded."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pools = {int(c): np.flatnonzero(labels == c) for c in classes}
    eligible = np.array([c for c in classes if len(pools[int(c)]) >= k])
    if len(eligible) < p:
        raise ValueError(
            f"p={p} classes per batch, but only {len(eligible)} classes have "
            f"k={k} images or more."
        )
    out = np.empty((steps, p * k), np.int64)
    for s in range(steps):
        chosen = rng.choice(eligible, size=p, replace=False)
        out[s] = np.concatenate(
            [rng.choice(pools[int(c)], size=k, replace=False) for c in chosen]
        )
    return out
