"""No tf.data autotune model thread in the passes tfdml makes (issue 15).

With autotune on, destroying an iterator waits for the model thread's
back-off sleep (10 ms doubling up to 60 s): a finite pass (an ``embed``
call, the end of ``fit``, a BatchNorm recalibration, an IAA refresh)
stalled until the next power-of-two boundary (``fit`` of 12 s of steps
returned after 20.48 s). Timing is not tested here (load-dependent); the
property is: every dataset tfdml builds, and every dataset tfdml iterates,
has ``autotune.enabled == False``.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdml import data
from tfdml.eval import embed
from tfdml.models import recalibrate_batchnorm


@pytest.fixture
def iterated(monkeypatch):
    """The ``autotune.enabled`` option of every dataset iterated."""
    seen = []
    original = tf.data.Dataset.__iter__

    def spy(self):
        seen.append(self.options().autotune.enabled)
        return original(self)

    monkeypatch.setattr(tf.data.Dataset, "__iter__", spy)
    return seen


def _source():
    return data.SyntheticSource(
        num_classes=6, examples_per_class=(4, 4), size=8, seed=0
    )


def test_without_autotune_turns_the_option_off():
    ds = tf.data.Dataset.range(4).prefetch(tf.data.AUTOTUNE)
    assert ds.options().autotune.enabled is not False
    assert data.without_autotune(ds).options().autotune.enabled is False
    assert list(data.without_autotune(ds).as_numpy_iterator()) == [0, 1, 2, 3]


def test_built_pipelines_have_no_autotune():
    src = _source()
    train = data.balanced_dataset(
        src, src.classes, 3, 2, image_size=8, channels=1
    )
    ev = data.eval_dataset(src, src.classes, 5, image_size=8, channels=1)
    assert train.options().autotune.enabled is False
    assert ev.options().autotune.enabled is False


def _bn_model():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(3)(inputs)
    h = keras.layers.BatchNormalization()(h)
    return keras.Model(inputs, h)


def test_embed_and_recalibration_iterate_without_autotune(iterated):
    model = _bn_model()
    x = np.random.default_rng(0).normal(size=(10, 4)).astype("float32")
    embed(model, x, batch_size=4)
    embed(model, tf.data.Dataset.from_tensor_slices(x).batch(4))
    recalibrate_batchnorm(
        model, tf.data.Dataset.from_tensor_slices(x).batch(5), num_batches=2
    )
    assert iterated and all(v is False for v in iterated), iterated
