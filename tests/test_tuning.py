"""qareg bench --tune-trials: equal trials per training method, chosen on validation only."""

import dataclasses
import json
import statistics

import pytest

import qareg.bench.runner as runner
from qareg.bench import Bench, BenchConfig
from qareg.data import load_dataset
from qareg.errors import ConfigError
from qareg.methods import METHODS

TRIALS = 2


def tuned_bench(fashion_dir, **overrides) -> BenchConfig:
    values = dict(model="lenet5", methods=("ptq-kmeans", "qareg", "gradl1"), bits=(1, 2),
                  seeds=(0, 1), pretrain_epochs=1, epochs=1, batch_size=64, val_size=200,
                  data_dir=str(fashion_dir), augment=False, tune_trials=TRIALS)
    values.update(overrides)
    return BenchConfig(**values)


class ReadOfTestSplit(Exception):
    """Raised when anything touches the test split."""


class PoisonedSplit:
    def __getattr__(self, name):
        raise ReadOfTestSplit(name)

    def __len__(self):
        raise ReadOfTestSplit("__len__")


@pytest.fixture(scope="module")
def tuned(fashion_dir, tmp_path_factory):
    """A tuned bench's rows, and every split each evaluate() call read, in order."""
    out = tmp_path_factory.mktemp("tuned") / "results.jsonl"
    bench = Bench(tuned_bench(fashion_dir), out, progress=False)
    reads, evaluate = [], runner.evaluate

    def recording(model, data, splits, device="cpu"):
        reads.append("test" if data is splits.test else "val" if data is splits.val else "?")
        return evaluate(model, data, splits, device)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "evaluate", recording)
        bench.run()
    return [json.loads(line) for line in out.read_text().splitlines()], reads, out


def test_every_training_method_gets_the_same_trials_and_the_best_is_kept(tuned):
    rows, _, _ = tuned
    for row in rows:
        if row["method"] not in ("qareg", "gradl1"):
            assert row.get("tuning") is None
            continue
        tuning = row["tuning"]
        if row["seed"] == 0:
            space = [dict(c) for c in METHODS.get(row["method"]).search_space[:TRIALS]]
            assert [t["choice"] for t in tuning["trials"]] == space
            means = [statistics.fmean(t["val_accuracy"]) for t in tuning["trials"]]
            assert tuning["chosen"] == means.index(max(means))
            assert tuning["choice"] == space[tuning["chosen"]]
        else:  # later seeds train the choice made on seed 0
            first = next(r for r in rows if (r["method"], r["bits"], r["seed"])
                         == (row["method"], row["bits"], 0))
            assert tuning == {"choice": first["tuning"]["choice"], "seed": 0,
                              "bits": row["bits"] if row["method"] == "qareg" else 1}
        for key, value in tuning["choice"].items():  # the row ran with its choice
            assert (row["train"]["lr"] if key == "lr" else row["config"][key]) == value
    gradl1 = [r["tuning"]["choice"] for r in rows if r["method"] == "gradl1"]
    assert len(gradl1) == 4 and all(c == gradl1[0] for c in gradl1)  # one weight set


def test_the_test_split_is_read_once_per_row_and_never_to_choose(tuned):
    rows, reads, _ = tuned
    assert reads.count("test") == len(rows)
    assert reads.count("?") == 0
    # seed 0: qareg tries TRIALS candidates per width, gradl1 TRIALS judged at both widths;
    # and every row records its validation accuracy
    assert reads.count("val") == TRIALS * 2 + TRIALS * 2 + len(rows)


def test_tuning_never_touches_the_test_split(fashion_dir, tmp_path):
    bench = Bench(tuned_bench(fashion_dir, seeds=(0,)), tmp_path / "r.jsonl", progress=False)
    c = bench.config
    splits = load_dataset(c.dataset, c.data_dir, val_size=c.val_size)
    bench.splits = dataclasses.replace(splits, test=PoisonedSplit())
    trained, record = bench.tune("qareg", 1, 0, [1])
    assert len(record["trials"]) == TRIALS and trained.choice == record["choice"]
    trained, record = bench.tune("gradl1", None, 0, [1, 2])
    assert all(len(t["val_accuracy"]) == 2 for t in record["trials"])
    with pytest.raises(ReadOfTestSplit):  # the poison works: reporting reads it
        runner.evaluate(trained.model, bench.splits.test, bench.splits)


