import pytest
import torch

import qareg
from qareg.checkpoint import FORMAT_VERSION, atomic_write, load_checkpoint, save_checkpoint
from qareg.errors import ConfigError


def test_round_trip_restores_codebooks_and_outputs(tmp_path):
    torch.manual_seed(0)
    model = qareg.prepare(qareg.create_model("lenet5", 10, 1, 28), k=5,
                          k_per_tensor={"classifier.4.weight": 3})
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, {"seed": 0, "config": {"k": 5}})
    loaded, meta = load_checkpoint(path)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert {t.name: t.codebook.k for t in qareg.quantized_tensors(loaded)} == {
        t.name: t.codebook.k for t in qareg.quantized_tensors(model)
    }
    assert meta["seed"] == 0 and meta["config"] == {"k": 5}
    assert {"qareg_version", "git_commit", "torch_version", "created"} <= set(meta)


def test_loading_never_unpickles_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran code')",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "qareg-checkpoint", "payload": Evil()}, path)
    with pytest.raises(ConfigError, match="cannot be read as a qareg checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"something": 1}, "not a qareg checkpoint"),
        ({"format": "qareg-checkpoint", "format_version": 99}, "format version 99"),
    ],
)
def test_foreign_or_future_files_are_refused(tmp_path, content, message):
    path = tmp_path / "x.pt"
    torch.save(content, path)
    with pytest.raises(ConfigError, match=message):
        load_checkpoint(path)
    assert FORMAT_VERSION == 1


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.pt' does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")

    def failing(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, failing)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_the_commit_is_read_once_per_process_and_results_do_not_make_it_dirty(
        tmp_path, monkeypatch):
    from qareg import provenance

    calls = []
    real_run = provenance.subprocess.run

    def counting(args, **kwargs):
        calls.append(args)
        return real_run(args, **kwargs)

    provenance.git_commit.cache_clear()
    monkeypatch.setattr(provenance.subprocess, "run", counting)
    first = provenance.git_commit()
    assert provenance.git_commit() == first and len(calls) <= 2  # cached: read once
    status = [a for a in calls if "status" in a]
    assert all(set(provenance.NOT_CODE) <= set(a) for a in status)
    provenance.git_commit.cache_clear()
