"""A really compressed model: the pruned network written with the bits of paper sec. 4.

``export_compressed(model, thresholds, path)`` prunes the Bayesian network
(:func:`bclib.compression.prune`), takes each layer's bit widths from
:func:`bclib.compression.compression_report` (same thresholds) and stores every kept weight
``E[w]`` as 1 sign bit, an ``E``-bit exponent code relative to the layer's largest exponent
``e_max`` and an ``S``-bit significand (:func:`bclib.precision.encode`), bit-packed. Biases
are stored as float32: there are few of them, and the paper's rates count weights only.
The file reads back without bclib through :mod:`bclib.load_compressed`, which also
documents the format.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
import torch.fx
from torch import nn

from . import precision
from .atomic import atomic_write
from .compression import LayerBits, compression_report, prune
from .load_compressed import FORMAT_VERSION, HEADER, LENGTHS, MAGIC

Record = tuple[dict, bytes]  # a layer's spec entry and its payload chunk


def export_compressed(bayes_model: nn.Sequential, thresholds: Sequence[float], path: Union[str, Path]) -> int:
    """Write ``bayes_model`` pruned at ``thresholds`` (one ``log_alpha`` per group layer); returns the file's size in bytes.

    The file holds ``prune(bayes_model, thresholds)`` with every weight rounded as
    ``bclib.reproduce.quantized`` rounds it, so ``load_compressed(path)`` gives that net's outputs.
    """
    net = prune(bayes_model, thresholds).cpu()
    records = list(_records(net, iter(compression_report(bayes_model, thresholds).bits)))
    spec = json.dumps({"layers": [r[0] for r in records]}, separators=(",", ":")).encode("utf-8")
    payload = b"".join(r[1] for r in records)
    body = LENGTHS.pack(len(spec), len(payload)) + spec + payload
    data = HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(body)) + body
    atomic_write(path, lambda f: f.write(data))
    return len(data)


def _records(net: torch.fx.GraphModule, bits: Iterator[LayerBits]) -> Iterator[Record]:
    """Spec entry and payload chunk of each layer of ``prune``'s output, in forward order."""
    prev = None
    for node in net.graph.nodes:
        if node.op == "get_attr":  # the index of an index_select, read below
            continue
        if node.op != "placeholder" and node.args[0] is not prev:
            raise ValueError("export_compressed needs a chain of layers, as bclib.compression.prune builds")
        prev = node
        if node.op == "call_module":
            yield _module_record(net.get_submodule(node.target), bits)
        elif node.op == "call_method" and node.target == "index_select" and node.args[1] == -1:
            yield _select_record(net.get_buffer(node.args[2].target))
        elif node.op not in ("placeholder", "output"):
            raise TypeError(f"export_compressed cannot store the operation {node.format_node()}")


def _module_record(m: nn.Module, bits: Iterator[LayerBits]) -> Record:
    if isinstance(m, nn.Linear):
        spec = {"type": "linear", "in_features": m.in_features, "out_features": m.out_features}
        return _weights_record(spec, m, next(bits))
    if isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        spec = {"type": "conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "dilation": m.dilation}  # fmt: skip
        return _weights_record(spec, m, next(bits))
    if type(m) is nn.ReLU:
        return {"type": "relu"}, b""
    if isinstance(m, nn.MaxPool2d) and not m.return_indices:
        spec = {"type": "maxpool2d", "kernel_size": _pair(m.kernel_size), "stride": _pair(m.stride),
                "padding": _pair(m.padding), "dilation": _pair(m.dilation), "ceil_mode": m.ceil_mode}  # fmt: skip
        return spec, b""
    if isinstance(m, nn.Flatten):
        return {"type": "flatten", "start_dim": m.start_dim, "end_dim": m.end_dim}, b""
    raise TypeError(f"export_compressed stores Linear, Conv2d, ReLU, MaxPool2d and Flatten layers, not {m}")


def _pair(v: Union[int, Sequence[int]]) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


def _weights_record(spec: dict, layer: nn.Module, bits: LayerBits) -> Record:
    """Bit-packed weights (sign, exponent code, significand) and float32 bias of one layer."""
    w = layer.weight.detach().flatten()
    e_max = precision.max_exponent(w)
    chunk = b""
    if w.numel():
        sign, code, frac = precision.encode(w, bits.exponent, bits.significand, e_max)
        words = (sign << (bits.exponent + bits.significand)) | (code << bits.significand) | frac
        chunk = _pack_bits(words.numpy(), bits.total)
    if layer.bias is not None:
        chunk += layer.bias.detach().numpy().astype("<f4").tobytes()
    spec.update(exponent_bits=bits.exponent, significand_bits=bits.significand, e_max=e_max,
                count=w.numel(), bias=layer.bias is not None)  # fmt: skip
    return spec, chunk


def _select_record(index: torch.Tensor) -> Record:
    """The kept input features as a bit mask up to the last kept one (smaller than the index list)."""
    n = int(index.max()) + 1 if index.numel() else 0
    mask = np.zeros(n, np.uint8)
    mask[index.numpy()] = 1
    if not np.array_equal(np.flatnonzero(mask), index.numpy()):
        raise ValueError("export_compressed needs increasing, distinct feature indices, as prune builds")
    return {"type": "select", "mask_length": n, "kept": index.numel()}, np.packbits(mask).tobytes()


def _pack_bits(words: np.ndarray, width: int) -> bytes:
    """Concatenate the low ``width`` bits (1..32, MSB first) of each word, zero-padded to a byte."""
    bits = np.unpackbits(words.astype(">u4").view(np.uint8).reshape(-1, 4), axis=1)
    return np.packbits(bits[:, 32 - width :]).tobytes()

