"""Element types, named as safetensors names them.

Tie detection works on bytes, so most code needs only the size of an element.
Decoding to numbers (for drift reports) lives here too.
"""

from __future__ import annotations

from typing import Any

# safetensors dtype code -> bits per element
BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}

# torch dtype attribute name -> safetensors code
TORCH_TO_CODE: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e8m0fnu": "F8_E8M0",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "int64": "I64",
    "uint64": "U64",
    "float64": "F64",
    "complex64": "C64",
}
CODE_TO_TORCH = {code: name for name, code in TORCH_TO_CODE.items()}

_NUMPY_FLOAT = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}
_NUMPY_INT = {
    "BOOL": "u1",
    "U8": "u1",
    "I8": "i1",
    "I16": "<i2",
    "U16": "<u2",
    "I32": "<i4",
    "U32": "<u4",
    "I64": "<i8",
    "U64": "<u8",
}


def nbytes_of(dtype: str, numel: int) -> int | None:
    """Bytes taken by ``numel`` elements, or None when they do not fill whole bytes."""
    bits = BITS[dtype] * numel
    return bits // 8 if bits % 8 == 0 else None


def itemsize(dtype: str) -> int | None:
    """Bytes per element, or None for sub-byte types and block-quantized ones (a GGUF
    ``Q8_0``...), whose bytes are compared as bytes."""
    bits = BITS.get(dtype)
    return bits // 8 if bits is not None and bits % 8 == 0 else None


def uint_view(dtype: str) -> str | None:
    """A numpy unsigned type of the element's width, to move elements without decoding."""
    return {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}.get(itemsize(dtype) or 0)


def torch_dtype(dtype: str) -> Any:
    import torch

    return getattr(torch, CODE_TO_TORCH[dtype])


def to_float64(dtype: str, raw: bytes) -> Any:
    """Decode little-endian elements to a float64 numpy array (for differences)."""
    import numpy as np

    if dtype in _NUMPY_FLOAT:
        return np.frombuffer(raw, dtype=_NUMPY_FLOAT[dtype]).astype(np.float64)
    if dtype in _NUMPY_INT:
        return np.frombuffer(raw, dtype=_NUMPY_INT[dtype]).astype(np.float64)
    if dtype == "BF16":
        wide = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return wide.view(np.float32).astype(np.float64)
    if dtype in CODE_TO_TORCH:
        import torch

        t = torch.frombuffer(bytearray(raw), dtype=torch_dtype(dtype))
        if t.is_complex():
            t = t.abs()
        return t.to(torch.float64).numpy()
    return None  # sub-byte formats: differences are counted in bytes only
