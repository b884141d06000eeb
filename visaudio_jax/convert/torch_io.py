"""Read PyTorch checkpoints into numpy without torch and without running pickled code.

Users bring the official PyTorch weights (``torch.save`` archives or safetensors). ``torch.load``
on an untrusted ``.pth`` file can execute arbitrary code, because a pickle may call any importable
function. Here the pickle inside a ``torch.save`` zip archive is read with an unpickler that only
resolves a small allow-list of names (``OrderedDict``, the tensor-rebuild helpers, the storage
classes, dtypes) and rebuilds tensors as numpy arrays from the raw storages; anything else is
refused before it can run.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ml_dtypes  # registers bfloat16 with numpy, also needed by safetensors' numpy loader
import numpy as np
import safetensors
import safetensors.numpy
from numpy.lib.stride_tricks import as_strided

from visaudio_jax.files import atomic_path

__all__ = ["CheckpointError", "read_state_dict", "write_safetensors"]

_CONVERT_HINT = (
    "re-save it with torch.save(state_dict, path) under torch>=1.6 (zip format, the default), "
    "or export it to safetensors (safetensors.torch.save_file)"
)

# Legacy storage classes as written by torch.save (persistent ids name these, also in torch>=2).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "IntStorage": np.dtype(np.int32),
    "LongStorage": np.dtype(np.int64),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

# ``torch.float32`` etc. pickle as the global ``torch.<name>``; they become numpy dtypes.
_TORCH_DTYPES: dict[str, np.dtype] = {dtype.name: dtype for dtype in _STORAGE_DTYPES.values()}


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsupported, unsafe or not a dict of tensors."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.<X>Storage`` class named in a persistent id."""

    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """Lazy reference to the raw storage ``data/<key>`` of a zip checkpoint."""

    dtype: np.dtype
    key: str
    numel: int


