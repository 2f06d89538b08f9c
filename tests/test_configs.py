"""Every shipped config file builds its bench (as `qareg bench --config FILE` would)."""

from pathlib import Path

import pytest

from qareg.cli import build_parser
from qareg.cli.compare import bench_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_config_builds(path, monkeypatch):
    monkeypatch.chdir(path.parents[1])  # paths inside configs are relative to the repo
    config = bench_config(build_parser().parse_args(
        ["bench", "--config", str(path), "--out", "unused.jsonl"]))
    assert config.methods and config.seeds
