import json
import statistics
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qareg.errors import ConfigError
from qareg.report import (
    histogram_record,
    load_results,
    markdown_table,
    pareto_frontier,
    plot_accuracy_vs_bits,
    plot_accuracy_vs_size,
    plot_histograms,
    summary,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METHODS = {"qareg": 3.0, "lsq": 5.0, "ptq-kmeans": 9.0}  # method -> accuracy lost at 1 bit


def make_rows(seed: int = 0, histogram_layers: int = 2) -> list[dict]:
    """fp plus 3 methods at bits 1-4, 3 seeds each: accuracy rises with bits, noise per seed."""
    rng = np.random.default_rng(seed)
    base = {"model": "lenet5", "dataset": "fashion-mnist", "epochs": 3, "config": {"lr": 1e-3},
            "qareg_version": "0.1.0"}
    rows = []
    for s in range(3):
        rows.append({**base, "method": "fp", "bits": 32, "seed": s, "bits_per_weight": 32.0,
                     "accuracy": 90.0 + float(rng.normal(0, 0.3)), "file_bytes": 246_000,
                     "train_seconds": 30.0 + s, "peak_memory_bytes": 5e8, "git_commit": "a" * 40,
                     "histograms": None})
    for method, loss in METHODS.items():
        for bits in range(1, 5):
            for s in range(3):
                before = {f"layer{i}.weight": torch.randn(200 + 50 * i,
                                                          generator=torch.Generator().manual_seed(s))
                          for i in range(histogram_layers)}
                after = {n: (w * 2).round() / 2 for n, w in before.items()}
                grids = {n: torch.arange(-4.0, 4.5, 0.5) for n in before}
                rows.append({**base, "method": method, "bits": bits, "seed": s,
                             "bits_per_weight": bits + 0.01,
                             "accuracy": 90.0 - loss / bits + float(rng.normal(0, 0.2)),
                             "file_bytes": None if method == "lsq" else 8000 * bits,
                             "stored_bits_per_weight": None if method == "lsq" else bits + 0.1,
                             "train_seconds": 40.0 + bits + s, "peak_memory_bytes": 6e8,
                             "git_commit": "b" * 40 if s == 2 else "c" * 40,
                             "histograms": histogram_record(before, after, grids, bins=20)
                             if histogram_layers else None})
    return rows


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def assert_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width > 200 and height > 200
    assert data[-12:-8] == b"\x00\x00\x00\x00" and data[-8:-4] == b"IEND"
    # The image data decompresses: the file is complete, not truncated.
    idat, pos = b"", 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    pixels = zlib.decompress(idat)
    assert len(set(pixels[:: 97])) > 2  # not a blank image


def test_load_and_summary_statistics(tmp_path):
    rows = make_rows(histogram_layers=0)
    path = write_jsonl(tmp_path / "results.jsonl", rows)
    loaded = load_results([path])
    assert loaded == rows
    table = summary(loaded)
    assert len(table) == 1 + len(METHODS) * 4
    fp_mean = statistics.mean(r["accuracy"] for r in rows if r["method"] == "fp")
    for s in table:
        group = [r for r in rows if (r["method"], r["bits"]) == (s["method"], s["bits"])]
        accuracies = [r["accuracy"] for r in group]
        assert s["n"] == 3 and s["seeds"] == [0, 1, 2]
        assert s["accuracy_mean"] == pytest.approx(statistics.mean(accuracies), abs=1e-12)
        assert s["accuracy_std"] == pytest.approx(statistics.stdev(accuracies), abs=1e-12)
        assert s["drop"] == pytest.approx(fp_mean - statistics.mean(accuracies), abs=1e-12)
        assert s["bits_per_weight"] == pytest.approx(statistics.mean(
            r["bits_per_weight"] for r in group))
        assert s["train_seconds"] == pytest.approx(statistics.mean(
            r["train_seconds"] for r in group))
        if s["method"] == "lsq":
            assert s["file_bytes"] is None  # unknown, not 0
        else:
            assert s["file_bytes"] == pytest.approx(statistics.mean(
                r["file_bytes"] for r in group))
    # Order: fp first, then methods alphabetically, bits ascending.
    assert [(s["method"], s["bits"]) for s in table] == [("fp", 32)] + [
        (m, b) for m in sorted(METHODS) for b in range(1, 5)]
    # Drop shrinks with bits for the made-up numbers (loss / bits dwarfs the noise).
    drops = [s["drop"] for s in table if s["method"] == "ptq-kmeans"]
    assert drops == sorted(drops, reverse=True) and drops[0] > 5


def test_one_seed_has_zero_std_and_no_fp_means_no_drop():
    rows = [r for r in make_rows(histogram_layers=0) if r["seed"] == 0 and r["method"] != "fp"]
    table = summary(rows)
    assert all(s["n"] == 1 and s["accuracy_std"] == 0.0 and s["drop"] is None for s in table)
    text = markdown_table(table)
    assert text.count("± -") == len(table)
    assert "| - |" in text  # the drop column without an fp reference


def test_drop_uses_the_fp_row_of_the_same_model_and_dataset():
    rows = make_rows(histogram_layers=0)
    other = [{**r, "dataset": "cifar10", "accuracy": r["accuracy"] - 20} for r in rows]
    table = summary(rows + other)
    assert len(table) == 2 * (1 + len(METHODS) * 4)
    fp = {s["dataset"]: s["accuracy_mean"] for s in table if s["method"] == "fp"}
    assert fp["cifar10"] == pytest.approx(fp["fashion-mnist"] - 20)
    for s in table:
        assert s["drop"] == pytest.approx(fp[s["dataset"]] - s["accuracy_mean"])


def test_markdown_table_has_one_line_per_group_with_mean_and_std(tmp_path):
    rows = make_rows(histogram_layers=0)
    table = summary(rows)
    text = markdown_table(table)
    lines = text.splitlines()
    assert lines[0].startswith("**lenet5 on fashion-mnist**")
    assert "`aaaaaaaaaaaa`" in lines[0] and "`bbbbbbbbbbbb`" in lines[0]  # commits, shortened
    body = [line for line in lines if line.startswith("| ") and not line.startswith("| method")]
    assert len(body) == len(table)
    for line, s in zip(body, table, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == s["method"] and cells[1] == str(s["bits"])
        stored = s["stored_bits_per_weight"]
        assert cells[3] == ("-" if stored is None else f"{stored:.2f}")
        assert cells[4] == f"{s['accuracy_mean']:.2f} ± {s['accuracy_std']:.2f}"
        assert cells[5] == f"{s['drop']:.2f}" and cells[6] == "3"
        assert cells[7] == ("-" if s["file_bytes"] is None else f"{s['file_bytes'] / 1e3:.1f}")
    assert body[0].startswith("| fp | 32 | 32.00 |") and body[0].split("|")[6].strip() == "0.00"
    stored = next(line for line in body if line.startswith("| qareg | 2 |"))
    assert stored.split("|")[4].strip() == "2.10"  # the rows' stored_bits_per_weight, meaned


def test_plots_are_valid_pngs(tmp_path):
    rows = make_rows(histogram_layers=4)
    path = plot_accuracy_vs_bits(rows, tmp_path / "acc.png")
    assert path == tmp_path / "acc.png"
    assert_png(path)
    row = next(r for r in rows if r["method"] == "qareg")
    assert_png(plot_histograms(row, tmp_path / "sub" / "hist.png"))
    with pytest.raises(ConfigError, match="no histograms"):
        plot_histograms(rows[0], tmp_path / "none.png")
    with pytest.raises(ConfigError, match="exactly one model/dataset"):
        plot_accuracy_vs_bits(rows + [{**rows[0], "model": "vgg16"}], tmp_path / "two.png")


def test_histogram_record_counts_edges_and_representatives():
    g = torch.Generator().manual_seed(0)
    before = {"a.weight": torch.randn(30, 20, generator=g), "b.weight": torch.rand(7, generator=g)}
    after = {"a.weight": before["a.weight"] * 3, "b.weight": torch.full((7,), 0.25)}
    grids = {"a.weight": torch.tensor([0.5, -1.0, 2.0])}
    record = histogram_record(before, after, grids, bins=16)
    json.dumps(record)  # JSON-friendly as it is
    for name in before:
        h = record[name]
        assert len(h["edges"]) == 17 and len(h["before"]) == len(h["after"]) == 16
        assert all(type(c) is int for c in h["before"] + h["after"])
        assert sum(h["before"]) == before[name].numel() == sum(h["after"])
        both = torch.cat([before[name].ravel(), after[name].ravel()])
        assert h["edges"][0] == pytest.approx(both.min().item())
        assert h["edges"][-1] == pytest.approx(both.max().item())
        assert np.all(np.diff(h["edges"]) > 0)
        counts, _ = np.histogram(after[name].numpy(), bins=np.asarray(h["edges"]))
        assert counts.tolist() == h["after"]
    assert record["a.weight"]["representatives"] == [-1.0, 0.5, 2.0]
    assert record["b.weight"]["representatives"] == []  # no grid: an fp-style tensor
    constant = histogram_record({"c": torch.zeros(5)}, {"c": torch.zeros(5)}, {}, bins=4)["c"]
    assert constant["edges"][0] < 0 < constant["edges"][-1] and sum(constant["after"]) == 5
    with pytest.raises(ConfigError, match="bins"):
        histogram_record(before, after, grids, bins=0)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "is not JSON"),
        ('{"method": "qareg", "bits": 2, "seed": 0, "accuracy": 80.0}', "missing bits_per_weight"),
        ('{"method": "qareg", "bits": 0, "seed": 0, "accuracy": 80, "bits_per_weight": 2}',
         "bits must be a number > 0"),
        ('{"method": "qareg", "bits": 2, "seed": 0, "accuracy": 0.8e3, "bits_per_weight": 2}',
         "accuracy must be a percentage"),
        ('{"method": "qareg", "bits": 2, "seed": 0, "accuracy": 80, "bits_per_weight": 2, '
         '"file_bytes": "big"}', "file_bytes must be a number"),
        ('{"method": "qareg", "bits": 2, "seed": 0, "accuracy": 80, "bits_per_weight": 2, '
         '"histograms": {"x": {"edges": [0, 1], "before": [1, 2], "after": [3]}}}',
         "histograms\\['x'\\]"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    good = json.dumps(make_rows(histogram_layers=0)[0])
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")  # blank line 2 is skipped
    with pytest.raises(ConfigError, match=f"bad.jsonl', line 3.*{message}"):
        load_results([path])


def test_missing_file_and_no_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.jsonl.*does not exist"):
        load_results([tmp_path / "nope.jsonl"])
    with pytest.raises(ConfigError, match="at least one"):
        load_results([])


def test_duplicates_keep_the_later_row_and_warn(tmp_path):
    rows = make_rows(histogram_layers=0)
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.warns(UserWarning, match="identical values") as caught:
        twice = load_results([path, path])
    assert twice == rows and len(caught) == len(rows)
    rerun = {**rows[5], "accuracy": 12.5}
    later = write_jsonl(tmp_path / "b.jsonl", [rerun])
    with pytest.warns(UserWarning, match=r"b.jsonl', line 1 repeats .*a.jsonl', line 6.*differ"):
        loaded = load_results([path, later])
    assert len(loaded) == len(rows) and rerun in loaded and rows[5] not in loaded


def test_write_report(tmp_path):
    rows = make_rows(histogram_layers=2)
    other = [{**r, "dataset": "cifar10"} for r in rows[:6]]  # fp and a few qareg runs
    first = write_jsonl(tmp_path / "one.jsonl", rows)
    second = write_jsonl(tmp_path / "two.jsonl", other)
    written = write_report([first, second], tmp_path / "out")
    report = tmp_path / "out" / "report.md"
    assert written[0] == report and all(p.exists() for p in written)
    pngs = [p for p in written if p.suffix == ".png"]
    for p in pngs:
        assert_png(p)
    text = report.read_text(encoding="utf-8")
    for p in pngs:
        assert f"({p.name})" in text
    assert len([p for p in pngs if p.name.startswith("accuracy_vs_bits")]) == 2
    assert len([p for p in pngs if p.name.startswith("accuracy_vs_size")]) == 2
    # One histogram plot per method that has histograms: its lowest bits, lowest seed.
    hist = sorted(p.name for p in pngs if p.name.startswith("histograms"))
    assert hist == sorted(
        [f"histograms_lenet5_fashion-mnist_{m}_1bit_seed0.png" for m in METHODS]
        + ["histograms_lenet5_cifar10_qareg_1bit_seed0.png"])
    assert "## lenet5 on fashion-mnist" in text and "## lenet5 on cifar10" in text
    assert text.count("±") >= len(summary(rows + other))
    with pytest.raises(ConfigError, match="no result rows"):
        write_report([write_jsonl(tmp_path / "empty.jsonl", [])], tmp_path / "out2")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(1, 1e6), st.floats(0, 100)), min_size=1, max_size=30))