def test_a_tuning_budget_beyond_a_search_space_is_refused(fashion_dir):
    smallest = min(len(METHODS.get(m).search_space) for m in ("qareg", "gradl1"))
    with pytest.raises(ConfigError, match=r"tune_trials=\d+: method '\w+' has \d+ candidates"):
        tuned_bench(fashion_dir, tune_trials=smallest + 1)
    with pytest.raises(ConfigError, match="tune_trials"):
        tuned_bench(fashion_dir, tune_trials=-1)


def test_every_method_offers_at_least_four_trials():
    for name in ("qareg", "qareg-reg", "qareg-ste", "lsq", "dkm", "cpq", "gradl1"):
        space = METHODS.get(name).search_space
        assert len(space) >= 4 and space[0] == {}, name
        assert len({json.dumps(c, sort_keys=True) for c in space}) == len(space), name


def test_a_bench_can_train_the_choices_another_bench_made(tuned, fashion_dir, tmp_path):
    rows, _, path = tuned
    config = tuned_bench(fashion_dir, methods=("qareg",), bits=(2,), seeds=(3,), tune_trials=0,
                         tuning_from=str(path))
    written = Bench(config, tmp_path / "r.jsonl", progress=False).run()
    (row,) = [r for r in written if r["method"] == "qareg"]
    first = next(r for r in rows if (r["method"], r["bits"], r["seed"]) == ("qareg", 2, 0))
    assert row["tuning"] == {"choice": first["tuning"]["choice"], "from": str(path)}
    assert row["recipe"]["tuning_from"] == path.name
    with pytest.raises(ConfigError, match="no tuned row for lsq at 2 bits"):
        Bench(tuned_bench(fashion_dir, methods=("lsq",), bits=(2,), tune_trials=0,
                          tuning_from=str(path)), tmp_path / "s.jsonl")
    with pytest.raises(ConfigError, match="not both"):
        tuned_bench(fashion_dir, tuning_from=str(path))
    with pytest.raises(ConfigError, match="is not a results file"):
        tuned_bench(fashion_dir, tune_trials=0, tuning_from=str(tmp_path / "none.jsonl"))


def test_tuned_at_one_width_every_width_trains_that_choice(fashion_dir, tmp_path):
    config = tuned_bench(fashion_dir, methods=("qareg",), seeds=(0,), tune_bits=2)
    rows = {r["bits"]: r for r in Bench(config, tmp_path / "r.jsonl", progress=False).run()
            if r["method"] == "qareg"}
    assert len(rows[2]["tuning"]["trials"]) == TRIALS
    assert rows[1]["tuning"] == {"choice": rows[2]["tuning"]["choice"], "seed": 0, "bits": 2}
    assert rows[1]["recipe"]["tune_bits"] == 2
    with pytest.raises(ConfigError, match="tune_bits 3 must be one of"):
        tuned_bench(fashion_dir, tune_bits=3)


def test_a_width_the_tuned_file_lacks_takes_the_method_s_only_choice(tmp_path):
    from qareg.bench import read_choices

    path = tmp_path / "tuned.jsonl"
    rows = [{"method": "qareg", "bits": 2, "seed": 0, "tuning": {"trials": [], "choice":
                                                                 {"lam": 0.1}}},
            {"method": "qareg", "bits": 1, "seed": 0, "tuning": {"choice": {"lam": 0.1},
                                                                 "seed": 0, "bits": 2}},
            {"method": "lsq", "bits": 1, "seed": 0, "tuning": {"choice": {}}},
            {"method": "lsq", "bits": 2, "seed": 0, "tuning": {"choice": {"lr": 0.003}}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    choices = read_choices(path, [("qareg", 0.75), ("qareg", 4), ("lsq", 2)])
    assert choices[("qareg", 0.75)] == choices[("qareg", 4)] == {"lam": 0.1}
    with pytest.raises(ConfigError, match="no tuned row for lsq at 4 bits"):
        read_choices(path, [("lsq", 4)])  # two choices made: which one is unclear
