"""A really compressed model: the pruned network written with the bits of paper sec. 4, or as ONNX.

``export_compressed(model, thresholds, path)`` prunes the Bayesian network
(:func:`bclib.compression.prune`), takes each layer's bit widths from
:func:`bclib.compression.compression_report` (same thresholds) and stores every kept weight
``E[w]`` as 1 sign bit, an ``E``-bit exponent code relative to the layer's largest exponent
``e_max`` and an ``S``-bit significand (:func:`bclib.precision.encode`), bit-packed. Biases
are stored as float32: there are few of them, and the paper's rates count weights only.
BatchNorm layers are first folded into the layer before them (:func:`fold_batchnorm`), which
keeps that layer's bit widths, and dropout (an identity at inference) is left out.
The file reads back without bclib through :mod:`bclib.load_compressed`, which also
documents the format.

``export_onnx(net, path, example_input)`` writes any plain network, such as ``prune``'s
output, as an ONNX file with BatchNorm folded the same way and a dynamic batch dimension.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from . import precision
from .atomic import atomic_write
from .compression import LayerBits, compression_report, former_group_layer_names, prune
from .convert import bayesian_layers
from .load_compressed import FORMAT_VERSION, HEADER, LENGTHS, MAGIC

Record = tuple[dict, bytes]  # a layer's spec entry and its payload chunk

# The BatchNorm that folds into each kind of layer (it normalizes that layer's outputs, dim 1).
_FOLDS: dict[type, type] = {
    nn.Linear: nn.BatchNorm1d, nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d,
}  # fmt: skip
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FLOAT32_BITS = LayerBits(precision.MAX_EXPONENT_BITS, precision.MAX_SIGNIFICAND_BITS)  # float32's precision
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


# --- BatchNorm folding -------------------------------------------------------------------
def fold_batchnorm(net: nn.Module, example_input: Optional[torch.Tensor] = None) -> torch.fx.GraphModule:
    """A copy of ``net`` (eval mode, traced by torch.fx) with BatchNorm folded into the layer before it where exact.

    A BatchNorm folds when it reads the output of a Linear or ConvNd layer (Conv2d before
    BatchNorm2d, ...) that is called once and whose output nothing else reads, and when it
    normalizes with running statistics. The layer's weight rows are scaled by
    ``gamma / sqrt(running_var + eps)`` and its bias becomes ``(b - running_mean) * scale + beta``
    (computed in float64). BatchNorm1d acts on a Linear's features only for a (batch, features)
    output: checked on ``example_input`` when given, assumed otherwise. ``net`` is not changed.
    """
    gm = copy.deepcopy(net) if isinstance(net, torch.fx.GraphModule) else torch.fx.symbolic_trace(copy.deepcopy(net))
    if hasattr(net, "bayesian_layer_names"):  # prune's record of the former group layers; deepcopy drops it
        gm.bayesian_layer_names = list(net.bayesian_layer_names)
    _fold_in_place(gm.eval(), example_input)
    return gm


def _fold_in_place(gm: torch.fx.GraphModule, example_input: Optional[torch.Tensor]) -> None:
    """:func:`fold_batchnorm` on ``gm`` itself (in eval mode)."""
    if example_input is not None:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)  # records each node's output shape
    # Uses of each module: calls, and reads of its parameters (a layer folds only if called once).
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    calls.update(n.target.rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr")
    for node in list(gm.graph.nodes):
        layer = _fold_target(gm, node, calls)
        if layer is not None:
            _fold_into(layer, gm.get_submodule(node.target))
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()


def _fold_target(gm: torch.fx.GraphModule, node: torch.fx.Node, calls: Counter) -> Optional[nn.Module]:
    """The layer that the BatchNorm called at ``node`` folds into exactly, or None."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    prev = node.args[0]
    if not isinstance(prev, torch.fx.Node) or prev.op != "call_module" or len(prev.users) != 1 or calls[prev.target] != 1:
        return None
    bn, layer = gm.get_submodule(node.target), gm.get_submodule(prev.target)
    if type(bn) is not _FOLDS.get(type(layer)) or not bn.track_running_stats or bn.running_mean is None:
        return None
    if bn.num_features != layer.weight.shape[0]:
        return None
    shape = getattr(prev.meta.get("tensor_meta"), "shape", None)
    if isinstance(layer, nn.Linear) and shape is not None and len(shape) != 2:
        return None  # BatchNorm1d would normalize dim 1, not the features
    return layer


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Give ``layer`` the outputs of ``bn(layer(x))`` in eval mode."""
    w = layer.weight
    gamma = bn.weight.double() if bn.weight is not None else 1.0
    beta = bn.bias.double() if bn.bias is not None else 0.0
    scale = gamma * torch.rsqrt(bn.running_var.double() + bn.eps)
    bias = layer.bias.double() if layer.bias is not None else 0.0
    layer.weight = nn.Parameter((w.double() * scale.view(-1, *[1] * (w.dim() - 1))).to(w.dtype))
    layer.bias = nn.Parameter(((bias - bn.running_mean.double()) * scale + beta).to(w.dtype))


# --- ONNX ----------------------------------------------------------------------------------
def export_onnx(net: nn.Module, path: Union[str, Path], example_input: torch.Tensor) -> int:
    """Write ``net`` as an ONNX file at ``path``; returns the file's size in bytes.

    ``net`` is any plain network, e.g. ``bclib.compression.prune``'s output, and
    ``example_input`` a batch it accepts, e.g. ``torch.randn(1, 1, 28, 28)``. The file holds
    the net in eval mode on the CPU with BatchNorm folded (:func:`fold_batchnorm`; a net that
    torch.fx cannot trace is written unfolded) and each selection of kept features written
    as whole rows gathered (:func:`_select_rows`); its input "input" and its outputs have a
    dynamic batch dimension (the first). torch.onnx's exporter (the torch.export-based one,
    torch's default) needs the onnx and onnxscript packages. ``net`` is not changed.
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"export_onnx needs an nn.Module, got {type(net).__name__}: pass the network "
                        "(e.g. bclib.compression.prune's output)")  # fmt: skip
    if bayesian_layers(net):
        raise TypeError(f"export_onnx writes plain networks, and this {type(net).__name__} has Bayesian group layers: "
                        "export the pruned net compression.prune(net, thresholds, x), or the unpruned posterior "
                        "means compression.dense(net, x)")  # fmt: skip
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(
            f"example_input must be a torch.Tensor batch the net accepts, e.g. torch.randn(1, 1, 28, 28), "
            f"not {type(example_input).__name__}"
        )
    if example_input.dim() == 0:
        raise ValueError("example_input needs a batch dimension first, e.g. torch.randn(1, 784), not a scalar")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: no directory {path.parent} (create it first)")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give a file path, e.g. {path / 'model.onnx'}")
    net = copy.deepcopy(net).cpu().eval()
    x = example_input.detach().cpu()
    traced = _traced(net)
    names = _output_names(_run(traced or net, x))
    if traced is not None:
        _fold_in_place(traced, x)
        _select_rows(traced)
    if importlib.util.find_spec("onnxscript") is None:
        raise ImportError("export_onnx needs onnxscript, which torch.onnx's exporter uses: pip install onnx onnxscript")
    program = torch.onnx.export(
        traced or net, (x,), dynamo=True, verbose=False, input_names=["input"], output_names=names,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )  # fmt: skip
    data = program.model_proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
    return len(data)