def test_the_pareto_frontier_is_every_point_no_other_beats(points):
    frontier = pareto_frontier(points)

    def beats(q, p):  # no larger and no less accurate, and not the same point
        return q[0] <= p[0] and q[1] >= p[1] and q != p

    assert set(frontier) == {p for p in points if not any(beats(q, p) for q in points)}
    sizes, accuracies = zip(*frontier, strict=True)
    assert list(sizes) == sorted(set(sizes))  # one point per size, ascending
    assert list(accuracies) == sorted(set(accuracies))


def test_the_size_plot_draws_each_method_s_frontier_from_rows_with_file_sizes(tmp_path,
                                                                              monkeypatch):
    import qareg.report.plots as plots

    drawn = []
    monkeypatch.setattr(plots, "pareto_frontier",
                        lambda points: drawn.append(list(points)) or pareto_frontier(drawn[-1]))
    rows = make_rows(histogram_layers=0)
    assert_png(plot_accuracy_vs_size(rows, tmp_path / "size.png"))
    # qareg and ptq-kmeans have sizes (4 bit-widths each); lsq's rows have none
    assert sorted(len(points) for points in drawn) == [4, 4]
    for points in drawn:
        assert all(size in (8, 16, 24, 32) for size, _ in points)  # KB, means over seeds
    with pytest.raises(ConfigError, match="rows with file sizes"):
        plot_accuracy_vs_size([r for r in rows if r["method"] == "lsq"], tmp_path / "x.png")


