"""The harness every method shares: what happens when a method is used out of order."""

import pytest
import torch

import qareg
from qareg.errors import ConfigError, NotPreparedError
from qareg.methods import METHODS, create_method, list_methods

BUILT_IN = [name for name in list_methods() if METHODS.get(name).__module__.startswith("qareg.")]
TRAINING_TIME = [n for n in BUILT_IN if not METHODS.get(n).post_training]


def lenet():
    torch.manual_seed(0)
    return qareg.create_model("lenet5", 10, 1, 28)


@pytest.mark.parametrize("name", TRAINING_TIME)
def test_converting_an_unprepared_model_says_to_prepare_it(name):
    with pytest.raises(NotPreparedError, match="prepare"):
        create_method(name).convert(lenet(), bits=2)


@pytest.mark.parametrize("name", ["lsq", "dkm"])
def test_converting_at_other_bits_than_prepared_is_refused(name):
    model, method = lenet(), create_method(name)
    method.prepare(model, 2, seed=0)
    with pytest.raises(ConfigError, match="prepared for 2 bits"):
        method.convert(model, bits=3)


def test_the_reference_does_not_quantize():
    with pytest.raises(ConfigError, match="'fp' does not quantize"):
        create_method("fp").convert(lenet(), bits=2)
    with pytest.raises(ConfigError, match="'fp' does not quantize; drop bits=2"):
        create_method("fp").resolve_bits(2)


@pytest.mark.parametrize("name", [n for n in BUILT_IN if METHODS.get(n).quantizes])
def test_every_quantizing_method_converts_a_prepared_model_to_at_most_2_bits_values(name):
    model, method = lenet(), create_method(name)
    method.prepare(model, None if method.post_training else 2, seed=0)
    report = method.convert(model, bits=2)
    assert all(t.distinct <= 4 for t in report.tensors)


def test_registering_with_an_unknown_attribute_is_refused():
    from qareg.methods import Method, register_method

    with pytest.raises(ConfigError, match="has no attribute 'post_trainig'"):
        @register_method("typo", post_trainig=True)
        class Typo(Method):
            pass
