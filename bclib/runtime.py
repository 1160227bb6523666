"""Run a plain network, such as a pruned one, in onnxruntime: less overhead per operator than eager PyTorch.

Eager PyTorch spends microseconds of Python and dispatch on every operator, which for a
small pruned network at small batches costs more than its arithmetic: the multiply-adds
that pruning removes are then not what the time is spent on. onnxruntime runs the whole
graph in C++ after fusing operators (e.g. a convolution with its ReLU), so the time follows
the arithmetic further down. ``benchmarks/bench_inference.py`` measures both runtimes.

    fast = OnnxRuntimeNet(prune(model, thresholds), torch.randn(1, 1, 28, 28))
    logits = fast(x)  # a torch.Tensor, as net(x) in eval mode would give

The network goes through :func:`bclib.export.export_onnx` (BatchNorm folded, dynamic batch);
``OnnxRuntimeNet.load(path)`` runs an ONNX file written by it.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn


def _onnxruntime() -> Any:
    if importlib.util.find_spec("onnxruntime") is None:
        raise ImportError("OnnxRuntimeNet needs onnxruntime: pip install onnxruntime")
    import onnxruntime

    return onnxruntime


class OnnxRuntimeNet:
    """A plain network as an onnxruntime session on the CPU, called like the network.

    Args:
        net: a plain network (no Bayesian group layers), e.g. ``bclib.compression.prune``'s output.
        example_input: a batch ``net`` accepts, e.g. ``torch.randn(1, 1, 28, 28)``; any
            batch size runs afterwards.
        threads: onnxruntime's intra-op threads (None: onnxruntime's default, all cores).
    """

    def __init__(self, net: nn.Module, example_input: torch.Tensor, threads: Optional[int] = None) -> None:
        from .export import export_onnx

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "net.onnx"
            export_onnx(net, path, example_input)
            self._open(path.read_bytes(), threads)

    @classmethod
    def load(cls, path: Union[str, Path], threads: Optional[int] = None) -> "OnnxRuntimeNet":
        """Run the ONNX file at ``path`` (one input, e.g. written by :func:`bclib.export.export_onnx`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {path}: write one with bclib.export.export_onnx(net, path, x)")
        self = cls.__new__(cls)
        self._open(path.read_bytes(), threads)
        return self

    def _open(self, model: bytes, threads: Optional[int]) -> None:
        ort = _onnxruntime()
        options = ort.SessionOptions()
        if threads is not None:
            if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
                raise ValueError(f"threads must be a whole number >= 1 or None (onnxruntime's default), got {threads!r}")
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        try:
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for a bad graph
            raise ValueError(f"onnxruntime cannot load this ONNX model: {err}") from err
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"OnnxRuntimeNet runs models with one input, this one has {len(inputs)}: "
                             f"{[i.name for i in inputs]}")  # fmt: skip
        self.input_name = inputs[0].name
        self.input_shape = inputs[0].shape  # the first (batch) dimension is symbolic

    def __call__(self, x: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The network's output for the batch ``x`` (float32, on the CPU): a tensor, or a tuple of them."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"OnnxRuntimeNet takes a torch.Tensor batch, got {type(x).__name__}")
        if len(x.shape) != len(self.input_shape) or any(
            isinstance(want, int) and want != got for want, got in zip(self.input_shape[1:], x.shape[1:])
        ):
            raise ValueError(f"the network takes input of shape {tuple(self.input_shape)} (first: batch), "
                             f"got {tuple(x.shape)}")  # fmt: skip
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        outs = [torch.from_numpy(o) for o in self.session.run(None, {self.input_name: array})]
        return outs[0] if len(outs) == 1 else tuple(outs)
