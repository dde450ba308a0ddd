import os
import sys
import types

import numpy as np
import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import (
    CheckpointError,
    CheckpointSecurityError,
    load_checkpoint,
    load_model_from_config,
    load_state_dict,
    save_state_dict,
)


@pytest.fixture
def fake_lightning(monkeypatch):
    """A stand-in `pytorch_lightning.callbacks.model_checkpoint` so the test can pickle a ModelCheckpoint
    under its real import path, as the original SD/LDM checkpoints do."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    module = types.ModuleType(name)

    class ModelCheckpoint:
        def __init__(self):
            self.dirpath = "logs/checkpoints"

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = name, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for parent in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, name, module)
    return ModelCheckpoint


def test_sd_style_ckpt_with_lightning_callbacks_loads(tmp_path, fake_lightning, monkeypatch):
    state = {"model.diffusion_model.w": torch.randn(3, 3), "betas": torch.linspace(0, 1, 4)}
    path = tmp_path / "sd.ckpt"
    torch.save({
        "state_dict": state,
        "callbacks": {fake_lightning: {"best_model_score": torch.tensor(0.5)}},
        "checkpoint_callback": fake_lightning(),
        "global_step": np.int64(470000),
        "epoch": np.float32(6.0),
    }, path)
    # The real class must not be needed (nor importable) at load time.
    monkeypatch.delitem(sys.modules, "pytorch_lightning.callbacks.model_checkpoint")

    ckpt = load_checkpoint(path)
    assert int(ckpt["global_step"]) == 470000
    (callback_key,) = ckpt["callbacks"]
    assert callback_key.pickled_name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert ckpt["checkpoint_callback"].state == {"dirpath": "logs/checkpoints"}

    loaded = load_state_dict(path)
    assert loaded.keys() == state.keys()
    for key in state:
        assert torch.equal(loaded[key], state[key])


class _RunsShellOnLoad:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _RunsShellOnLoad(marker)}, path)
    with pytest.raises(CheckpointSecurityError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert f"{os.name}.system" in message  # posix.system on Linux
    assert str(path) in message and "Nothing from the file was executed" in message
    assert not marker.exists()
    with pytest.raises(CheckpointSecurityError):
        load_state_dict(path)
    assert not marker.exists()


def test_numpy_object_arrays_are_refused_numeric_arrays_load(tmp_path):
    # Object arrays can carry arbitrary pickled objects; numeric arrays (old embedding files hold them) are data.
    path = tmp_path / "obj.ckpt"
    torch.save({"x": np.array([1, "a"], dtype=object)}, path)
    with pytest.raises(CheckpointSecurityError, match="holds Python objects"):
        load_checkpoint(path)
    path = tmp_path / "num.ckpt"
    torch.save({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, path)
    assert np.array_equal(load_checkpoint(path)["x"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_safetensors_and_bare_state_dicts(tmp_path):
    state = {"a": torch.randn(2, 3), "b": torch.arange(4)}
    st = tmp_path / "m.safetensors"
    safetensors.torch.save_file(state, str(st))
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    for path in (st, bare):
        loaded = load_state_dict(path)
        assert set(loaded) == {"a", "b"}
        assert torch.equal(loaded["a"], state["a"]) and torch.equal(loaded["b"], state["b"])


def test_missing_directory_truncated_and_garbage_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        load_checkpoint(tmp_path)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}}, good)
    data = good.read_bytes()
    for name, content in (("cut.ckpt", data[: len(data) // 2]), ("text.ckpt", b"hello world\n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(tmp_path / name)
    cut_st = tmp_path / "cut.safetensors"
    safetensors.torch.save_file({"w": torch.randn(64, 64)}, str(cut_st))
    cut_st.write_bytes(cut_st.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_checkpoint(cut_st)


def test_save_state_dict_round_trip_with_shared_and_strided_tensors(tmp_path):
    base = torch.randn(4, 4)
    state = {"w": base, "tied": base, "t": base.t(), "row": base[1]}
    for name in ("m.safetensors", "m.ckpt"):
        path = tmp_path / "sub" / name
        save_state_dict(state, path, metadata={"step": 3})
        loaded = load_state_dict(path)
        assert set(loaded) == set(state)
        for key in state:
            assert torch.equal(loaded[key], state[key])
        assert [p.name for p in path.parent.iterdir() if p.name.startswith(".tmp")] == []
    with safetensors.safe_open(str(tmp_path / "sub" / "m.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta == {"step": "3"}
    assert set(torch.load(tmp_path / "sub" / "m.ckpt", weights_only=True)) == {"state_dict", "metadata"}


def test_failed_save_leaves_old_file_intact(tmp_path):
    path = tmp_path / "m.ckpt"
    save_state_dict({"w": torch.ones(2)}, path)
    with pytest.raises(Exception):
        save_state_dict({"w": "not a tensor"}, path)
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]


def test_load_model_from_config(tmp_path, capsys):
    config = OmegaConf.create({"model": {"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 2}}})
    source = torch.nn.Linear(3, 2)
    ckpt = tmp_path / "lin.safetensors"
    save_state_dict({"weight": source.weight, "extra.thing": torch.zeros(1)}, ckpt)
    yaml_path = tmp_path / "cfg.yaml"
    OmegaConf.save(config, yaml_path)

    # strict: a weight the model needs is missing -> refused, naming it
    with pytest.raises(CheckpointError, match="lacks 1 of the 2 weights Linear needs \\(bias\\)"):
        load_model_from_config(str(yaml_path), ckpt=str(ckpt))
    save_state_dict({"weight": source.weight, "bias": source.bias, "extra.thing": torch.zeros(1)}, ckpt)
    model = load_model_from_config(str(yaml_path), ckpt=str(ckpt))
    out = capsys.readouterr().out
    assert "unused: 1 (extra.thing)" in out
    assert not model.training
    assert torch.equal(model.weight, source.weight)
    assert isinstance(load_model_from_config(config), torch.nn.Linear)


def _rename_global(path, old, new):
    """Rewrite the GLOBAL `old` as `new` in a torch zip file's pickle, as an older numpy/torch would have named it."""
    import io
    import zipfile
    out = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data.replace(old, new) if info.filename.endswith("data.pkl") else data)
    path.write_bytes(out.getvalue())