def test_paired_differences_pick_the_best_rival_and_give_a_t_interval():
    from qareg.report import paired_table

    def row(method, bits, seed, accuracy):
        return {"method": method, "bits": bits, "seed": seed, "accuracy": accuracy,
                "bits_per_weight": float(bits), "model": "lenet5", "dataset": "fashion-mnist"}

    ours = [80.0, 82.0, 81.0]
    rows = [row("qareg", 1, s, a) for s, a in enumerate(ours)]
    rows += [row("lsq", 1, s, a - 1.0 - 0.5 * s) for s, a in enumerate(ours)]  # best rival
    rows += [row("dkm", 1, s, 50.0) for s in range(3)]
    rows += [row("qareg-ste", 1, s, a - 2.0) for s, a in enumerate(ours[:2])]  # 2 seeds
    rows += [row("fp", 32, s, 90.0) for s in range(3)]
    rows += [row("lsq", 2, 0, 85.0)]  # no qareg at 2 bits: no comparison
    entries = paired_table(rows)
    assert [(e["bits"], e["versus"], e["role"]) for e in entries] == [
        (1, "lsq", "best rival"), (1, "qareg-ste", "part")]
    rival, part = entries
    differences = [1.0, 1.5, 2.0]  # paired by seed
    half = 4.302652729911275 * statistics.stdev(differences) / 3 ** 0.5  # t(0.975, 2 df)
    assert rival["mean"] == pytest.approx(1.5) and rival["n"] == 3
    assert (rival["low"], rival["high"]) == pytest.approx((1.5 - half, 1.5 + half))
    assert part["seeds"] == [0, 1] and part["mean"] == pytest.approx(2.0)
    assert part["low"] == part["high"] == pytest.approx(2.0)  # no spread: a point interval


