"""tfdml.validation: the one home of argument checks (issue 14).

Every check names the argument, refuses NaN, None, bools and strings with a
``ValueError`` (never a ``TypeError`` from a comparison, never a silent pass),
and the layers that use it refuse the same values.
"""

import math

import keras
import numpy as np
import pytest

from tfdml import validation
from tfdml.losses import base as loss_base
from tfdml.meta.mmsi import MMSIModel
from tfdml.mining.multi_similarity import MultiSimilarityMiner
from tfdml.mining.semi_hard import SemiHardMiner
from tfdml.models.embedding import GeneralizedMeanPooling

BAD = [None, math.nan, np.float32("nan"), True, "0.1", [0.1]]


@pytest.mark.parametrize("value", BAD + [-1.0, -1e-9])
def test_check_non_negative_refuses(value):
    with pytest.raises(ValueError, match="`margin` must be >= 0"):
        validation.check_non_negative("margin", value)


@pytest.mark.parametrize("value", BAD + [0, 0.0, -2])
def test_check_positive_refuses(value):
    with pytest.raises(ValueError, match="`alpha` must be > 0"):
        validation.check_positive("alpha", value)


@pytest.mark.parametrize(
    "value, expected", [(0, 0.0), (np.float32(0.5), 0.5), (np.int64(3), 3.0)]
)
def test_numbers_pass_as_float(value, expected):
    got = validation.check_non_negative("x", value)
    assert isinstance(got, float) and got == expected
    if expected > 0:
        assert validation.check_positive("x", value) == expected


def test_check_choice_names_the_choices_even_when_unsortable():
    with pytest.raises(ValueError, match=r"`form` must be one of \['a', 'b'\]"):
        validation.check_choice("form", "c", ("b", "a"))
    with pytest.raises(ValueError, match="`mode` must be one of"):
        validation.check_choice("mode", "x", (None, "a"))
    assert validation.check_choice("form", "a", ("a", "b")) == "a"


@pytest.mark.parametrize("value", [None, 1.0, True, "2", 0])
def test_check_int_refuses(value):
    with pytest.raises(ValueError, match="`k` must be an integer >= 1"):
        validation.check_int("k", value)


def test_losses_base_reexports_the_same_functions():
    # Old import path keeps working and is the same object (one home).
    assert loss_base.check_positive is validation.check_positive
    assert loss_base.check_non_negative is validation.check_non_negative
    assert loss_base.check_choice is validation.check_choice


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda v: MultiSimilarityMiner(epsilon=v), "epsilon"),
        (lambda v: SemiHardMiner(margin=v), "margin"),
        (lambda v: GeneralizedMeanPooling(p=v), "p"),
    ],
)
def test_layers_refuse_nan(build, name):
    # These compared `value < 0` / `<= 0`, which NaN passes.
    with pytest.raises(ValueError, match=f"`{name}` must be"):
        build(math.nan)


def test_mmsi_refuses_a_nan_virtual_lr_before_building():
    with pytest.raises(ValueError, match="`virtual_lr` must be > 0"):
        MMSIModel(
            keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]),
            num_classes=2,
            virtual_lr=math.nan,
        )