def test_embedding_written_by_old_numpy_loads(tmp_path):
    from ldm.modules.embedding_io import load_embedding_file
    path = tmp_path / "embeddings.pt"
    vectors = np.arange(8, dtype=np.float32).reshape(1, 8)
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": torch.from_numpy(vectors)},
                "step": np.int64(500), "extra": vectors}, path)
    # numpy < 2 pickles its arrays and scalars from numpy.core.multiarray
    _rename_global(path, b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in __import__("zipfile").ZipFile(path).read("embeddings/data.pkl")
    loaded = load_checkpoint(path)
    assert np.array_equal(loaded["extra"], vectors) and int(loaded["step"]) == 500
    assert load_embedding_file(path).step == 500


class _MPSTensor:
    """Pickles like torch < 2 pickled an MPS tensor: numpy data rebuilt on the device it names."""

    def __init__(self, array):
        self.array = array

    def __reduce__(self):
        return torch._utils._rebuild_device_tensor_from_numpy, (self.array, torch.float32, "mps", False)


def test_embedding_saved_from_an_mps_run_loads_on_cpu(tmp_path):
    from ldm.modules.embedding_io import load_embedding_file
    path = tmp_path / "embeddings.pt"
    vectors = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": _MPSTensor(vectors)}}, path)
    emb = load_embedding_file(path)
    assert emb.vectors["*"].device.type == "cpu"
    assert torch.equal(emb.vectors["*"], torch.from_numpy(vectors))