def test_every_qareg_configuration_but_the_ablations_is_paired_with_its_parts():
    from qareg.report import paired_table

    def row(method, bits, seed, accuracy):
        return {"method": method, "bits": bits, "seed": seed, "accuracy": accuracy,
                "bits_per_weight": float(bits), "model": "lenet5", "dataset": "fashion-mnist"}

    rows = [row("qareg-size", 0.75, s, 86.0 + s) for s in range(3)]
    rows += [row("qareg-ste-size", 0.75, s, 85.0 + s) for s in range(3)]  # 1 point below
    rows += [row("qareg", 1, s, 87.0) for s in range(3)]
    rows += [row("qareg-size", 1, s, 88.0) for s in range(3)]
    rows += [row("lsq", 1, s, 87.5) for s in range(3)]
    entries = paired_table(rows)
    assert [(e["bits"], e["method"], e["versus"], e["role"]) for e in entries] == [
        (0.75, "qareg-size", "qareg-ste-size", "part"),
        (1, "qareg", "lsq", "best rival"), (1, "qareg", "qareg-size", "variant"),
        (1, "qareg-size", "lsq", "best rival"), (1, "qareg-size", "qareg", "variant")]
    assert entries[0]["mean"] == pytest.approx(1.0) and entries[0]["n"] == 3
    assert [e["method"] for e in paired_table(rows, subject="qareg-size")] == ["qareg-size"] * 3