def _select_rows(gm: torch.fx.GraphModule) -> None:
    """Rewrite each selection of features ``x.index_select(-1, idx)`` (as ``prune`` writes them) as
    ``x.movedim(-1, 0).index_select(0, idx).movedim(0, -1)``: the same values, exported as
    Transpose, Gather of whole rows and Transpose. onnxruntime gathers along the last axis one
    value at a time, rows as blocks, and folds the second Transpose into the Gemm after it
    (its ``transA``): the pruned LeNet-300-100 at batch 64 ran 1.6-1.9x faster so (``bench_inference.py``)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target == "index_select" and node.args[1:2] == (-1,):
            x, _, idx = node.args
            with gm.graph.inserting_before(node):
                rows = gm.graph.call_method("movedim", (x, -1, 0))
                kept = gm.graph.call_method("index_select", (rows, 0, idx))
                out = gm.graph.call_method("movedim", (kept, 0, -1))
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
    gm.recompile()


def _traced(net: nn.Module) -> Optional[torch.fx.GraphModule]:
    """``net`` as a GraphModule (sharing its layers), or None where torch.fx cannot trace it."""
    if isinstance(net, torch.fx.GraphModule):
        return net
    try:
        return torch.fx.symbolic_trace(net)
    except Exception:  # control flow on tensor values, unsupported Python, ...: torch.fx raises many kinds
        return None


def _run(net: nn.Module, x: torch.Tensor) -> Any:
    """``net(x)``; a ValueError naming the expected input where the net rejects ``x``."""
    try:
        with torch.no_grad():
            return net(x)
    except (RuntimeError, ValueError, IndexError) as err:
        hint = _expected_input(net) if isinstance(net, torch.fx.GraphModule) else None
        wanted = f"; its first layer {hint}" if hint else ""
        raise ValueError(f"the net cannot run on example_input of shape {tuple(x.shape)}{wanted}: {err}") from err


def _expected_input(gm: torch.fx.GraphModule) -> Optional[str]:
    """What the Linear or ConvNd layer that reads the net's input expects, e.g. "Conv2d(...) takes (N, 1, H, W)"."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.args and node.args[0] is inputs[0]:
            m = gm.get_submodule(node.target)
            if isinstance(m, nn.Linear):
                return f"{m} takes input of shape (..., {m.in_features})"
            conv = {nn.Conv1d: "L", nn.Conv2d: "H, W", nn.Conv3d: "D, H, W"}.get(type(m))
            if conv:
                return f"{m} takes input of shape (N, {m.in_channels}, {conv})"
    return None


def _output_names(out: Any) -> list[str]:
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return [f"output{i}" for i in range(len(out))]
    raise TypeError(f"export_onnx exports nets that return a tensor or a tuple of tensors, not {type(out).__name__}")


