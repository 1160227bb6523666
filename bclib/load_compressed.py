"""Read a model written by ``bclib.export.export_compressed`` (file format version 1).

This file imports only torch, numpy and the standard library: copy it next to your code and
call ``load_compressed(path)``; bclib need not be installed. The result is a plain
``nn.Sequential`` in eval mode.

Format version 1 (little-endian)::

    offset  bytes  field
    0       4      magic b"BCLB"
    4       4      format version (uint32)
    8       4      CRC-32 (zlib.crc32) of every byte after this field
    12      4      spec length L (uint32)
    16      4      payload length P (uint32)
    20      L      spec: UTF-8 JSON {"layers": [...]}, the layers in forward order
    20+L    P      payload: one chunk per linear/conv2d/select layer, in spec order

A linear or conv2d chunk holds the layer's ``count`` weights in row-major order, each a
``1 + E + S``-bit field (sign, exponent code, significand; most significant bit first), the
fields concatenated and zero-padded to a whole byte; then, if the layer has a bias, its
float32 values (biases are few, so they are not reduced). A weight decodes as
``(-1)^sign (1 + f / 2^S) 2^(e_max + 1 - code)``, or 0 when ``code`` is 0 (paper sec. 4's
bit precision, with the exponent stored relative to the layer's largest, ``e_max``).
A select chunk is a bit mask over the incoming features (numpy bit order): the kept ones.

The writer folds each BatchNorm into the linear or conv layer right before it (scaling its
weights and shifting its bias, in float64, then float32) and then rounds the folded weights,
which keep that layer's bit widths: the file reproduces "fold, then round", not the rounded
layer followed by the BatchNorm. Dropout, an identity at inference, is not stored. Neither
adds a layer type, so such files are still format version 1.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from os import PathLike
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import nn

MAGIC = b"BCLB"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sII")  # magic, format version, CRC-32 of the rest
LENGTHS = struct.Struct("<II")  # spec length, payload length (covered by the CRC)
MAX_EXPONENT_BITS = 8
MAX_SIGNIFICAND_BITS = 23
# What to do with a damaged file, said in every error about one.
_FIX = "export it again with bclib.export.export_compressed, or restore the file from a copy"


class SelectFeatures(nn.Module):
    """Keeps the input features (last dimension) that the next linear layer still uses."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(-1, self.index)

    def extra_repr(self) -> str:
        return f"kept={self.index.numel()}"


def load_compressed(path: Union[str, PathLike]) -> nn.Sequential:
    """The network stored at ``path``; ``ValueError`` if the file is not a valid version-1 model."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give the path of a file written by export_compressed")
    if not path.is_file():
        raise FileNotFoundError(f"no compressed model at {path}: check the path (bclib.export.export_compressed writes one)")
    spec, payload = _read_file(path.read_bytes())
    layers = spec.get("layers") if isinstance(spec, dict) else None
    if not isinstance(layers, list):
        raise ValueError(f"malformed bclib compressed model: the spec has no layer list; {_FIX}")
    reader = _Reader(payload)
    modules = []
    for i, layer in enumerate(layers):
        try:
            modules.append(_build(layer, reader))
        except (KeyError, TypeError, AttributeError, RuntimeError) as err:
            raise ValueError(f"malformed bclib compressed model: layer {i} ({layer!r:.80}): {err!r}; {_FIX}") from err
    if reader.offset != len(payload):
        raise ValueError(f"file altered or corrupt: {len(payload) - reader.offset} payload bytes not described by the spec; {_FIX}")
    return nn.Sequential(*modules).eval()


def _read_file(data: bytes) -> tuple[Any, bytes]:
    """Check magic, version, length and CRC-32; return the parsed spec and the payload."""
    if data[: len(MAGIC)] != MAGIC[: len(data)]:
        raise ValueError("not a bclib compressed model (wrong magic bytes; expected a file written by bclib.export): "
                         "a checkpoint (.pt) loads with bclib.train.load_checkpoint, an ONNX file with onnxruntime")
    start = HEADER.size + LENGTHS.size
    if len(data) < start:
        raise ValueError(f"truncated bclib compressed model: {len(data)} bytes, shorter than the {start}-byte header; {_FIX}")
    _, version, crc = HEADER.unpack_from(data)
    if version > FORMAT_VERSION:
        raise ValueError(f"written by format version {version}, this loader reads {FORMAT_VERSION}: update bclib")
    if version != FORMAT_VERSION:
        raise ValueError(f"unknown format version {version} (this loader reads {FORMAT_VERSION}): file altered or corrupt; {_FIX}")
    spec_len, payload_len = LENGTHS.unpack_from(data, HEADER.size)
    end = start + spec_len + payload_len
    if len(data) < end:
        raise ValueError(f"truncated bclib compressed model (or damaged header): {len(data)} bytes, header announces {end}; {_FIX}")
    if len(data) > end:
        raise ValueError(f"file altered or corrupt: {len(data) - end} bytes after the end that the header announces; {_FIX}")
    if zlib.crc32(data[HEADER.size :]) != crc:
        raise ValueError(f"file altered or corrupt: CRC-32 mismatch; {_FIX}")
    try:
        spec = json.loads(data[start : start + spec_len].decode("utf-8"))
    except ValueError as err:
        raise ValueError(f"malformed bclib compressed model: unreadable spec ({err}); {_FIX}") from err
    return spec, data[start + spec_len :]


class _Reader:
    """Consumes the payload chunk by chunk."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.offset = payload, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.offset + n > len(self.payload):
            raise ValueError(f"file altered or corrupt: the payload is shorter than its spec says; {_FIX}")
        chunk = self.payload[self.offset : self.offset + n]
        self.offset += n
        return chunk