def test_each_rival_is_checked_against_the_best_qareg_at_no_more_bytes():
    from qareg.report import dominance_table

    def group(method, bits, kb, accuracy):
        return {"model": "m", "dataset": "d", "method": method, "bits": bits,
                "file_bytes": kb * 1e3, "accuracy_mean": accuracy, "reference": False}

    groups = [group("lsq", 2, 10.0, 89.9), group("lsq", 1, 8.0, 87.0),
              group("qareg", 2, 13.0, 90.3), group("qareg-size", 1.15, 9.8, 90.0),
              group("qareg-size", 0.75, 7.0, 86.5),
              {**group("fp", 32, 240.0, 90.5), "reference": True}]
    entries = {(e["rival"]["method"], e["rival"]["bits"]): e for e in dominance_table(groups)}
    assert set(entries) == {("lsq", 2), ("lsq", 1)}  # rivals only, not the reference
    assert entries[("lsq", 2)]["best"]["method"] == "qareg-size"  # 9.8 KB, not 13
    assert entries[("lsq", 2)]["dominated"]
    assert entries[("lsq", 1)]["best"]["bits"] == 0.75 and not entries[("lsq", 1)]["dominated"]
    assert entries[("lsq", 2)]["paired"] is None  # no rows given


def test_the_frontier_table_pairs_each_rival_with_its_best_qareg_by_seed():
    from qareg.report import dominance_markdown, dominance_table, summary

    def row(method, bits, seed, accuracy, size):
        return {"model": "m", "dataset": "d", "method": method, "bits": bits, "seed": seed,
                "accuracy": accuracy, "file_bytes": size, "bits_per_weight": 2.0}

    rows = [row("lsq", 2, s, a, 10_000) for s, a in enumerate([89.0, 90.0, 91.0])]
    rows += [row("qareg-size", 1.2, s, a, 9_900) for s, a in enumerate([89.1, 90.2, 91.0])]
    entries = dominance_table(summary(rows), rows=rows)
    assert entries[0]["paired"]["mean"] == pytest.approx(0.1) and entries[0]["paired"]["n"] == 3
    assert "+0.10 [" in dominance_markdown(entries)
