"""qareg-reg (the regularizer alone) and qareg-ste (snapped forward passes alone): qareg's
machinery with its two parts switched on one at a time."""

from contextlib import nullcontext

import torch

import qareg
from qareg.methods import Progress, create_method
from qareg.straight_through import straight_through

HALFWAY = Progress(step=50, total_steps=100, epoch=1, epochs=1)
END = Progress(step=99, total_steps=100, epoch=1, epochs=1)


def prepared(name, bits=1):
    torch.manual_seed(0)
    model, method = qareg.create_model("lenet5", 10, 1, 28), create_method(name)
    method.prepare(model, bits, seed=0)
    return model, method


def test_the_regularizer_alone_never_snaps_the_forward_pass_and_ramps_lambda_to_1000():
    model, method = prepared("qareg-reg")
    assert isinstance(method.forward_context(model, END), nullcontext)
    assert method.lam(HALFWAY) == 500.0 and method.lam(END) == 990.0
    assert method.regularizer(model, torch.zeros(()), HALFWAY) > 0


def test_the_snapped_forward_alone_has_no_penalty():
    model, method = prepared("qareg-ste")
    assert method.lam(HALFWAY) == 0.0 and method.lam(END) == 0.0
    context = method.forward_context(model, HALFWAY)
    assert type(context) is type(straight_through(model))


def test_options_record_the_k_the_codebooks_have():
    for name in ("qareg", "qareg-reg", "qareg-ste"):
        model, method = prepared(name, bits=1)
        assert method.options()["k"] == 2
        assert {t.codebook.k for t in qareg.quantized_tensors(model)} == {2}
