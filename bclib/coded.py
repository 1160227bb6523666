"""An entropy-coded network file, held against the KL that bits-back coding promises.

``export_coded(model, thresholds, path)`` writes the network of
``bclib.compression.quantized(prune(model, thresholds), bits)`` (the net the bit-packed file
of :mod:`bclib.export` holds) with constriction's range coder: each weight's bit-precision
fields (exponent code, sign, significand; :mod:`bclib.precision`) are coded under a
probability model of the layer's values, which the decoder can rebuild without the
posterior. A quantized value ``v`` then costs ``-log2 p(v)`` bits instead of its fixed width
``1 + E + S``. Per layer the writer picks, from the models that :mod:`bclib.load_coded`
documents, the one with the shortest code (model selection by description length); the
reader, a single file, needs only numpy, torch and constriction.

``kept_kl`` gives the description length that the paper's argument promises: the KL of the
kept posterior from the prior, in bits (chapter 1: bits-back coding of a posterior sample
costs ``KL(q || p)``). ``bits_below_noise`` counts the significand bits of a layer that
resolve its weights more finely than their posterior standard deviation: bits that the
quantized means carry and a bits-back code would not pay for.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import constriction
import numpy as np
import torch
import torch.fx
from torch import nn

from . import precision
from .atomic import atomic_write
from .compression import LayerBits, LayerMask, _kept, compression_report, group_masks, prune, quantized
from .convert import bayesian_layers
from .export import _DROPOUTS, _FLOAT32_BITS, _bits_by_layer, _pair, fold_batchnorm
from .kl import kl_log_uniform, kl_lognormal_gamma, kl_lognormal_invgamma, kl_std_normal
from .load_coded import (
    CTX_NONE, CTX_ROW, FORMAT_VERSION, LAYER_TYPES, MAGIC, MAX_STEP_ALPHABET, MAX_SYMBOL_ALPHABET, WEIGHT_MODELS,
    chunk_widths, kt_weights, mask_context, symbol_alphabet, weight_contexts, zigzag,
)  # fmt: skip
from .scales import HorseshoeScale, NormalJeffreysScale
from .uniform_grid import GridStep

PRECISION_MODELS = WEIGHT_MODELS[:3]  # the models of the bit-precision grid ("step" is the uniform grid's)
MAX_MASK_PERIOD = 64  # select masks: the writer tries context periods 0..64 (28 fits MNIST's rows)
_ROWS_PER_CHUNK = 1 << 22  # probability-table entries built at a time by the adaptive encoder
_LN2 = math.log(2.0)


# --- code lengths and the range encoder ---------------------------------------------------
def _adaptive_tables(symbols: np.ndarray, contexts: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of (symbols, KT probability table before each symbol), as the decoder rebuilds them."""
    running: dict[int, np.ndarray] = {}
    step = max(1, _ROWS_PER_CHUNK // size)
    for start in range(0, len(symbols), step):
        s, c = symbols[start : start + step], contexts[start : start + step]
        onehot = np.zeros((len(s), size))
        onehot[np.arange(len(s)), s] = 1.0
        before = np.empty_like(onehot)
        for ctx in np.unique(c):
            idx = np.flatnonzero(c == ctx)
            base = running.get(int(ctx), np.zeros(size))
            cum = np.cumsum(onehot[idx], axis=0)
            before[idx] = base + cum - onehot[idx]
            running[int(ctx)] = base + cum[-1]
        yield s, kt_weights(before)


def adaptive_bits(symbols: np.ndarray, contexts: np.ndarray, size: int) -> float:
    """Code length in bits of ``symbols`` under per-context adaptive (KT) models: ``sum -log2 p``."""
    total = 0.0
    for s, table in _adaptive_tables(symbols, contexts, size):
        total -= float(np.log2(table[np.arange(len(s)), s] / table.sum(1)).sum())
    return total


class _Encoder:
    """One range-coded message; every call appends fields in the order the reader decodes them."""

    def __init__(self) -> None:
        self.enc = constriction.stream.queue.RangeEncoder()
        self.family = constriction.stream.model.Categorical(perfect=False)

    def uniform(self, values: np.ndarray, bits: int) -> float:
        values = np.asarray(values, np.int64)
        shift = bits
        for width in chunk_widths(bits):
            shift -= width
            if len(values):
                chunk = ((values >> shift) & ((1 << width) - 1)).astype(np.int32)
                self.enc.encode(chunk, constriction.stream.model.Uniform(1 << width))
        return float(bits * len(values))

    def adaptive(self, symbols: np.ndarray, contexts: np.ndarray, size: int) -> float:
        if size == 1:  # a certain symbol: nothing to code (the reader knows it too)
            return 0.0
        total = 0.0
        for s, table in _adaptive_tables(np.asarray(symbols, np.int64), np.asarray(contexts, np.int64), size):
            self.enc.encode(s.astype(np.int32), self.family, table)
            total -= float(np.log2(table[np.arange(len(s)), s] / table.sum(1)).sum())
        return total

    def words(self) -> np.ndarray:
        return self.enc.get_compressed()


# --- weights --------------------------------------------------------------------------------
@dataclass
class WeightFields:
    """A layer's quantized weights as bit-precision fields, row-major (:func:`bclib.precision.encode`)."""

    code: np.ndarray
    sign: np.ndarray
    frac: np.ndarray
    rows: int
    bits: LayerBits
    e_max: int

    @classmethod
    def of(cls, weight: torch.Tensor, bits: LayerBits) -> "WeightFields":
        w = weight.detach().cpu().flatten()
        e_max = precision.max_exponent(w)
        sign, code, frac = (t.numpy() for t in precision.encode(w, bits.exponent, bits.significand, e_max))
        return cls(code, np.where(code > 0, sign, 0), frac, weight.shape[0], bits, e_max)

    @property
    def nonzero(self) -> np.ndarray:
        return self.code > 0

    def symbols(self) -> np.ndarray:
        """Whole values as symbols of the ``symbol`` model (see ``load_coded.symbol_fields``)."""
        S = self.bits.significand
        return np.where(self.nonzero, 1 + 2 * (((self.code - 1) << S) + self.frac) + self.sign, 0)


@dataclass(frozen=True)
class WeightModel:
    """A weight model of the format with its parameters: ``ctx`` and ``k`` of the factored model."""

    name: str
    ctx: int = CTX_NONE
    k: int = 0

    def __str__(self) -> str:
        return self.name if self.name != "factored" else f"factored(ctx={'row' if self.ctx else 'none'}, k={self.k})"


def candidate_models(bits: LayerBits) -> list[WeightModel]:
    """The models the writer tries for a layer of these bit widths."""
    out = [WeightModel("uniform")]
    if symbol_alphabet(bits.exponent, bits.significand) <= MAX_SYMBOL_ALPHABET:
        out.append(WeightModel("symbol"))
    out += [WeightModel("factored", ctx, k) for ctx in (CTX_NONE, CTX_ROW) for k in range(min(bits.significand, 3) + 1)]
    return out


def _code_weights(f: WeightFields, m: WeightModel, enc: Optional[_Encoder]) -> float:
    """Bits of the weights under ``m``: appended to ``enc``, or only counted where ``enc`` is None."""
    uniform = enc.uniform if enc else lambda v, b: float(b * len(v))
    adaptive = enc.adaptive if enc else adaptive_bits
    E, S, n = f.bits.exponent, f.bits.significand, len(f.code)
    if m.name == "symbol":
        return adaptive(f.symbols(), np.zeros(n, np.int64), symbol_alphabet(E, S))
    nz = f.nonzero
    if m.name == "uniform":
        return uniform(f.code, E) + uniform(f.sign[nz], 1) + uniform(f.frac[nz], S)
    bits = adaptive(f.code, weight_contexts(n, f.rows, m.ctx), 1 << E)
    bits += adaptive(f.sign[nz], np.zeros(int(nz.sum()), np.int64), 2)
    if m.k:
        bits += adaptive(f.frac[nz] >> (S - m.k), f.code[nz], 1 << m.k)
    return bits + uniform(f.frac[nz] & ((1 << (S - m.k)) - 1), S - m.k)


def weight_bits(weight: torch.Tensor, bits: LayerBits, model: WeightModel) -> float:
    """Code length (bits, ``sum -log2 p``) of a layer's weights rounded to ``bits`` under ``model``."""
    return _code_weights(WeightFields.of(weight, bits), model, None)


def _best_model(f: WeightFields) -> tuple[WeightModel, dict[str, float]]:
    costs = {m: _code_weights(f, m, None) for m in candidate_models(f.bits)}
    return min(costs, key=costs.get), {str(m): c for m, c in costs.items()}


def _bias_fields(bias: torch.Tensor) -> tuple[int, int, int]:
    """Lowest and highest float32 exponent of the biases, and the mantissa bits they use
    (23 less the trailing zeros all their mantissas share: fewer after ``quantized(..., bias_significand)``)."""
    u = bias.detach().cpu().numpy().astype("<f4").view(np.uint32).astype(np.int64)
    e, mant = (u >> 23) & 0xFF, u & ((1 << 23) - 1)
    used = next((m for m in range(24) if not (mant & ((1 << (23 - m)) - 1)).any()), 23)
    return int(e.min()), int(e.max()), used


def _code_bias(bias: torch.Tensor, enc: _Encoder) -> float:
    """Append float32 biases exactly: sign, exponent (adaptive over the layer's range), the mantissa
    bits in use; returns their bits."""
    u = bias.detach().cpu().numpy().astype("<f4").view(np.uint32).astype(np.int64)
    lo, hi, m = _bias_fields(bias)
    exp = ((u >> 23) & 0xFF) - lo
    bits = enc.uniform(u >> 31, 1) + enc.adaptive(exp, np.zeros(len(u), np.int64), hi - lo + 1)
    return bits + enc.uniform((u & ((1 << 23) - 1)) >> (23 - m), m)


# --- the file -------------------------------------------------------------------------------
@dataclass
class LayerCode:
    """How one weighted layer was coded: its model, and code lengths in bits (``sum -log2 p``)."""

    name: str
    weights: int
    bits: Union[LayerBits, GridStep]
    model: str
    weight_bits: float
    bias_bits: float
    width: int  # bits per weight at a fixed width: 1 + E + S, or those of the grid's integers
    model_bits: dict[str, float] = field(default_factory=dict)  # weights' code length under every candidate

    @property
    def fixed_bits(self) -> int:
        """The bit-packed width: ``weights (1 + E + S)`` (a grid layer: ``weights ceil(log2 K)``)."""
        return self.weights * self.width


@dataclass
class Encoded:
    """The coded file (``data``) and what its parts cost."""

    data: bytes
    layers: list[LayerCode]
    mask_bits: float
    spec_bytes: int
    stream_bytes: int  # the range-coded words; the rest is header and spec

    @property
    def size(self) -> int:
        return len(self.data)


def _varint(v: int) -> bytes:
    if v < 0:
        raise ValueError(f"a varint must be non-negative, got {v}")
    out = bytearray()
    while True:
        byte, v = v & 0x7F, v >> 7
        out.append(byte | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _varints(*values: int) -> bytes:
    return b"".join(_varint(v) for v in values)


def _chain(net: torch.fx.GraphModule) -> Iterator[tuple[str, object]]:
    """The layers of ``prune``'s output in forward order: (module name, module) or ("select", index)."""
    prev = None
    for node in net.graph.nodes:
        if node.op == "get_attr":
            continue
        if node.op != "placeholder" and node.args[0] is not prev:
            raise ValueError("export_coded needs a chain of layers, as bclib.compression.prune builds")
        prev = node
        if node.op == "call_module":
            m = net.get_submodule(node.target)
            if not isinstance(m, _DROPOUTS):
                yield node.target, m
        elif node.op == "call_method" and node.target == "index_select" and node.args[1] == -1:
            yield "select", net.get_buffer(node.args[2].target)
        elif node.op not in ("placeholder", "output"):
            raise TypeError(f"export_coded cannot store the operation {node.format_node()}")


def _select(index: torch.Tensor, enc: _Encoder) -> tuple[bytes, float]:
    """Spec and code length of a select mask, coded under the best context period."""
    n = int(index.max()) + 1 if index.numel() else 0
    mask = np.zeros(n, np.int64)
    mask[index.cpu().numpy()] = 1
    if not np.array_equal(np.flatnonzero(mask), index.cpu().numpy()):
        raise ValueError("export_coded needs increasing, distinct feature indices, as prune builds")
    periods = range(min(MAX_MASK_PERIOD, n) + 1)
    ctx = {p: np.array([mask_context(mask, i, p) for i in range(n)], np.int64) for p in periods}
    period = min(ctx, key=lambda p: adaptive_bits(mask, ctx[p], 2))
    return _varints(LAYER_TYPES.index("select"), n, index.numel(), period), enc.adaptive(mask, ctx[period], 2)


def _weighted(
    m: nn.Module, bits: Union[LayerBits, GridStep], name: str, force: Optional[WeightModel], enc: _Encoder
) -> tuple[bytes, LayerCode]:
    """Spec and code of one Linear or Conv2d layer: its weights under ``force`` or the best model, then its bias."""
    if isinstance(m, nn.Linear):
        spec = _varints(LAYER_TYPES.index("linear"), m.in_features, m.out_features)
    elif isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        spec = _varints(LAYER_TYPES.index("conv2d"), m.in_channels, m.out_channels,
                        *m.kernel_size, *m.stride, *m.padding, *m.dilation)  # fmt: skip
    else:
        raise TypeError(f"export_coded stores Linear and Conv2d (groups=1, zero padding) layers, not {m}")
    if isinstance(bits, GridStep):
        part, code = _step_weights(m.weight, bits, name, enc)
    else:
        part, code = _float_weights(m.weight, bits, name, force, enc)
    spec += _varints(int(m.bias is not None)) + part
    if m.bias is not None:
        spec += _varints(*_bias_fields(m.bias))
        code.bias_bits = _code_bias(m.bias, enc)
    return spec, code


def _float_weights(w: torch.Tensor, bits: LayerBits, name: str, force: Optional[WeightModel],
                   enc: _Encoder) -> tuple[bytes, LayerCode]:  # fmt: skip
    """Spec fields and code of weights on the bit-precision grid, under ``force`` or the best model."""
    f = WeightFields.of(w, bits)
    model, costs = _best_model(f)
    if force is not None:
        model = force if force.name != "symbol" or str(force) in costs else model
    spec = _varints(bits.exponent, bits.significand, zigzag(f.e_max), WEIGHT_MODELS.index(model.name), model.ctx,
                    model.k)  # fmt: skip
    return spec, LayerCode(name, len(f.code), bits, str(model), _code_weights(f, model, enc), 0.0, bits.total, costs)


def step_symbols(w: torch.Tensor, step: GridStep, name: str) -> tuple[np.ndarray, int, int]:
    """A grid layer's weights as symbols ``n - n_min`` (row-major), ``n_min`` and the alphabet size ``K``;
    a clear error unless every weight is ``step * n`` in float32 (as the reader computes it)."""
    w = w.detach().cpu().float().numpy().ravel()
    n = np.rint(w / np.float32(step.step)).astype(np.int64)
    if not np.array_equal(n.astype(np.float32) * np.float32(step.step), w):
        raise ValueError(f"layer {name}'s weights are not on its grid of step {step.step}: store "
                         "bclib.uniform_grid.on_steps(net, steps), not the trained net")  # fmt: skip
    n_min = int(n.min()) if n.size else 0
    K = int(n.max()) - n_min + 1 if n.size else 1
    if K > MAX_STEP_ALPHABET:
        raise ValueError(f"layer {name} spans {K} grid points, more than {MAX_STEP_ALPHABET}: its step is too fine")
    return n - n_min, n_min, K


def _step_weights(w: torch.Tensor, step: GridStep, name: str, enc: _Encoder) -> tuple[bytes, LayerCode]:
    """Spec fields and code of weights on a uniform grid (the ``step`` model), under the shorter context."""
    sym, n_min, K = step_symbols(w, step, name)
    contexts = {c: weight_contexts(len(sym), w.shape[0], c) for c in (CTX_NONE, CTX_ROW)}
    costs = {c: adaptive_bits(sym, x, K) for c, x in contexts.items()}
    ctx = min(costs, key=costs.get)
    f32_bits = int(np.float32(step.step).view(np.uint32))
    spec = _varints(0, 0, zigzag(0), WEIGHT_MODELS.index("step"), ctx, 0, f32_bits, zigzag(n_min), K)
    bits = enc.adaptive(sym, contexts[ctx], K)
    label = {CTX_NONE: "step(ctx=none)", CTX_ROW: "step(ctx=row)"}
    return spec, LayerCode(name, len(sym), step, label[ctx], bits, 0.0, (K - 1).bit_length(),
                           {label[c]: b for c, b in costs.items()})  # fmt: skip


def encode_network(net: nn.Module, bits: Sequence[Union[LayerBits, GridStep]], model: Optional[str] = None) -> Encoded:
    """The coded file of a pruned net (``prune``'s output) whose former group layers round to ``bits``.

    A :class:`bclib.uniform_grid.GridStep` in place of a layer's ``LayerBits`` codes it on its
    uniform grid (the ``step`` model; the file is then format version 3, else 2).
    ``model``: None picks each layer's shortest model; "uniform", "symbol" or "factored"
    (no context, k = 0) forces one for every layer of ``LayerBits`` ("symbol" only where the
    layer's alphabet is small enough; others keep their best). Layers left plain keep float32 precision.
    """
    if model is not None and model not in PRECISION_MODELS:
        raise ValueError(f"model must be None (the best per layer) or one of {PRECISION_MODELS}, got {model!r}")
    folded = fold_batchnorm(net.cpu())
    by_layer = _bits_by_layer(folded, bits)
    force = None if model is None else WeightModel(model)
    enc, spec, layers, mask_bits, count = _Encoder(), b"", [], 0.0, 0
    for name, m in _chain(folded):
        count += 1
        if name == "select":
            part, cost = _select(m, enc)
            spec, mask_bits = spec + part, mask_bits + cost
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            part, code = _weighted(m, by_layer.get(name, _FLOAT32_BITS), name, force, enc)
            spec += part
            layers.append(code)
        else:
            spec += _simple_spec(m)
    spec = _varint(count) + spec
    words = enc.words().astype("<u4").tobytes()
    body = _varints(len(spec), len(words) // 4) + spec + words
    version = FORMAT_VERSION if any(isinstance(b, GridStep) for b in bits) else 2
    data = MAGIC + bytes([version]) + zlib.crc32(body).to_bytes(4, "little") + body
    return Encoded(data, layers, mask_bits, len(spec), len(words))


def settle_ties(pruned: nn.Module, bits: Sequence[LayerBits], stored: nn.Module, max_ulps: float = 4.0) -> int:
    """Give ``pruned``'s weights that lie on a rounding tie the grid value that ``stored`` holds.

    A coded file written on one CPU and the same posterior pruned on another can disagree in a
    weight whose unrounded value lies halfway between two grid values: the vector code of the
    scales (e.g. ``exp``) can differ in the last bit between CPUs, which puts the weight an ulp
    to one side of the midpoint or the other. ``stored`` is the file's network
    (:func:`bclib.load_coded.load_coded`); where ``quantized(pruned, bits)`` differs from it,
    the unrounded weight must lie within ``max_ulps`` float32 ulps of the midpoint of the two
    values, and is then set (in place) to the file's side, so that ``encode_network(pruned,
    bits)`` can be compared with the file byte for byte. Any other difference raises a
    ``ValueError``. Returns the number of weights set.
    """
    ref = quantized(pruned, bits)
    mine = [(n, v) for n, v in pruned.state_dict().items() if v.is_floating_point()]
    rounded = [v for v in ref.state_dict().values() if v.is_floating_point()]
    theirs = [v for v in stored.state_dict().values() if v.is_floating_point()]
    if [v.shape for _, v in mine] != [v.shape for v in theirs]:
        raise ValueError(f"the stored network's tensors {[tuple(v.shape) for v in theirs]} are not the pruned "
                         f"net's {[tuple(v.shape) for _, v in mine]}: a file of another pruning?")  # fmt: skip
    settled = 0
    with torch.no_grad():
        for (name, w), r, f in zip(mine, rounded, theirs):
            off = r != f
            if off.any():
                midpoint = (r[off].double() + f[off].double()) / 2
                ulps = (w[off].double() - midpoint).abs() / (torch.finfo(torch.float32).eps * w[off].double().abs())
                if not (ulps <= max_ulps).all():
                    raise ValueError(f"{name}: {int(off.sum())} values differ from the stored network, "
                                     f"{int((ulps > max_ulps).sum())} of them not on a rounding tie")  # fmt: skip
                w[off] = f[off]
                settled += int(off.sum())
    return settled


def _simple_spec(m: nn.Module) -> bytes:
    if type(m) is nn.ReLU:
        return _varints(LAYER_TYPES.index("relu"))
    if isinstance(m, nn.MaxPool2d) and not m.return_indices:
        return _varints(LAYER_TYPES.index("maxpool2d"), *_pair(m.kernel_size), *_pair(m.stride), *_pair(m.padding),
                        *_pair(m.dilation), int(m.ceil_mode))  # fmt: skip
    if isinstance(m, nn.Flatten):
        return _varints(LAYER_TYPES.index("flatten"), zigzag(m.start_dim), zigzag(m.end_dim))
    raise TypeError(f"export_coded stores Linear, Conv2d, ReLU, MaxPool2d, Flatten and Dropout layers "
                    f"(and BatchNorm folded into the layer before it), not {m}")  # fmt: skip


def export_coded(bayes_model: nn.Module, thresholds: Sequence[float], path: Union[str, Path],
                 model: Optional[str] = None) -> Encoded:  # fmt: skip
    """Write ``bayes_model`` pruned at ``thresholds`` as an entropy-coded file; returns what was written.

    The file reads back with ``bclib.load_coded.load_coded(path)`` as the network of
    ``quantized(prune(bayes_model, thresholds), compression_report(...).bits)``; ``model`` as
    for :func:`encode_network`. Written atomically.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give a file path, e.g. {path / 'model.bc'}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: no directory {path.parent} (create it first)")
    net = prune(bayes_model, thresholds).cpu()
    encoded = encode_network(net, compression_report(bayes_model, thresholds).bits, model)
    atomic_write(path, lambda f: f.write(encoded.data))
    return encoded


# --- parametric models (measured, not in the format) ------------------------------------------
def value_grid(bits: LayerBits, e_max: int) -> np.ndarray:
    """Every value a layer of these bit widths can hold, ascending (zero once)."""
    codes, fr = np.arange(1, 1 << bits.exponent), np.arange(1 << bits.significand)
    mags = np.sort(((1 + fr[None, :] / 2.0**bits.significand) * np.ldexp(1.0, e_max + 1 - codes)[:, None]).ravel())
    return np.concatenate([-mags[::-1], [0.0], mags])


def parametric_bits(weight: torch.Tensor, bits: LayerBits, family: str) -> float:
    """Code length (bits) of the rounded weights under a zero-mean quantized Laplace or Gaussian.

    Each value's probability is the density's mass over the values it rounds from (halfway to
    its neighbours on :func:`value_grid`); the scale is the best of a log grid and costs 32
    bits (a float32 the file would store). Not in the file format: its probabilities need
    ``exp``/``erf``, whose last bits may differ between platforms, and a decoder must rebuild
    them exactly.
    """
    if family not in ("laplace", "gaussian"):
        raise ValueError(f"family must be 'laplace' or 'gaussian', got {family!r}")
    w = weight.detach().cpu().flatten()
    e_max = precision.max_exponent(w)
    q = precision.round_to_bits(w, bits.exponent, bits.significand).double().numpy()
    grid = value_grid(bits, e_max)
    idx = np.searchsorted(grid, q)
    edges = np.concatenate([[-np.inf], (grid[1:] + grid[:-1]) / 2, [np.inf]])
    lo, hi = torch.from_numpy(edges[idx]), torch.from_numpy(edges[idx + 1])

    def cdf(x: torch.Tensor, scale: float) -> torch.Tensor:
        if family == "gaussian":
            return torch.special.ndtr(x / scale)
        return torch.where(x < 0, 0.5 * torch.exp(x.clamp(max=0) / scale), 1 - 0.5 * torch.exp(-x.clamp(min=0) / scale))

    scales = np.ldexp(1.0, e_max + 1) * np.exp(np.linspace(-8.0, 2.0, 161))
    costs = [-torch.log2((cdf(hi, s) - cdf(lo, s)).clamp_min(1e-300)).sum().item() for s in scales]
    return min(costs) + 32.0


# --- the KL of the kept posterior -------------------------------------------------------------
@dataclass
class LayerKL:
    """KL(q || p) of one group layer's kept part, in bits: scales ``z``, weights ``w``, biases ``b``."""

    z: float
    w: float
    b: float

    @property
    def total(self) -> float:
        return self.z + self.w + self.b


def _scale_kl(scale: nn.Module, keep: torch.Tensor) -> float:
    """KL of the kept groups' scales in nats; the horseshoe's layer-wide scale ``s`` counts once."""
    if isinstance(scale, NormalJeffreysScale):
        return kl_log_uniform(scale.log_alpha[keep]).sum().item()
    if isinstance(scale, HorseshoeScale):
        s = kl_lognormal_gamma(scale.sa_mu, scale.sa_logvar, scale.tau0**2)
        s = s + kl_lognormal_invgamma(scale.sb_mu, scale.sb_logvar)
        local = kl_lognormal_gamma(scale.a_mu[keep], scale.a_logvar[keep], 1.0)
        local = local + kl_lognormal_invgamma(scale.b_mu[keep], scale.b_logvar[keep])
        return (s.sum() + local.sum()).item()
    raise TypeError(f"kept_kl knows the scales NormalJeffreysScale and HorseshoeScale, not {type(scale).__name__}")


@torch.no_grad()
def kept_kl(
    bayes_model: nn.Module, thresholds: Sequence[float], masks: Optional[Sequence[LayerMask]] = None
) -> list[LayerKL]:
    """Per group layer, the KL of the kept groups, weights and biases from the prior, in bits (KL / ln 2).

    The normal-Jeffreys prior ``p(z) ∝ 1/|z|`` is improper: its KL is defined up to a
    constant per group, here Sparse VD's (:func:`bclib.kl.kl_log_uniform`), which gives a
    group that carries nothing (``alpha -> inf``) zero bits. Its ``z`` bits are thus counted
    relative to such a group, not absolute. The horseshoe's KL and the weights'
    ``KL(N(mu, s^2) || N(0, 1))`` are proper.
    """
    layers = bayesian_layers(bayes_model)
    masks = group_masks(bayes_model, thresholds) if masks is None else masks
    out = []
    for layer, m in zip(layers, masks):
        keep = m.inputs if layer.groups_on == "inputs" else m.outputs
        kw = _kept(kl_std_normal(layer.weight_mu, layer.weight_logvar).cpu(), m).sum().item()
        kb = 0.0 if layer.bias_mu is None else kl_std_normal(layer.bias_mu, layer.bias_logvar)[m.outputs].sum().item()
        out.append(LayerKL(_scale_kl(layer.scale, keep.to(layer.weight_mu.device)) / _LN2, kw / _LN2, kb / _LN2))
    return out


def noise_bits(mean: torch.Tensor, std: torch.Tensor, bits: LayerBits) -> float:
    """Mean over the weights that do not round to zero of ``max(0, log2(std / ulp))``.

    ``ulp = 2^(e - S)`` is the spacing of a weight's rounded value (exponent ``e``, ``S``
    significand bits) and ``std`` its posterior standard deviation: the significand bits that
    resolve the weight more finely than the posterior knows it.
    """
    q = precision.round_to_bits(mean.flatten(), bits.exponent, bits.significand).double()
    nz = q != 0
    if not bool(nz.any()):
        return 0.0
    ulp = torch.pow(2.0, torch.floor(torch.log2(q[nz].abs())) - bits.significand)
    return torch.log2(std.flatten().double()[nz] / ulp).clamp(min=0).mean().item()


@torch.no_grad()
def bits_below_noise(bayes_model: nn.Module, thresholds: Sequence[float]) -> list[float]:
    """Per group layer, :func:`noise_bits` of its kept weights at the posterior, with the report's bits."""
    masks = group_masks(bayes_model, thresholds)
    bits = compression_report(bayes_model, thresholds).bits
    out = []
    for layer, m, b in zip(bayesian_layers(bayes_model), masks, bits):
        std = _kept(layer.posterior_weight_variance().cpu(), m).sqrt()
        out.append(noise_bits(_kept(layer.posterior_weight_mean().cpu(), m), std, b))
    return out
