"""A compact, versioned binary encoding of named numpy arrays plus a small JSON header.

Covers: ``encode(arrays, meta) -> bytes`` and ``decode(bytes) -> (arrays, meta)``, used by gRPC
messages, the cache and persisted vocabulary maps. Little-endian, fixed dtype whitelist, no pickle:
decoding foreign or truncated bytes raises ``CodecError`` and never executes anything.

Layout (version 1)::

    b"FSW" | version u8 | header_len u32 | header (UTF-8 JSON) | array payloads back to back

The header holds ``meta`` and, per array, its name, dtype code, shape and byte length.

Leaves out: compression and transport framing.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

MAGIC = b"FSW"
VERSION = 1
_PREFIX = struct.Struct("<3sBI")

DTYPES: dict[str, np.dtype] = {
    "bool": np.dtype(np.bool_),
    "u8": np.dtype("<u1"),
    "i8": np.dtype("<i1"),
    "i16": np.dtype("<i2"),
    "i32": np.dtype("<i4"),
    "i64": np.dtype("<i8"),
    "f16": np.dtype("<f2"),
    "f32": np.dtype("<f4"),
    "f64": np.dtype("<f8"),
}


class CodecError(ValueError):
    """Bytes that are not a valid encoding of this version."""


def _code(array: np.ndarray) -> str:
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    for code, candidate in DTYPES.items():
        if candidate == dtype:
            return code
    raise CodecError(f"dtype {array.dtype} is not encodable (allowed: {', '.join(DTYPES)})")


def encode(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> bytes:
    """Encode named arrays (any shape, whitelisted dtypes) and a JSON-serialisable ``meta``."""
    specs = []
    payloads = []
    for name, value in arrays.items():
        array = np.asarray(value)
        code = _code(array)
        data = np.ascontiguousarray(array, dtype=DTYPES[code]).tobytes()
        specs.append({"name": name, "dtype": code, "shape": list(array.shape), "nbytes": len(data)})
        payloads.append(data)
    header = json.dumps(
        {"meta": dict(meta or {}), "arrays": specs}, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(header)), header, *payloads])


def header_size(data: bytes | bytearray | memoryview) -> int:
    """Bytes before the first array payload (prefix and JSON header) of an encoded value."""
    _, _, header_len = _PREFIX.unpack_from(data, 0)
    return int(_PREFIX.size + header_len)


def decode(data: bytes | bytearray | memoryview) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of ``encode``. Raises ``CodecError`` on anything malformed."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise CodecError("too short for a header")
    magic, version, header_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise CodecError("bad magic: not a fuseserve wire value")
    if version != VERSION:
        raise CodecError(f"unsupported codec version {version} (this build reads {VERSION})")
    start = _PREFIX.size
    if start + header_len > len(view):
        raise CodecError("truncated header")
    try:
        header = json.loads(bytes(view[start : start + header_len]).decode("utf-8"))
        specs = header["arrays"]
        meta = header["meta"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CodecError(f"unreadable header: {exc}") from exc
    offset = start + header_len
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        try:
            name, code, shape, nbytes = spec["name"], spec["dtype"], spec["shape"], spec["nbytes"]
            dtype = DTYPES[code]
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"bad array spec {spec!r}") from exc
        bad_shape = any((not isinstance(d, int)) or d < 0 for d in shape)
        if bad_shape or count * dtype.itemsize != nbytes:
            raise CodecError(f"array {name!r}: shape {shape} does not match {nbytes} bytes")
        if offset + nbytes > len(view):
            raise CodecError(f"array {name!r} is truncated")
        arrays[name] = np.frombuffer(view[offset : offset + nbytes], dtype=dtype).reshape(shape)
        offset += nbytes
    if offset != len(view):
        raise CodecError(f"{len(view) - offset} trailing bytes")
    return arrays, meta
