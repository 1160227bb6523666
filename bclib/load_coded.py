"""Read a model written by ``bclib.coded.export_coded`` (entropy-coded format, versions 2 and 3).

This file imports only numpy, torch, constriction (the range coder) and the standard
library: copy it next to your code and call ``load_coded(path)``; bclib need not be
installed. The result is a plain ``nn.Sequential`` in eval mode that holds exactly the
network of ``bclib.compression.quantized(prune(...), bits)``, as ``bclib.load_compressed``
does for the bit-packed format: the same layers, weights and biases (a weight that rounds
to zero reads back as +0.0 whatever its sign).

Format version 3 (version 2: the same without the ``step`` weight model)::

    offset  bytes  field
    0       4      magic b"BCLC"
    4       1      format version (uint8)
    5       4      CRC-32 (zlib.crc32, little-endian) of every byte after this field
    9       ...    varint L (spec bytes), varint W (stream words)
    ...     L      spec: the layers in forward order, as varints (below)
    ...     4 W    stream: one range-coded message (constriction 0.5 ``RangeEncoder``,
                   little-endian uint32 words) holding every layer's values in spec order

A varint is unsigned LEB128; signed values are zigzag-mapped first. The spec is the layer
count, then per layer its type and fields: ``linear`` in, out; ``conv2d`` in, out, kernel,
stride, padding, dilation (two each); both then a bias flag, the exponent bits ``E``, the
significand bits ``S``, ``e_max`` (signed), the weight model and its two parameters ``ctx``
and ``k``, and for a bias its lowest and highest float32 exponent and its mantissa bits
``M``; after ``k``, a layer of the ``step`` model adds its step (the float32's bits, unsigned),
the least integer ``n_min`` (signed) and the alphabet size ``K``. ``relu``; ``maxpool2d``
kernel, stride, padding, dilation (two each), ceil_mode; ``flatten`` start_dim, end_dim
(signed); ``select`` mask length, kept count, context period ``p``.

The stream codes each weight as bclib's bit-precision fields (:mod:`bclib.precision`): an
exponent code ``c`` in ``0 .. 2^E - 1`` (0: the weight is zero, else the weight is
``(-1)^sign (1 + f / 2^S) 2^(e_max + 1 - c)``), then, for non-zero weights only, the sign and
the ``S``-bit significand ``f``. Fields are coded one after the other over the whole layer
(all codes, then all signs, then the significands), in row-major weight order, under the
layer's model:

- ``uniform`` (0): every field at its fixed width (the bit-packed file's cost);
- ``symbol`` (1): each weight's whole value as one symbol of an adaptive model over the
  layer's ``2 (2^E - 1) 2^S + 1`` values;
- ``factored`` (2): adaptive models for the code (one per output row where ``ctx`` = 1), for
  the sign, and for the top ``k`` significand bits given the code; the other bits uniform;
- ``step`` (3): the weights are ``step * n`` on a uniform grid (:mod:`bclib.uniform_grid`;
  the spec's ``E``, ``S``, ``e_max`` and ``k`` are 0), each ``n - n_min`` one symbol of an
  alphabet of ``K`` under an adaptive model (one per output row where ``ctx`` = 1), and
  ``step * n`` computed in float32.

An adaptive model is the Krichevsky-Trofimov estimator: symbol ``s`` of an alphabet of ``K``
has probability ``(n_s + 1/2) / (n + K/2)`` after ``n`` symbols of which ``n_s`` were ``s``, so
the decoder learns the empirical distribution as it reads, and no table is stored (an alphabet
of one symbol codes nothing). Biases are
float32: a uniform sign bit, the 8-bit exponent under an adaptive model over the layer's
range of exponents, and the top ``M`` of the 23 mantissa bits, uniform (the others are
zero: biases rounded to ``M`` significand bits). A select mask (the kept input features)
codes each bit under an adaptive model given the previous bit and the bit ``p`` places back
(``p`` = 0: the previous bit only). Uniform fields wider than 12 bits are split into 12-bit
chunks, high chunk first.
"""
from __future__ import annotations

import struct
import zlib
from os import PathLike
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import nn

try:
    import constriction
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "reading or writing entropy-coded files needs the range coder constriction: pip install 'constriction>=0.5,<0.6'"
    ) from err

MAGIC = b"BCLC"
FORMAT_VERSION = 3  # 3: the step model; 2: biases keep M mantissa bits (version 1: always 23)
READS = (2, 3)  # the writer writes version 2 where no layer uses the step model
HEADER = struct.Struct("<4sBI")  # magic, format version, CRC-32 of the rest
CHUNK_BITS = 12  # uniform fields are coded in chunks of at most this many bits
MAX_EXPONENT_BITS = 8
MAX_SIGNIFICAND_BITS = 23
MAX_SYMBOL_ALPHABET = 1 << 12  # the "symbol" model is written only for layers with at most this many values
LAYER_TYPES = ("linear", "conv2d", "relu", "maxpool2d", "flatten", "select")
WEIGHT_MODELS = ("uniform", "symbol", "factored", "step")
MAX_STEP_ALPHABET = 1 << 16  # integers a step layer may span
CTX_NONE, CTX_ROW = 0, 1  # context of the factored model's exponent codes: none, or the output row


