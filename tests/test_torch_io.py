"""Tests for visaudio_jax.convert.torch_io (torch-free, code-free checkpoint reading).

The tiny_v1/tiny_v2 files in tests/fixtures/mmaudio_net/ are golden weights written by torch.save and
safetensors from the same state dict, see shared/fixtures/mmaudio_net/README.md (copied byte-identical
from there). Other checkpoints are built by hand below, with the layout torch.save uses (archive/data.pkl,
archive/data/<key>, archive/byteorder, archive/version) and pickles written opcode by opcode, so no
torch is needed.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from visaudio_jax.convert.torch_io import CheckpointError, read_state_dict, write_safetensors

FIXTURES = Path(__file__).parent / "fixtures" / "mmaudio_net"


def fixture(name: str) -> Path:
    path = FIXTURES / name
    assert path.is_file(), f"missing test fixture {path} (copy it from shared/fixtures/mmaudio_net/)"
    return path


# --- a minimal pickle writer: enough opcodes to mimic what torch.save emits ---------------------

@dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclass(frozen=True)
class Call:
    func: Global
    args: tuple


@dataclass(frozen=True)
class PersistentId:
    pid: tuple


def _ops(obj: Any) -> bytes:
    if isinstance(obj, Global):
        return f"c{obj.module}\n{obj.name}\n".encode()
    if isinstance(obj, Call):
        return _ops(obj.func) + _ops(obj.args) + pickle.REDUCE
    if isinstance(obj, PersistentId):
        return _ops(obj.pid) + pickle.BINPERSID
    if isinstance(obj, tuple):
        return pickle.MARK + b"".join(map(_ops, obj)) + pickle.TUPLE
    if isinstance(obj, collections.OrderedDict):  # torch: OrderedDict() then SETITEMS
        items = b"".join(_ops(k) + _ops(v) for k, v in obj.items())
        return _ops(Call(Global("collections", "OrderedDict"), ())) + pickle.MARK + items + pickle.SETITEMS
    if isinstance(obj, dict):
        items = b"".join(_ops(k) + _ops(v) for k, v in obj.items())
        return pickle.EMPTY_DICT + pickle.MARK + items + pickle.SETITEMS
    return pickle.dumps(obj, protocol=2)[2:-1]  # int, float, str, bool, None: strip PROTO and STOP


def dumps(obj: Any) -> bytes:
    return pickle.PROTO + b"\x02" + _ops(obj) + pickle.STOP


def tensor(storage: str, key: str, numel: int, offset: int, size: tuple, stride: tuple) -> Call:
    pid = PersistentId(("storage", Global("torch", storage), key, "cpu", numel))
    hooks = Call(Global("collections", "OrderedDict"), ())
    return Call(Global("torch._utils", "_rebuild_tensor_v2"), (pid, offset, size, stride, False, hooks))


def write_zip(path: Path, pickle_bytes: bytes, storages: dict[str, bytes] | None = None,
              byteorder: str = "little", extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/byteorder", byteorder)
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return path


# --- 1. golden fixtures ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny_v1", "tiny_v2"])
def test_pth_equals_safetensors(name: str) -> None:
    pth = read_state_dict(fixture(f"{name}_state.pth"))
    st = read_state_dict(fixture(f"{name}_state.safetensors"))
    assert len(pth) == len(st) == 119
    # .pth keeps state_dict order; the safetensors writer stores keys sorted by name.
    assert list(pth)[:6] == ["sync_pos_emb", "latent_mean", "latent_std", "empty_string_feat",
                             "empty_clip_feat", "empty_sync_feat"]
    assert list(st) == sorted(pth)
    for key, array in pth.items():
        assert array.dtype == st[key].dtype == np.float32, key
        assert array.shape == st[key].shape, key
        assert array.tobytes() == st[key].tobytes(), key


# --- 2. malicious pickles ----------------------------------------------------------------------

class _Exploit:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": _Exploit(f"touch {marker}")}, protocol=protocol)
    path = write_zip(tmp_path / "evil.pth", payload)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert f"{os.system.__module__}.system" in message and "forbidden" in message
    assert str(path) in message
    assert not marker.exists()


def test_forbidden_global_inside_tensor_is_refused(tmp_path: Path) -> None:
    hooks = Call(Global("builtins", "eval"), ("1",))
    pid = PersistentId(("storage", Global("torch", "FloatStorage"), "0", "cpu", 1))
    evil = Call(Global("torch._utils", "_rebuild_tensor_v2"), (pid, 0, (), (), False, hooks))
    path = write_zip(tmp_path / "evil.pth", dumps({"w": evil}), {"0": np.float32(1).tobytes()})
    with pytest.raises(CheckpointError, match="builtins.eval"):
        read_state_dict(path)


# --- 3. corrupted and unsupported files --------------------------------------------------------

def test_truncated_pth(tmp_path: Path) -> None:
    data = fixture("tiny_v1_state.pth").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_truncated_safetensors(tmp_path: Path) -> None:
    data = fixture("tiny_v1_state.safetensors").read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "random.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="unrecognised format") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(tmp_path / "absent.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unrecognised format"):
        read_state_dict(tmp_path / "empty.pth")


def test_legacy_pickle_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="unsupported format.*legacy") as info:
        read_state_dict(path)
    assert str(path) in str(info.value) and "torch.save" in str(info.value)
    assert "safetensors" in str(info.value)


def test_torchscript_is_unsupported(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "scripted.pt", dumps({}),
                     extra={"archive/constants.pkl": dumps(()), "archive/code/__torch__.py": b""})
    with pytest.raises(CheckpointError, match="TorchScript"):
        read_state_dict(path)


def test_missing_data_entry(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "x.pth", dumps({"w": tensor("FloatStorage", "7", 2, 0, (2,), (1,))}))
    with pytest.raises(CheckpointError, match="missing data entry 'archive/data/7'") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_storage_shorter_than_declared(tmp_path: Path) -> None:
    obj = {"w": tensor("FloatStorage", "0", 4, 0, (4,), (1,))}
    path = write_zip(tmp_path / "x.pth", dumps(obj), {"0": np.zeros(3, np.float32).tobytes()})
    with pytest.raises(CheckpointError, match="holds 12 bytes, expected 4 x 4"):
        read_state_dict(path)


def test_corrupted_storage_bytes(tmp_path: Path) -> None:
    obj = {"w": tensor("FloatStorage", "0", 4, 0, (4,), (1,))}
    path = write_zip(tmp_path / "x.pth", dumps(obj), {"0": np.arange(4, dtype=np.float32).tobytes()})
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("archive/data/0")
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted.*CRC"):
        read_state_dict(path)


def test_view_outside_storage(tmp_path: Path) -> None:
    obj = {"w": tensor("FloatStorage", "0", 6, 1, (2, 3), (3, 1))}  # needs 7 elements
    path = write_zip(tmp_path / "x.pth", dumps(obj), {"0": np.zeros(6, np.float32).tobytes()})
    with pytest.raises(CheckpointError, match="has 6 elements.*needs 7"):
        read_state_dict(path)


def test_unknown_storage_types(tmp_path: Path) -> None:
    obj = {"w": tensor("ComplexFloatStorage", "0", 1, 0, (), ())}
    path = write_zip(tmp_path / "a.pth", dumps(obj), {"0": bytes(8)})
    with pytest.raises(CheckpointError, match="unsupported storage type torch.ComplexFloatStorage"):
        read_state_dict(path)
    pid = PersistentId(("storage", "FloatStorage", "0", "cpu", 1))  # a string, not a class
    obj = {"w": Call(Global("torch._utils", "_rebuild_tensor_v2"), (pid, 0, (), (), False, None))}
    path = write_zip(tmp_path / "b.pth", dumps(obj), {"0": bytes(4)})
    with pytest.raises(CheckpointError, match="unknown storage type 'FloatStorage'"):
        read_state_dict(path)


# --- 4. views, dtypes, byte order --------------------------------------------------------------

def test_views_and_dtypes(tmp_path: Path) -> None:
    f32 = np.arange(20, dtype=np.float32)
    f16 = np.array([0.5, -1.25, 3.0, 65504.0], np.float16)
    bf16 = np.array([1.5, -2.25, 3.0, 1e30], ml_dtypes.bfloat16)
    i64 = np.array([2**40, -3, 7], np.int64)
    flags = np.array([True, False, True], np.bool_)
    obj = collections.OrderedDict([
        ("offset_transposed", tensor("FloatStorage", "0", 20, 2, (3, 4), (1, 3))),
        ("same_storage_contiguous", tensor("FloatStorage", "0", 20, 5, (2, 3), (3, 1))),
        ("broadcast", tensor("FloatStorage", "0", 20, 4, (2, 3), (0, 1))),
        ("scalar", tensor("FloatStorage", "0", 20, 19, (), ())),
        ("empty", tensor("FloatStorage", "0", 20, 20, (0, 3), (3, 1))),
        ("half", tensor("HalfStorage", "1", 4, 1, (3,), (1,))),
        ("bf16", tensor("BFloat16Storage", "2", 4, 0, (2, 2), (1, 2))),
        ("long", tensor("LongStorage", "3", 3, 0, (3,), (1,))),
        ("bool", tensor("BoolStorage", "4", 3, 0, (3,), (1,))),
        ("param", Call(Global("torch._utils", "_rebuild_parameter"),
                       (tensor("LongStorage", "3", 3, 2, (), ()), True, collections.OrderedDict()))),
    ])
    storages = {"0": f32.tobytes(), "1": f16.tobytes(), "2": bf16.tobytes(), "3": i64.tobytes(),
                "4": flags.tobytes()}
    out = read_state_dict(write_zip(tmp_path / "views.pth", dumps(obj), storages))

    assert list(out) == list(obj)
    expected = {
        "offset_transposed": np.array([[2 + i + 3 * j for j in range(4)] for i in range(3)], np.float32),
        "same_storage_contiguous": np.array([[5, 6, 7], [8, 9, 10]], np.float32),
        "broadcast": np.array([[4, 5, 6], [4, 5, 6]], np.float32),
        "scalar": np.array(19, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "half": f16[1:],
        "bf16": bf16.reshape(2, 2).T,
        "long": i64,
        "bool": flags,
        "param": np.array(7, np.int64),
    }
    for key, want in expected.items():
        got = out[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert got.tobytes() == want.tobytes(), key
        assert got.flags.c_contiguous and got.flags.writeable, key
    assert not np.shares_memory(out["offset_transposed"], out["same_storage_contiguous"])


def test_big_endian_storages(tmp_path: Path) -> None:
    values = np.array([1.5, -2.0, 1e-3], np.float64)
    bf16 = np.array([1.5, -2.25], ml_dtypes.bfloat16)
    obj = {"d": tensor("DoubleStorage", "0", 3, 0, (3,), (1,)),
           "b": tensor("BFloat16Storage", "1", 2, 0, (2,), (1,))}
    storages = {"0": values.astype(">f8").tobytes(), "1": bf16.byteswap().tobytes()}
    out = read_state_dict(write_zip(tmp_path / "be.pth", dumps(obj), storages, byteorder="big"))
    assert out["d"].dtype == np.float64 and out["d"].tobytes() == values.tobytes()
    assert out["b"].dtype == ml_dtypes.bfloat16 and out["b"].tobytes() == bf16.tobytes()


# --- 5. nested dicts and key= --------------------------------------------------------------------

def _nested_checkpoint(tmp_path: Path) -> Path:
    weights = collections.OrderedDict([("b", tensor("FloatStorage", "0", 4, 0, (2, 2), (2, 1))),
                                       ("a", tensor("FloatStorage", "0", 4, 3, (), ()))])
    obj = {"epoch": 3, "state_dict": weights, "dtype": Global("torch", "bfloat16"),
           "optimizer": {"lr": 1e-4}}
    return write_zip(tmp_path / "nested.pth", dumps(obj), {"0": np.arange(4, dtype=np.float32).tobytes()})


def test_key_selects_nested_dict(tmp_path: Path) -> None:
    out = read_state_dict(_nested_checkpoint(tmp_path), key="state_dict")
    assert list(out) == ["b", "a"]
    np.testing.assert_array_equal(out["b"], np.arange(4, dtype=np.float32).reshape(2, 2))
    assert out["a"] == np.float32(3)


def test_non_tensor_top_level_lists_keys(tmp_path: Path) -> None:
    path = _nested_checkpoint(tmp_path)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "key=" in message
    for key in ["'epoch'", "'state_dict'", "'dtype'", "'optimizer'"]:
        assert key in message
    with pytest.raises(CheckpointError, match="key 'model' not found.*'state_dict'"):
        read_state_dict(path, key="model")
    with pytest.raises(CheckpointError, match="expected a dict of tensors under 'epoch'"):
        read_state_dict(path, key="epoch")
    with pytest.raises(CheckpointError, match="non-tensor entries: 'lr'"):
        read_state_dict(path, key="optimizer")


def test_key_is_rejected_for_safetensors() -> None:
    with pytest.raises(CheckpointError, match="flat dict"):
        read_state_dict(fixture("tiny_v1_state.safetensors"), key="state_dict")


# --- 6. write_safetensors ------------------------------------------------------------------------

def test_write_safetensors_round_trip(tmp_path: Path) -> None:
    tensors = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # non-contiguous view
        "bf16": np.array([1.5, -2.25], ml_dtypes.bfloat16),
        "idx": np.array([[1, 2]], np.int64),
        "scalar": np.array(0.25, np.float64),
    }
    path = tmp_path / "out.safetensors"
    write_safetensors(tensors, path, metadata={"config": "{}"})
    out = read_state_dict(path)
    assert set(out) == set(tensors)
    for key, want in tensors.items():
        assert out[key].dtype == want.dtype and out[key].shape == want.shape, key
        assert out[key].tobytes() == want.tobytes(order="C"), key
    with safetensors.safe_open(path, framework="np") as handle:
        assert handle.metadata() == {"config": "{}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_write_safetensors_rejects_non_arrays(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="numpy array"):
        write_safetensors({"w": [1.0]}, tmp_path / "x.safetensors")  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_write_safetensors_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot serialise"):
        write_safetensors({"s": np.array(["text"])}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("pre_existing", [False, True])
def test_write_safetensors_failure_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             pre_existing: bool) -> None:
    path = tmp_path / "out.safetensors"
    if pre_existing:
        path.write_bytes(b"old contents")

    def failing_save_file(tensors: dict, filename: Any, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors({"w": np.zeros(3, np.float32)}, path)
    if pre_existing:
        assert path.read_bytes() == b"old contents"
        assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    else:
        assert list(tmp_path.iterdir()) == []
