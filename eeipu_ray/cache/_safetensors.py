"""Zero-copy reading and writing of the safetensors format.

``safetensors.torch.save`` returns one ``bytes`` object (a full copy of every
tensor) and ``safetensors.torch.load`` copies again; for multi-GB state dicts
that halves the cache's throughput. The format is small and stable (an 8-byte
little-endian header length, a JSON header, then the raw tensor bytes at the
offsets the header gives), so the cache writes it as a list of buffers that
point into the tensors themselves, and reads each tensor with one copy out of
the (memory-mapped) file. The files stay standard safetensors: the tests check
both directions against the ``safetensors`` package.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
_CODES = {v: k for k, v in _DTYPES.items()}


def to_buffers(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> list[Any]:
    """Serialize ``tensors`` as ``[header, tensor bytes...]`` without copying
    contiguous CPU tensors (others are made contiguous on the CPU first)."""
    header: dict[str, Any] = {}
    bodies: list[Any] = []
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise TypeError(
                f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store"
            )
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        if n:
            bodies.append(t.reshape(-1).view(torch.uint8).numpy())
        offset += n
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    return [len(raw).to_bytes(8, "little") + raw, *bodies]


def from_buffer(buf: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse safetensors bytes into writable CPU tensors (one copy per tensor)."""
    import numpy as np

    view = memoryview(buf).cast("B")
    if view.nbytes < 8:
        raise ValueError("safetensors data shorter than its 8-byte header length")
    n = int.from_bytes(view[:8], "little")
    if n > view.nbytes - 8:
        raise ValueError(f"safetensors header length {n} exceeds the data ({view.nbytes} bytes)")
    header = json.loads(bytes(view[8 : 8 + n]))
    base = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    data = np.frombuffer(view, dtype=np.uint8)
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        dtype = _CODES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name!r} has unknown safetensors dtype {info['dtype']!r}")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= view.nbytes - base:
            raise ValueError(f"tensor {name!r} has offsets {begin}..{end} outside the data")
        t = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            t.numpy()[:] = data[base + begin : base + end]
        shape = [int(s) for s in info["shape"]]
        out[name] = t.view(dtype).reshape(shape) if end > begin else torch.empty(shape, dtype=dtype)
    return out, metadata