# --- the bit-packed format -----------------------------------------------------------------
def export_compressed(bayes_model: nn.Module, thresholds: Sequence[float], path: Union[str, Path]) -> int:
    """Write ``bayes_model`` pruned at ``thresholds`` (one ``log_alpha`` per group layer); returns the file's size in bytes.

    The file holds ``prune(bayes_model, thresholds)`` with BatchNorm folded
    (:func:`fold_batchnorm`) and then every former group layer's weights rounded as
    ``bclib.compression.quantized`` rounds them, so ``load_compressed(path)`` gives that net's
    outputs. Layers that ``to_bayesian`` left plain are stored at float32 precision.
    """
    _check_file_path(path)
    net = prune(bayes_model, thresholds).cpu()
    return write_quantized(net, compression_report(bayes_model, thresholds).bits, path)


def _check_file_path(path: Union[str, Path]) -> None:
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path} is a directory: give a file path, e.g. {Path(path) / 'model.bclb'}")


def write_quantized(net: nn.Module, bits: Sequence[LayerBits], path: Union[str, Path]) -> int:
    """Write a pruned net (a chain of plain layers) with the bit widths ``bits`` (one per former
    group layer, see :func:`_bits_by_layer`), e.g. bits fitted by :mod:`bclib.quantize`; returns its size."""
    folded = fold_batchnorm(net)
    records = list(_records(folded, _bits_by_layer(folded, bits)))
    spec = json.dumps({"layers": [r[0] for r in records]}, separators=(",", ":")).encode("utf-8")
    payload = b"".join(r[1] for r in records)
    body = LENGTHS.pack(len(spec), len(payload)) + spec + payload
    data = HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(body)) + body
    atomic_write(path, lambda f: f.write(data))
    return len(data)


def _bits_by_layer(net: nn.Module, bits: Sequence[LayerBits]) -> dict[str, LayerBits]:
    """``bits`` by layer name: ``net.bayesian_layer_names`` where ``prune`` set it, else its Linear/ConvNd layers.

    These, in this order, are the layers of ``compression_report(...).bits`` and those that
    ``bclib.compression.quantized`` rounds; any other layer keeps float32 precision.
    """
    names = former_group_layer_names(net)
    if len(bits) != len(names):
        raise ValueError(
            f"got {len(bits)} bit widths for {len(names)} layers ({', '.join(names)}): give one LayerBits per layer"
        )
    return dict(zip(names, bits))


def _records(net: torch.fx.GraphModule, bits: dict[str, LayerBits]) -> Iterator[Record]:
    """Spec entry and payload chunk of each layer of ``prune``'s output (BatchNorm folded), in forward order."""
    prev = None
    for node in net.graph.nodes:
        if node.op == "get_attr":  # the index of an index_select, read below
            continue
        if node.op != "placeholder" and node.args[0] is not prev:
            raise ValueError(f"export_compressed needs a chain of layers (each reading the one before), but "
                             f"{node.format_node()} reads another: write networks with branches or residual adds "
                             "as ONNX, export_onnx(prune(net, thresholds, x), path, x)")  # fmt: skip
        prev = node
        if node.op == "call_module":
            m = net.get_submodule(node.target)
            if not isinstance(m, _DROPOUTS):  # an identity at inference: nothing to store
                yield _module_record(m, bits.get(node.target, _FLOAT32_BITS))
        elif node.op == "call_method" and node.target == "index_select" and node.args[1] == -1:
            yield _select_record(net.get_buffer(node.args[2].target))
        elif node.op not in ("placeholder", "output"):
            raise TypeError(f"export_compressed cannot store the operation {node.format_node()}")


def _module_record(m: nn.Module, bits: LayerBits) -> Record:
    if isinstance(m, nn.Linear):
        spec = {"type": "linear", "in_features": m.in_features, "out_features": m.out_features}
        return _weights_record(spec, m, bits)
    if isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        spec = {"type": "conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "dilation": m.dilation}  # fmt: skip
        return _weights_record(spec, m, bits)
    if type(m) is nn.ReLU:
        return {"type": "relu"}, b""
    if isinstance(m, nn.MaxPool2d) and not m.return_indices:
        spec = {"type": "maxpool2d", "kernel_size": _pair(m.kernel_size), "stride": _pair(m.stride),
                "padding": _pair(m.padding), "dilation": _pair(m.dilation), "ceil_mode": m.ceil_mode}  # fmt: skip
        return spec, b""
    if isinstance(m, nn.Flatten):
        return {"type": "flatten", "start_dim": m.start_dim, "end_dim": m.end_dim}, b""
    if isinstance(m, _BATCHNORMS):
        raise TypeError(
            f"export_compressed cannot fold {m} into the layer before it: BatchNorm must directly follow "
            "a Linear or Conv2d layer whose output nothing else reads, and use running statistics"
        )
    raise TypeError(f"export_compressed stores Linear, Conv2d, ReLU, MaxPool2d, Flatten and Dropout layers "
                    f"(and BatchNorm folded into the layer before it), not {m}")  # fmt: skip


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

