import json

import pytest
import torch

import qareg
from qareg.config import TrainConfig
from qareg.engine import TrainingDiverged, evaluate, make_optimizer, train
from qareg.methods.qareg import QaregConfig, QaregMethod
from qareg.quantize import quantized_tensors


def lenet(seed=0):
    torch.manual_seed(seed)
    return qareg.create_model("lenet5", 10, 1, 28)


def test_full_precision_training_learns_and_logs_every_epoch(tiny_splits, tmp_path):
    model = lenet()
    before = evaluate(model, tiny_splits.val, tiny_splits)
    metrics = tmp_path / "metrics.jsonl"
    config = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    history = train(model, tiny_splits, config, metrics_path=metrics, progress=False)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert lines[-1]["val_accuracy"] == history[-1].val_accuracy
    assert lines[-1]["val_accuracy_quantized"] is None
    assert history[-1].val_accuracy > max(60.0, before + 30)
    assert history[-1].task_loss < history[0].task_loss


def test_regularized_training_clusters_the_weights(tiny_splits):
    model = lenet()
    train(model, tiny_splits, TrainConfig(epochs=1, batch_size=32, lr=0.05), progress=False)
    qareg.prepare(model, k=4)
    start = qareg.penalty(model).item()
    config = TrainConfig(epochs=3, batch_size=32, optimizer="adam", lr=5e-3)
    history = train(model, tiny_splits, config, QaregMethod(QaregConfig(k=4, lam=1000.0, ramp=0.5)),
                    progress=False)
    assert history[0].penalty > history[1].penalty > history[2].penalty
    assert qareg.penalty(model).item() < 1e-3 * start
    assert history[-1].lam == 1000.0
    # after clustering, snapping costs (almost) nothing
    assert history[-1].val_accuracy_quantized >= history[-1].val_accuracy - 2.0


def test_codebooks_get_their_own_group_without_weight_decay(tiny_splits):
    model = qareg.prepare(lenet(), k=4)
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.1, lr=0.2),
                               QaregMethod(QaregConfig(codebook_lr_scale=0.5)))
    weights, codebooks = optimizer.param_groups
    assert weights["weight_decay"] == 0.1 and codebooks["weight_decay"] == 0.0
    assert codebooks["lr"] == pytest.approx(0.1)
    assert {id(p) for p in codebooks["params"]} == {
        id(t.codebook.normalized) for t in quantized_tensors(model)
    }


def test_training_stops_with_a_clear_message_when_the_loss_diverges(tiny_splits):
    model = lenet()
    with torch.no_grad():
        model.classifier[0].weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="became nan in epoch 1"):
        train(model, tiny_splits, TrainConfig(epochs=1, batch_size=64), progress=False)


def test_a_method_needs_a_prepared_model(tiny_splits):
    with pytest.raises(qareg.NotPreparedError, match="no codebooks: call qareg.prepare"):
        train(lenet(), tiny_splits, TrainConfig(epochs=1), QaregMethod(), progress=False)


def test_bf16_autocast_trains_and_keeps_parameters_in_float32(tiny_splits):
    model = qareg.prepare(lenet(), k=4)
    config = TrainConfig(epochs=2, batch_size=32, optimizer="adam", lr=2e-3, precision="bf16")
    history = train(model, tiny_splits, config, QaregMethod(QaregConfig(k=4, lam=10.0)),
                    progress=False)
    assert history[-1].val_accuracy > 60.0
    assert history[-1].task_loss < history[0].task_loss
    assert all(p.dtype == torch.float32 for p in model.parameters())