def _checked_int(v: Any, key: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not -(2**31) <= v < 2**31:
        raise ValueError(f"malformed bclib compressed model: {key}={v!r} is not a 32-bit integer; {_FIX}")
    return v


def _int(layer: dict, key: str) -> int:
    return _checked_int(layer[key], key)


def _ints(layer: dict, key: str) -> tuple[int, ...]:
    return tuple(_checked_int(v, key) for v in layer[key])


def _build(layer: dict, reader: _Reader) -> nn.Module:
    kind = layer["type"]
    if kind == "linear":
        n_in, n_out = _int(layer, "in_features"), _int(layer, "out_features")
        module: nn.Module = nn.Linear(n_in, n_out, bias=bool(layer["bias"]))
        _load_weights(module, layer, reader)
    elif kind == "conv2d":
        module = nn.Conv2d(
            _int(layer, "in_channels"), _int(layer, "out_channels"), _ints(layer, "kernel_size"),
            _ints(layer, "stride"), _ints(layer, "padding"), _ints(layer, "dilation"), bias=bool(layer["bias"]),
        )  # fmt: skip
        _load_weights(module, layer, reader)
    elif kind == "relu":
        module = nn.ReLU()
    elif kind == "maxpool2d":
        module = nn.MaxPool2d(
            _ints(layer, "kernel_size"), _ints(layer, "stride"), _ints(layer, "padding"), _ints(layer, "dilation"),
            ceil_mode=bool(layer["ceil_mode"]),
        )  # fmt: skip
    elif kind == "flatten":
        module = nn.Flatten(_int(layer, "start_dim"), _int(layer, "end_dim"))
    elif kind == "select":
        n, kept = _int(layer, "mask_length"), _int(layer, "kept")
        mask = np.unpackbits(np.frombuffer(reader.take(math.ceil(n / 8)), np.uint8), count=n)
        index = np.flatnonzero(mask)
        if len(index) != kept:
            raise ValueError(f"file altered or corrupt: select mask keeps {len(index)} features, spec says {kept}; {_FIX}")
        module = SelectFeatures(torch.from_numpy(index.astype(np.int64)))
    else:
        raise ValueError(f"unknown layer type {kind!r} in a format-version-{FORMAT_VERSION} file: update bclib")
    return module


@torch.no_grad()
def _load_weights(module: nn.Module, layer: dict, reader: _Reader) -> None:
    """Decode ``count`` packed weights (and the float32 bias) into ``module``."""
    exp_bits, sig_bits = _int(layer, "exponent_bits"), _int(layer, "significand_bits")
    e_max, count = _int(layer, "e_max"), _int(layer, "count")
    if count != module.weight.numel():
        shape = tuple(module.weight.shape)
        raise ValueError(f"malformed bclib compressed model: count {count} for a weight of shape {shape}; {_FIX}")
    if not (0 <= sig_bits <= MAX_SIGNIFICAND_BITS and (1 if count else 0) <= exp_bits <= MAX_EXPONENT_BITS):
        raise ValueError(
            f"bit widths out of range: exponent {exp_bits} (1..{MAX_EXPONENT_BITS}), "
            f"significand {sig_bits} (0..{MAX_SIGNIFICAND_BITS})"
        )
    width = 1 + exp_bits + sig_bits
    words = _unpack_bits(reader.take(math.ceil(count * width / 8)), count, width)
    frac = words & ((1 << sig_bits) - 1)
    code = (words >> sig_bits) & ((1 << exp_bits) - 1)
    mag = np.ldexp(1.0 + frac / 2.0**sig_bits, (e_max + 1 - code).astype(np.int32))
    mag[code == 0] = 0.0
    w = np.where(words >> (exp_bits + sig_bits) == 1, -mag, mag).astype(np.float32)
    module.weight.copy_(torch.from_numpy(w).view_as(module.weight))
    if module.bias is not None:
        n = module.bias.numel()
        module.bias.copy_(torch.from_numpy(np.frombuffer(reader.take(4 * n), "<f4").astype(np.float32)))


def _unpack_bits(buf: bytes, count: int, width: int) -> np.ndarray:
    """``count`` unsigned ``width``-bit fields (1..32, MSB first) from ``buf``, as int64."""
    bits = np.unpackbits(np.frombuffer(buf, np.uint8), count=count * width).reshape(count, width)
    padded = np.zeros((count, 32), np.uint8)
    padded[:, 32 - width :] = bits
    return np.packbits(padded, axis=1).view(">u4").ravel().astype(np.int64)
