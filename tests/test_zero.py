"""A representative pinned at exactly zero: the codebook keeps it there, convert and the
file store exact zeros, and the report counts them."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qareg
from qareg.codebook import Codebook
from qareg.compress import load_compressed, save_compressed
from qareg.methods import create_method


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=2, max_size=12))
def test_projection_keeps_one_exact_zero_and_the_order(values):
    codebook = Codebook(len(values), zero=True)
    with torch.no_grad():
        codebook.normalized.copy_(torch.tensor(values))
    codebook.project_()
    c = codebook.normalized.detach()
    assert int((c == 0).sum()) == 1  # exactly one representative at exactly zero
    assert torch.all(c[1:] > c[:-1])  # sorted and distinct
    codebook.project_()
    assert torch.equal(codebook.normalized.detach(), c)  # a projection is idempotent


def test_a_codebook_without_zero_moves_nothing_to_zero():
    torch.manual_seed(0)
    w = torch.randn(500) * 0.1 + 0.05
    assert not bool((Codebook.fit(w, 4).representatives() == 0).any())
    pinned = Codebook.fit(w, 4, zero=True).representatives()
    assert int((pinned == 0).sum()) == 1


def test_qareg_with_zero_prunes_and_the_file_keeps_exact_zeros(tmp_path):
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    method = create_method("qareg", {"zero": True})
    method.prepare(model, 2, seed=0)
    with torch.no_grad():  # an optimiser step that moved the pinned value off zero
        for t in qareg.quantize.quantized_tensors(model):
            t.codebook.normalized.add_(0.01)
    report = qareg.convert(model)
    assert 0 < report.sparsity < 1
    for t, r in zip(qareg.quantize.quantized_tensors(model), report.tensors, strict=True):
        assert r.zeros == int((t.weight == 0).sum()) > 0
    assert "zeros" in report.format_table()
    save_compressed(model, tmp_path / "m.qz")
    loaded = load_compressed(tmp_path / "m.qz")
    zeros = sum(int((p == 0).sum()) for n, p in loaded.named_parameters() if "weight" in n)
    assert zeros == sum(r.zeros for r in report.tensors)