def _fail(path: str | os.PathLike, detail: str) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path)}: {detail}")


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a torch zip archive, resolving only allow-listed globals."""

    def __init__(self, file: Any, path: str | os.PathLike, archive: zipfile.ZipFile, prefix: str,
                 big_endian: bool) -> None:
        super().__init__(file)
        self._path = path
        self._archive = archive
        self._prefix = prefix
        self._big_endian = big_endian
        self._cached: tuple[str, bytes] | None = None  # last storage read: views often share it

    def find_class(self, module: str, name: str) -> Any:
        allowed: dict[tuple[str, str], Callable[..., Any]] = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        }
        if (module, name) in allowed:
            return allowed[module, name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        if module == "torch" and name.endswith("Storage"):
            raise _fail(self._path, f"unsupported storage type torch.{name}; expected one of "
                                    f"{', '.join('torch.' + n for n in _STORAGE_DTYPES)}")
        raise _fail(self._path, f"refusing to load forbidden global {module}.{name}: only tensors "
                                "and plain containers are allowed in a checkpoint pickle")

    def persistent_load(self, pid: Any) -> _StorageRef:
        # torch.save writes ('storage', storage_class, key, location, numel).
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise _fail(self._path, f"expected a persistent id ('storage', type, key, location, "
                                    f"numel), found {pid!r}")
        tag, storage_type, key, _location, numel = pid
        if tag != "storage":
            raise _fail(self._path, f"unknown persistent id tag {tag!r}, expected 'storage'")
        if not isinstance(storage_type, _StorageType):
            raise _fail(self._path, f"unknown storage type {storage_type!r} for storage {key!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise _fail(self._path, f"malformed storage id {pid!r}")
        return _StorageRef(storage_type.dtype, key, numel)

    def _storage_bytes(self, ref: _StorageRef) -> bytes:
        if self._cached is None or self._cached[0] != ref.key:
            entry = f"{self._prefix}/data/{ref.key}"
            try:
                data = self._archive.read(entry)  # a full read also checks the CRC
            except KeyError:
                raise _fail(self._path, f"missing data entry {entry!r} in the zip archive") from None
            if len(data) < ref.numel * ref.dtype.itemsize:
                raise _fail(self._path, f"storage {entry!r} holds {len(data)} bytes, expected "
                                        f"{ref.numel} x {ref.dtype.itemsize} bytes ({ref.dtype})")
            self._cached = (ref.key, data)
        return self._cached[1]

    def _rebuild_tensor_v2(self, storage: Any, storage_offset: Any, size: Any, stride: Any,
                           *_ignored: Any) -> np.ndarray:
        """Numpy version of ``torch._utils._rebuild_tensor_v2`` (grad flags/hooks are dropped)."""
        if not isinstance(storage, _StorageRef):
            raise _fail(self._path, f"tensor rebuild expected a storage, found {storage!r}")
        if not (_is_index_tuple(size) and _is_index_tuple(stride) and len(size) == len(stride)
                and isinstance(storage_offset, int) and storage_offset >= 0):
            raise _fail(self._path, f"malformed tensor view: offset {storage_offset!r}, size "
                                    f"{size!r}, stride {stride!r}")
        if 0 in size:
            extent = 0
        else:
            extent = 1 + sum((n - 1) * s for n, s in zip(size, stride))
        if storage_offset + extent > storage.numel:
            raise _fail(self._path, f"storage {storage.key!r} has {storage.numel} elements, a tensor "
                                    f"with offset {storage_offset}, size {tuple(size)}, stride "
                                    f"{tuple(stride)} needs {storage_offset + extent}")
        flat = np.frombuffer(self._storage_bytes(storage), dtype=storage.dtype, count=storage.numel)
        itemsize = storage.dtype.itemsize
        view = as_strided(flat[storage_offset:], shape=tuple(size),
                          strides=tuple(s * itemsize for s in stride), writeable=False)
        array = view.copy()
        if self._big_endian:
            array.byteswap(inplace=True)
        return array


def _is_index_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) and v >= 0 for v in value)


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    """``torch._utils._rebuild_parameter[_with_state]``: a parameter is just its tensor here."""
    return data


def _read_torch_zip(path: str | os.PathLike) -> Any:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise _fail(path, f"expected exactly one '<prefix>/data.pkl' in the zip archive, "
                                  f"found {pickles or 'none'}")
            prefix = pickles[0].split("/")[0]
            if f"{prefix}/constants.pkl" in names or any(n.startswith(f"{prefix}/code/")
                                                         for n in names):
                raise _fail(path, f"unsupported format: TorchScript archive (torch.jit.save); "
                                  f"load it in PyTorch and save its state_dict: {_CONVERT_HINT}")
            byteorder = "little"
            if f"{prefix}/byteorder" in names:
                byteorder = archive.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise _fail(path, f"byteorder entry is {byteorder!r}, expected 'little' or 'big'")
            with archive.open(pickles[0]) as file:
                return _SafeUnpickler(file, path, archive, prefix, byteorder == "big").load()
    except CheckpointError:
        raise
    except Exception as exc:  # untrusted bytes: zip, pickle and numpy can fail in many ways
        raise _fail(path, f"corrupted or truncated torch zip checkpoint "
                          f"({type(exc).__name__}: {exc})") from exc


def _select_tensors(obj: Any, key: str | None, path: str | os.PathLike) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise _fail(path, f"expected a dict of tensors at the top level, found {type(obj).__name__}")
    keys = ", ".join(repr(k) for k in list(obj)[:20]) + (", ..." if len(obj) > 20 else "")
    if key is not None:
        if key not in obj:
            raise _fail(path, f"key {key!r} not found; top-level keys: [{keys}]")
        obj = obj[key]
        if not isinstance(obj, dict):
            raise _fail(path, f"expected a dict of tensors under {key!r}, "
                              f"found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if bad:
        where = "top level" if key is None else f"dict under {key!r}"
        hint = "; pass key=... to select the nested dict of tensors" if key is None else ""
        raise _fail(path, f"the {where} is not a flat dict of str -> tensor (non-tensor entries: "
                          f"{', '.join(repr(k) for k in bad[:20])}); top-level keys: [{keys}]{hint}")
    return dict(obj)


def read_state_dict(path: str | os.PathLike, key: str | None = None,
                    wrappers: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Read the tensors of a safetensors file or a ``torch.save`` zip archive, in stored order.

    ``key`` selects a nested dict of tensors (e.g. ``'state_dict'``, ``'model'``, ``'ema'``) in a
    torch checkpoint whose top level holds more than tensors. With ``key=None``, ``wrappers`` are
    the nested keys tried in order when the top level is not a flat dict of tensors (the file is
    read once); if none fits, the top-level error is raised. Raises ``CheckpointError``.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(9)
        size = os.path.getsize(path)
    except OSError as exc:
        raise _fail(path, f"cannot read file ({exc})") from exc

    if len(head) == 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        if key is not None:
            raise _fail(path, f"key={key!r} given, but a safetensors file is a flat dict of tensors")
        try:
            return safetensors.numpy.load_file(path)
        except Exception as exc:  # SafetensorError, or numpy rejecting a dtype
            raise _fail(path, f"corrupted or unsupported safetensors file "
                              f"({type(exc).__name__}: {exc})") from exc
    if head.startswith(b"PK\x03\x04"):
        obj = _read_torch_zip(path)
        try:
            return _select_tensors(obj, key, path)
        except CheckpointError:
            if key is not None:
                raise
            for wrapper in wrappers:
                if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                    try:
                        return _select_tensors(obj, wrapper, path)
                    except CheckpointError:
                        continue
            raise
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise _fail(path, f"unsupported format: a plain pickle, i.e. a legacy (pre-1.6, non-zip) "
                          f"torch.save checkpoint; {_CONVERT_HINT}")
    raise _fail(path, f"unrecognised format (header {head[:8]!r}): expected a safetensors file or "
                      f"a PyTorch zip checkpoint; {_CONVERT_HINT}")


def write_safetensors(tensors: dict[str, np.ndarray], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` as safetensors, atomically (temp file, fsync, rename).

    A failure leaves no partial file and no temp file behind, and keeps an existing ``path``.
    """
    path = Path(path)
    bad = [k for k, v in tensors.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if bad:
        raise _fail(path, f"expected a dict of str -> numpy array, bad entries: {bad[:20]}")
    # safetensors.numpy reads raw memory, so views must be made contiguous first (keeping 0-dim).
    contiguous = {k: v if v.flags.c_contiguous else v.copy(order="C") for k, v in tensors.items()}
    with atomic_path(path, durable=True) as tmp:
        try:
            safetensors.numpy.save_file(contiguous, tmp, metadata=metadata)
        except safetensors.SafetensorError as exc:
            raise _fail(path, f"cannot serialise tensors ({exc})") from exc