class CodedFormatError(ValueError):
    """The file is not a valid entropy-coded bclib model (wrong magic, damaged, truncated, newer version)."""


def kt_weights(counts: np.ndarray) -> np.ndarray:
    """Unnormalised Krichevsky-Trofimov probabilities ``2 n_s + 1`` (exact in float64): ``(n_s + 1/2) / (n + K/2)``."""
    return 2.0 * counts + 1.0


def chunk_widths(bits: int) -> list[int]:
    """Widths of the uniform chunks of a ``bits``-bit field, high chunk first (12, 12, ..., rest)."""
    widths = [CHUNK_BITS] * (bits // CHUNK_BITS)
    return ([bits % CHUNK_BITS] if bits % CHUNK_BITS else []) + widths


def zigzag(v: int) -> int:
    return 2 * v if v >= 0 else -2 * v - 1


def unzigzag(u: int) -> int:
    return u // 2 if u % 2 == 0 else -(u + 1) // 2


class SelectFeatures(nn.Module):
    """Keeps the input features (last dimension) that the next linear layer still uses."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(-1, self.index)

    def extra_repr(self) -> str:
        return f"kept={self.index.numel()}"


def load_coded(path: Union[str, PathLike]) -> nn.Sequential:
    """The network stored at ``path``; :class:`CodedFormatError` if the file is not a valid version-2 or -3 model."""
    spec, words = read_file(Path(path).read_bytes())
    stream = _Decoder(words)
    try:
        modules = [_build(layer, stream) for layer in _Spec(spec).layers()]
    except (ValueError, IndexError, OverflowError, RuntimeError) as err:
        if isinstance(err, CodedFormatError):
            raise
        raise CodedFormatError(f"file altered or corrupt: {err}") from err
    if not stream.dec.maybe_exhausted():
        raise CodedFormatError("file altered or corrupt: the coded stream does not end where the last layer does")
    return nn.Sequential(*modules).eval()


def read_file(data: bytes) -> tuple[bytes, np.ndarray]:
    """Check magic, version, lengths and CRC-32; return the spec bytes and the stream's words."""
    if data[: len(MAGIC)] != MAGIC[: len(data)]:
        raise CodedFormatError(
            "not an entropy-coded bclib model (wrong magic bytes; expected a file written by bclib.coded)"
        )
    if len(data) < HEADER.size + 2:
        raise CodedFormatError(f"truncated entropy-coded bclib model: {len(data)} bytes, shorter than its header")
    _, version, crc = HEADER.unpack_from(data)
    if version not in READS:
        fix = ("update bclib" if version > FORMAT_VERSION else
               "written by an older bclib: write it again with bclib.coded.export_coded")  # fmt: skip
        raise CodedFormatError(f"format version {version}, this loader reads {' and '.join(map(str, READS))}: {fix}")
    pos = HEADER.size
    spec_len, pos = _varint(data, pos)
    n_words, pos = _varint(data, pos)
    end = pos + spec_len + 4 * n_words
    if len(data) < end:
        raise CodedFormatError(
            f"truncated entropy-coded bclib model (or damaged header): {len(data)} bytes, header announces {end}"
        )
    if len(data) > end:
        raise CodedFormatError(f"file altered or corrupt: {len(data) - end} bytes after the end that the header announces")
    if zlib.crc32(data[HEADER.size :]) != crc:
        raise CodedFormatError("file altered or corrupt: CRC-32 mismatch")
    words = np.frombuffer(data[pos + spec_len : end], "<u4").astype(np.uint32)
    return data[pos : pos + spec_len], words


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The unsigned LEB128 number at ``data[pos:]`` and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise CodedFormatError("truncated entropy-coded bclib model: a number runs past the end of the file")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
        if shift > 63:
            raise CodedFormatError("file altered or corrupt: a number in the header is too long")


class _Spec:
    """Reads the varints of the spec."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def int(self, limit: int = 1 << 31) -> int:
        v, self.pos = _varint(self.data, self.pos)
        if v >= limit:
            raise CodedFormatError(f"file altered or corrupt: spec value {v} out of range (below {limit})")
        return v

    def signed(self) -> int:
        return unzigzag(self.int(1 << 32))

    def ints(self, n: int) -> tuple[int, ...]:
        return tuple(self.int() for _ in range(n))

    def layers(self) -> list[dict]:
        layers = [self._layer() for _ in range(self.int(1 << 16))]
        if self.pos != len(self.data):
            extra = len(self.data) - self.pos
            raise CodedFormatError(f"file altered or corrupt: {extra} spec bytes after the last layer")
        return layers

    def _layer(self) -> dict:
        kind = LAYER_TYPES[self.int(len(LAYER_TYPES))]
        layer: dict = {"type": kind}
        if kind in ("linear", "conv2d"):
            layer["in"], layer["out"] = self.ints(2)
            if kind == "conv2d":
                layer["kernel"], layer["stride"], layer["padding"], layer["dilation"] = (self.ints(2) for _ in range(4))
            layer["bias"] = bool(self.int(2))
            layer["E"], layer["S"] = self.int(MAX_EXPONENT_BITS + 1), self.int(MAX_SIGNIFICAND_BITS + 1)
            layer["e_max"] = self.signed()
            layer["model"], layer["ctx"] = self.int(len(WEIGHT_MODELS)), self.int(2)
            layer["k"] = self.int(layer["S"] + 1)
            if WEIGHT_MODELS[layer["model"]] == "step":
                layer["step"] = struct.unpack("<f", struct.pack("<I", self.int(1 << 32)))[0]
                if not (np.isfinite(layer["step"]) and layer["step"] > 0):
                    raise CodedFormatError(f"file altered or corrupt: grid step {layer['step']} is not positive")
                layer["n_min"], layer["K"] = self.signed(), self.int(MAX_STEP_ALPHABET + 1)
                if layer["K"] < 1:
                    raise CodedFormatError("file altered or corrupt: a grid layer's alphabet is empty")
            if layer["bias"]:
                layer["bias_e"], layer["bias_m"] = self.ints(2), self.int(24)
        elif kind == "maxpool2d":
            layer["kernel"], layer["stride"], layer["padding"], layer["dilation"] = (self.ints(2) for _ in range(4))
            layer["ceil_mode"] = bool(self.int(2))
        elif kind == "flatten":
            layer["start_dim"], layer["end_dim"] = self.signed(), self.signed()
        elif kind == "select":
            layer["length"], layer["kept"], layer["period"] = self.int(), self.int(), self.int()
        return layer


class _Decoder:
    """The range-coded stream, read field by field as :mod:`bclib.coded` wrote it."""

    def __init__(self, words: np.ndarray) -> None:
        self.dec = constriction.stream.queue.RangeDecoder(words)
        self.family = constriction.stream.model.Categorical(perfect=False)

    def uniform(self, n: int, bits: int) -> np.ndarray:
        """``n`` unsigned ``bits``-bit fields."""
        out = np.zeros(n, np.int64)
        for width in chunk_widths(bits):
            if n:
                chunk = self.dec.decode(constriction.stream.model.Uniform(1 << width), n)
                out = (out << width) | chunk.astype(np.int64)
        return out

    def adaptive(self, contexts: np.ndarray, size: int) -> np.ndarray:
        """One symbol of an alphabet of ``size`` per entry of ``contexts``, each context its own adaptive model."""
        if size == 1:  # nothing was coded: the symbol is certain
            return np.zeros(len(contexts), np.int64)
        counts = np.zeros((int(contexts.max()) + 1 if len(contexts) else 0, size))
        out = np.empty(len(contexts), np.int64)
        for i, c in enumerate(contexts):
            s = int(self.dec.decode(self.family, kt_weights(counts[c])[None, :])[0])
            counts[c, s] += 1
            out[i] = s
        return out

    def mask(self, n: int, period: int) -> np.ndarray:
        """``n`` bits, each under an adaptive model given the previous bit and the bit ``period`` places back."""
        counts, bits = np.zeros((4, 2)), np.zeros(n, np.int64)
        for i in range(n):
            c = mask_context(bits, i, period)
            bits[i] = int(self.dec.decode(self.family, kt_weights(counts[c])[None, :])[0])
            counts[c, bits[i]] += 1
        return bits


def mask_context(bits: np.ndarray, i: int, period: int) -> int:
    """Context of mask bit ``i``: the previous bit, plus twice the bit ``period`` places back (0 before the start)."""
    prev = int(bits[i - 1]) if i >= 1 else 0
    back = int(bits[i - period]) if period and i >= period else 0
    return prev + 2 * back


def weight_contexts(n: int, rows: int, ctx: int) -> np.ndarray:
    """Context of each weight's exponent code (row-major order): 0, or its output row."""
    if ctx == CTX_ROW and rows:
        return np.repeat(np.arange(rows), n // rows)
    return np.zeros(n, np.int64)


def decode_weights(stream: _Decoder, n: int, rows: int, layer: dict) -> np.ndarray:
    """The layer's ``n`` weights (float32), decoded under its model."""
    E, S, model = layer["E"], layer["S"], WEIGHT_MODELS[layer["model"]]
    if model == "step":
        sym = stream.adaptive(weight_contexts(n, rows, layer["ctx"]), layer["K"])
        return (sym + layer["n_min"]).astype(np.float32) * np.float32(layer["step"])
    if model == "symbol":
        sym = stream.adaptive(np.zeros(n, np.int64), symbol_alphabet(E, S))
        code, sign, frac = symbol_fields(sym, S)
    else:
        if model == "uniform":
            code = stream.uniform(n, E)
        else:
            code = stream.adaptive(weight_contexts(n, rows, layer["ctx"]), 1 << E)
        nz = code > 0
        sign, frac = np.zeros(n, np.int64), np.zeros(n, np.int64)
        k = layer["k"] if model == "factored" else 0
        if model == "uniform":
            sign[nz] = stream.uniform(int(nz.sum()), 1)
        else:
            sign[nz] = stream.adaptive(np.zeros(int(nz.sum()), np.int64), 2)
        top = stream.adaptive(code[nz], 1 << k) if k else np.zeros(int(nz.sum()), np.int64)
        frac[nz] = (top << (S - k)) | stream.uniform(int(nz.sum()), S - k)
    return weight_values(code, sign, frac, S, layer["e_max"])


def symbol_alphabet(E: int, S: int) -> int:
    """Values of a layer with ``E`` exponent and ``S`` significand bits: zero, and a sign for each non-zero."""
    return 2 * ((1 << E) - 1) * (1 << S) + 1


def symbol_fields(sym: np.ndarray, S: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(code, sign, significand) of symbols ``0`` (zero) and ``1 + 2 ((code - 1) 2^S + f) + sign``."""
    v = np.maximum(sym - 1, 0)
    code = np.where(sym > 0, (v >> 1 >> S) + 1, 0)
    frac = np.where(sym > 0, (v >> 1) & ((1 << S) - 1), 0)
    return code, np.where(sym > 0, v & 1, 0), frac


def weight_values(code: np.ndarray, sign: np.ndarray, frac: np.ndarray, S: int, e_max: int) -> np.ndarray:
    """``(-1)^sign (1 + f / 2^S) 2^(e_max + 1 - code)``, and +0.0 where the code is 0 (as float32)."""
    if code.size and int(code.max()) >= 1 << MAX_EXPONENT_BITS:
        raise CodedFormatError("file altered or corrupt: exponent code out of range")
    mag = np.ldexp(1.0 + frac / 2.0**S, (e_max + 1 - code).astype(np.int32))
    mag[code == 0] = 0.0
    return np.where(sign == 1, -mag, mag).astype(np.float32)


def decode_bias(stream: _Decoder, n: int, lo_hi: tuple[int, int], mantissa: int) -> np.ndarray:
    """``n`` float32 biases: sign, exponent (adaptive over ``lo .. hi``), the top ``mantissa`` mantissa bits."""
    lo, hi = lo_hi
    if not lo <= hi <= 255:
        raise CodedFormatError(f"file altered or corrupt: bias exponent range {lo}..{hi}")
    sign = stream.uniform(n, 1)
    exp = stream.adaptive(np.zeros(n, np.int64), hi - lo + 1) + lo
    mant = stream.uniform(n, mantissa) << (23 - mantissa)
    return ((sign << 31) | (exp << 23) | mant).astype(np.uint32).view(np.float32)


def _build(layer: dict, stream: _Decoder) -> nn.Module:
    kind = layer["type"]
    if kind == "relu":
        return nn.ReLU()
    if kind == "maxpool2d":
        return nn.MaxPool2d(
            layer["kernel"], layer["stride"], layer["padding"], layer["dilation"], ceil_mode=layer["ceil_mode"]
        )
    if kind == "flatten":
        return nn.Flatten(layer["start_dim"], layer["end_dim"])
    if kind == "select":
        mask = stream.mask(layer["length"], layer["period"])
        index = np.flatnonzero(mask)
        if len(index) != layer["kept"]:
            raise CodedFormatError(
                f"file altered or corrupt: select mask keeps {len(index)} features, spec says {layer['kept']}"
            )
        return SelectFeatures(torch.from_numpy(index.astype(np.int64)))
    module: nn.Module
    if kind == "linear":
        module = nn.Linear(layer["in"], layer["out"], bias=layer["bias"])
    else:
        module = nn.Conv2d(layer["in"], layer["out"], layer["kernel"], layer["stride"], layer["padding"],
                           layer["dilation"], bias=layer["bias"])  # fmt: skip
    w = decode_weights(stream, module.weight.numel(), layer["out"], layer)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(w).view_as(module.weight))
        if module.bias is not None:
            module.bias.copy_(torch.from_numpy(decode_bias(stream, layer["out"], layer["bias_e"], layer["bias_m"])))
    return module

