"""qareg bench: every run appends one complete row; finished runs are never rerun."""

import json

import pytest

from qareg.bench import FP_BITS, Bench, BenchConfig
from qareg.cli import main
from qareg.errors import ConfigError

REQUIRED = ("method", "bits", "seed", "accuracy", "bits_per_weight", "file_bytes",
            "stored_bits_per_weight", "train_seconds", "peak_memory_bytes", "config",
            "git_commit")
LENET5_QUANTIZED = 61470  # weights of its Conv and Linear layers


def tiny_bench(fashion_dir, **overrides) -> BenchConfig:
    values = dict(model="lenet5", methods=("ptq-kmeans", "qareg"), bits=(1, 2), seeds=(0,),
                  pretrain_epochs=1, epochs=1, batch_size=64, val_size=200,
                  data_dir=str(fashion_dir), augment=False)
    values.update(overrides)
    return BenchConfig(**values)


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(fashion_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.jsonl"
    Bench(tiny_bench(fashion_dir), out, progress=False).run()
    return out


def test_every_planned_run_writes_one_complete_row(finished):
    rows = rows_of(finished)
    keys = {(r["method"], r["bits"], r["seed"]) for r in rows}
    assert keys == {("fp", FP_BITS, 0), ("ptq-kmeans", 1, 0), ("ptq-kmeans", 2, 0),
                    ("qareg", 1, 0), ("qareg", 2, 0)}
    assert len(rows) == len(keys)
    for row in rows:
        for key in REQUIRED:
            assert key in row, (row["method"], key)
        assert 0 <= row["accuracy"] <= 100
    quantized = [r for r in rows if r["method"] != "fp"]
    for row in quantized:
        assert row["bits_per_weight"] == row["bits"]  # k = 2**bits, every tensor
        assert row["distinct_values"] <= 2 ** row["bits"]
        assert row["compression_ratio"] > 1
        layer = next(iter(row["histograms"].values()))
        assert len(layer["representatives"]) <= 2 ** row["bits"]
        assert row["k"] == 2 ** row["bits"]
        assert (row["index_bytes"] + row["codebook_bytes"] + row["raw_bytes"]
                + row["header_bytes"]) == row["file_bytes"]
        assert row["stored_bits_per_weight"] == pytest.approx(
            8 * row["file_bytes"] / LENET5_QUANTIZED)
        assert row["index_bytes"] <= LENET5_QUANTIZED * row["bits"] / 8 + 64
    qareg_rows = [r for r in quantized if r["method"] == "qareg"]
    assert [r["config"]["k"] for r in qareg_rows] == [2, 4]  # the k it had, not the default
    fp = next(r for r in rows if r["method"] == "fp")
    assert fp["bits_per_weight"] == FP_BITS
    # the learned network beats snapping the full-precision one at 1 bit
    acc = {(r["method"], r["bits"]): r["accuracy"] for r in rows}
    assert acc[("qareg", 1)] > acc[("ptq-kmeans", 1)]


def test_a_finished_bench_reruns_nothing(finished, fashion_dir):
    before = finished.read_text()
    assert Bench(tiny_bench(fashion_dir), finished, progress=False).run() == []
    assert finished.read_text() == before


def test_an_interrupted_bench_runs_only_what_is_missing(finished, fashion_dir, tmp_path):
    out = tmp_path / "partial.jsonl"
    lines = finished.read_text().splitlines()
    dropped = json.loads(lines[2])
    out.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    cache = finished.with_name(finished.name + ".cache")  # reuse the pretrained networks
    (tmp_path / "partial.jsonl.cache").symlink_to(cache, target_is_directory=True)
    written = Bench(tiny_bench(fashion_dir), out, progress=False).run()
    assert [(r["method"], r["bits"], r["seed"]) for r in written] == [
        (dropped["method"], dropped["bits"], dropped["seed"])]
    assert written[0]["accuracy"] == dropped["accuracy"]  # same cached network, same snap
    assert len(rows_of(out)) == len(lines)


def test_a_results_file_of_another_recipe_is_refused(finished, fashion_dir):
    before = finished.read_text()
    with pytest.raises(ConfigError, match="another recipe"):
        Bench(tiny_bench(fashion_dir, epochs=2), finished, progress=False)
    assert finished.read_text() == before


@pytest.mark.parametrize("overrides, message", [
    ({"methods": ("qareg", "nope")}, "unknown 'nope'"),
    ({"methods": ()}, "non-empty list"),
    ({"bits": (0,)}, "bits must be an integer from 1 to 8"),
    ({"bits": (2, 2)}, "must not repeat"),
    ({"seeds": (-1,)}, "seed must be an integer >= 0"),
    ({"epochs": -1}, "epochs must be an integer >= 0"),
    ({"method_configs": {"nope": {}}}, "unknown method 'nope'"),
    ({"method_configs": {"qareg": {"lamda": 1}}}, "unknown key lamda"),
    ({"method_configs": {"qareg": {"lam": -1}}}, "lam must be a number >= 0"),
    ({"variants": {"qareg": {"method": "qareg"}}}, "must be a new name"),
    ({"variants": {"q0": {"zero": True}}}, "must give method: one of"),
    ({"variants": {"q0": {"method": "qareg", "zero": 1}}}, "zero"),
    ({"methods": ("q0",), "variants": {"q1": {"method": "qareg"}}}, "unknown 'q0'"),
])
def test_bad_bench_configs_name_the_value(fashion_dir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_bench(fashion_dir, **overrides)


def test_cli_bench_then_report(finished, fashion_dir, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    out.write_text(finished.read_text())  # already complete: the CLI reruns nothing
    (tmp_path / "cli.jsonl.cache").symlink_to(finished.with_name(finished.name + ".cache"),
                                              target_is_directory=True)
    args = ["bench", "--model", "lenet5", "--methods", "ptq-kmeans", "qareg", "--bits", "1",
            "2", "--seeds", "0", "--pretrain-epochs", "1", "--epochs", "1", "--batch-size",
            "64", "--val-size", "200", "--no-augment", "--data-dir", str(fashion_dir),
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "5 already in" in capsys.readouterr().out
    assert main(["report", str(out), "--out-dir", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert "qareg" in printed and "ptq-kmeans" in printed
    assert (tmp_path / "report" / "report.md").is_file()
    assert main(["bench", "--methods", "nope", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert not (tmp_path / "x.jsonl").exists()


def test_rows_give_each_tensor_s_k(finished):
    for row in rows_of(finished):
        if row["method"] == "fp":
            continue
        assert set(row["layers"]) == set(row["histograms"])
        assert all(layer["k"] == row["k"] and layer["distinct"] <= layer["k"]
                   for layer in row["layers"].values())


def test_variants_run_as_methods_of_their_own_through_the_config_file(fashion_dir, tmp_path,
                                                                       capsys):
    config = tmp_path / "bench.yaml"
    config.write_text(f"""
bench:
  model: lenet5
  methods: [qareg, qareg-zero]
  bits: [2]
  seeds: [0]
  pretrain_epochs: 1
  epochs: 1
  batch_size: 64
  val_size: 200
  augment: false
  data_dir: {fashion_dir}
methods:
  qareg: {{lam: 0.5}}
variants:
  qareg-zero: {{method: qareg, zero: true}}
""")
    out = tmp_path / "v.jsonl"
    assert main(["bench", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    rows = {row["method"]: row for row in rows_of(out)}
    assert set(rows) == {"fp", "qareg", "qareg-zero"}
    zero = rows["qareg-zero"]
    assert zero["variant_of"] == "qareg" and "variant_of" not in rows["qareg"]
    assert zero["config"]["zero"] and zero["config"]["lam"] == 0.5  # the method's, then its own
    assert zero["sparsity"] > 0 and rows["qareg"]["sparsity"] == 0
    assert all(0 <= row["val_accuracy"] <= 100 for row in rows.values())
