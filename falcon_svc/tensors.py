"""Encode and decode the Open Inference Protocol's binary tensor data extension.

A binary request or response is a JSON header followed by raw tensor bytes: the
``Inference-Header-Content-Length`` HTTP header says where the JSON ends, and
each binary tensor's ``parameters.binary_data_size`` says how many of the
following bytes are its own, in the order the tensors are listed. A BYTES tensor
is its elements back to back, each a 4-byte little-endian length and then that
many bytes; an FP64 tensor is its values as little-endian IEEE 754 doubles, row
major.

Nothing here trusts a size it is told: every malformed header length or buffer
raises ``TensorDataError`` naming what is wrong (the v2 resource answers 400),
never an ``IndexError`` or a ``struct.error`` that would become a 500.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

HEADER_LENGTH_HEADER = "Inference-Header-Content-Length"
BINARY_MEDIA_TYPE = "application/octet-stream"

_ELEMENT_LENGTH = struct.Struct("<I")
# A decimal length longer than this is not a length any allowed body can have.
_MAX_HEADER_LENGTH_DIGITS = 12


class TensorDataError(ValueError):
    """A binary body or tensor that does not hold what its header says it holds."""


def split_body(raw: bytes, header_length: str) -> tuple[bytes, memoryview]:
    """Return the JSON header of a binary-extension body and a view of the tensor bytes after it.

    Raises:
        TensorDataError: ``header_length`` is not a positive decimal integer, or
            it is longer than the body.
    """
    value = header_length.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= _MAX_HEADER_LENGTH_DIGITS):
        raise TensorDataError(f"{HEADER_LENGTH_HEADER} must be a decimal byte count, not {header_length[:40]!r}.")
    length = int(value)
    if length == 0 or length > len(raw):
        raise TensorDataError(
            f"{HEADER_LENGTH_HEADER} is {length}, but the JSON header must be 1 to {len(raw)} bytes "
            f"(the body has {len(raw)} bytes)."
        )
    return raw[:length], memoryview(raw)[length:]


def decode_text_tensor(data: memoryview, count: int) -> list[str]:
    """Return the ``count`` UTF-8 elements of a binary BYTES tensor, which must fill ``data`` exactly.

    Raises:
        TensorDataError: an element's length prefix or bytes are cut short, the
            bytes are not UTF-8, or bytes are left over after ``count`` elements.
    """
    size = len(data)
    offset = 0
    texts: list[str] = []
    for index in range(count):
        if size - offset < _ELEMENT_LENGTH.size:
            raise TensorDataError(
                f"The BYTES data ends after {index} of {count} elements: element {index} has no 4-byte length."
            )
        (length,) = _ELEMENT_LENGTH.unpack_from(data, offset)
        offset += _ELEMENT_LENGTH.size
        if length > size - offset:
            raise TensorDataError(
                f"Element {index} of the BYTES data says it has {length} bytes, but only {size - offset} remain."
            )
        try:
            texts.append(str(data[offset : offset + length], "utf-8"))
        except UnicodeDecodeError as ex:
            raise TensorDataError(f"Element {index} of the BYTES data is not valid UTF-8: {ex}.") from ex
        offset += length
    if offset != size:
        raise TensorDataError(
            f"{size - offset} bytes follow the {count} elements the shape declares in the BYTES data."
        )
    return texts


def encode_bytes_element(value: bytes) -> bytes:
    """Return one BYTES element as it is sent: its 4-byte little-endian length, then the bytes."""
    return _ELEMENT_LENGTH.pack(len(value)) + value


def encode_fp64_tensor(values: Sequence[float]) -> bytes:
    """Return ``values`` as little-endian IEEE 754 doubles, in order."""
    return struct.pack(f"<{len(values)}d", *values)
