"""Safetensors reading and writing, and atomic file output.

The reader is our own (the format is an 8-byte length, a JSON header and raw little-endian
bytes) so that bf16 tensors come back as numpy arrays (via ml_dtypes, which jax ships) and a
truncated or corrupt file is reported in one line that names the file, before any tensor is used.
Tensors are memory-mapped: reading a 3 GB checkpoint does not first copy it into RAM.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pickle
import struct
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from cones_jax.errors import CheckpointError, ConfigError, OutputError

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """Returns (tensor entries, metadata, offset of the data section); validates sizes."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes); re-save or re-download it")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated or not a safetensors file (header claims {n} bytes, file has {size});"
                " re-save or re-download it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e}); re-save or re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header; re-save or re-download it")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    end = 0
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, stop = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry {name!r}; re-save or re-download it") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if stop - begin != int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} size does not match its shape {shape}; the file is corrupt")
        end = max(end, stop)
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: truncated (tensors need {data_start + end} bytes, file has {size}); re-save or re-download it")
    return header, metadata, data_start


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-maps every tensor of a safetensors file. Returns (name -> array view, metadata)."""
    header, metadata, data_start = read_header(path)
    tensors = {}
    if header:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        for name, entry in header.items():
            begin, stop = entry["data_offsets"]
            buf = mm[data_start + begin: data_start + stop]
            tensors[name] = buf.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return tensors, metadata


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Opens a temporary file beside `path`; renames it onto `path` only if the block succeeds.

    A crash, an exception or a full disk leaves `path` untouched and no temporary file behind.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented JSON with a final newline, written atomically (`atomic_output`)."""
    with atomic_output(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def check_output_dir(folder: str | os.PathLike, param: str = "out") -> None:
    """Refuses, before any work, an output folder that could not be written at the end: a path
    that is (or runs through) a file is bad input (`ConfigError`, exit 2); a folder, or the
    nearest existing parent of one still to be made, that this user cannot write is the
    environment (`OutputError`, exit 1). `param` names the option in the message."""
    path = os.path.abspath(os.fspath(folder))
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = ("is a file, not a folder" if probe == path else
                 f"runs through the file {probe}, and no folder can be made below what is a file")
        raise ConfigError(f"`{param}` {path} {where}; choose another `{param}`")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"`{param}` {path}: {probe} is not writable; fix its permissions or choose another "
                          f"`{param}`")


class OutputLock:
    """`<folder>/.cones_jax.lock`, held while a run writes there, so that two runs cannot both write
    the same files and both report success.

    An advisory `flock` rather than an O_EXCL file: the kernel drops it when its process dies, even
    by SIGKILL, so a stale lock file left behind never blocks a later run and there is no pid to
    second-guess. The file holds the holder's pid for the message. Folders made for the lock are
    removed again on release when nothing was written into them.
    """

    NAME = ".cones_jax.lock"

    def __init__(self, folder: str | os.PathLike, param: str = "out") -> None:
        self.folder, self.param = os.path.abspath(os.fspath(folder)), param
        self.path = os.path.join(self.folder, self.NAME)
        self._fd: int | None = None
        self._made: list[str] = []

    def __enter__(self) -> OutputLock:
        import fcntl

        missing, probe = [], self.folder
        while not os.path.exists(probe):
            missing.append(probe)
            probe = os.path.dirname(probe)
        os.makedirs(self.folder, exist_ok=True)
        self._made = missing  # deepest first, the order they are removed in
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                self._remove_made()
                raise OutputError(f"another run (pid {owner}) is writing to {self.folder}; wait for it to finish "
                                  f"or choose another `{self.param}`") from None
            # a holder that released and removed the file in between leaves us a lock on a dead inode
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self._fd)  # closing releases the flock
            self._fd = None
        self._remove_made()

    def _remove_made(self) -> None:
        for folder in self._made:
            with contextlib.suppress(OSError):  # not empty: something was written, keep it
                os.rmdir(folder)
        self._made = []


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors (and string metadata) to `path` atomically, in the standard safetensors layout."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        if arr.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps tensor data 8-byte aligned, as the reference writer does
    with atomic_output(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.tobytes())


def refuse_pickle(path: str | os.PathLike, allow_pickle: bool, alternative: str) -> None:
    """Pickle files can run arbitrary code when loaded: only with an explicit opt-in."""
    if not allow_pickle:
        raise CheckpointError(
            f"{os.fspath(path)} is a pickle file, which can run arbitrary code when loaded; "
            f"use {alternative} instead, or pass allow_pickle=True (--allow-pickle) if you trust it")


_TORCH_STORAGES = {"DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "LongStorage": "<i8",
                   "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
                   "BoolStorage": "?", "BFloat16Storage": ml_dtypes.bfloat16}


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_: object) -> np.ndarray:
    strides = [s * storage.itemsize for s in stride]
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size), strides=strides).copy()


def read_torch_tensor(path: str | os.PathLike) -> np.ndarray:
    """The tensor of a file written by `torch.save(tensor)` (its zip format), read without PyTorch.

    The pickle inside is read by an unpickler that resolves only the names such a file uses (the
    tensor rebuild function, storage types, OrderedDict): a file holding anything else is refused,
    never run.
    """
    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: not a PyTorch file in the zip format of torch.save since 1.6 ({e}); "
                              "re-save it with torch.save") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: not a torch.save file (no single data.pkl inside)")
        prefix = pickles[0][:-len("data.pkl")]
        if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder") != b"little":
            raise CheckpointError(f"{path}: big-endian tensors are not supported")

        class TensorUnpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str):
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return _rebuild_tensor
                if module == "torch" and name in _TORCH_STORAGES:
                    return np.dtype(_TORCH_STORAGES[name])
                if (module, name) == ("collections", "OrderedDict"):
                    return collections.OrderedDict
                raise CheckpointError(f"{path}: holds {module}.{name}; only a bare tensor is read")

            def persistent_load(self, pid: tuple):
                _, dtype, key, _, numel = pid
                try:
                    raw = archive.read(f"{prefix}data/{key}")
                except KeyError:
                    raise CheckpointError(f"{path}: storage {key} is missing; the file is corrupt") from None
                return np.frombuffer(raw, dtype=dtype, count=int(numel))

        try:
            value = TensorUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
        except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: corrupt torch.save file ({e})") from None
    if not isinstance(value, np.ndarray):
        raise CheckpointError(f"{path}: expected a bare tensor, found {type(value).__name__}")
    return value


CACHE_ENV = "CONES_JAX_CACHE"


def user_cache_dir() -> str:
    """The per-user cache: $CONES_JAX_CACHE, else $XDG_CACHE_HOME/cones_jax or ~/.cache/cones_jax."""
    return os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cones_jax")
