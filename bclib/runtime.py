"""Run a plain network, such as a pruned one, faster at inference: in onnxruntime, or rewritten for eager PyTorch.

Eager PyTorch spends microseconds of Python and dispatch on every operator, which for a
small pruned network at small batches costs more than its arithmetic: the multiply-adds
that pruning removes are then not what the time is spent on. onnxruntime runs the whole
graph in C++ after fusing operators (e.g. a convolution with its ReLU), so the time follows
the arithmetic further down:

    fast = OnnxRuntimeNet(prune(model, thresholds), torch.randn(1, 1, 28, 28))
    logits = fast(x)  # a torch.Tensor, as net(x) in eval mode would give

The network goes through :func:`bclib.export.export_onnx` (BatchNorm folded, dynamic batch);
``OnnxRuntimeNet.load(path)`` runs an ONNX file written by it. :func:`faster_eager` rewrites a
net for eager PyTorch instead, where max pooling costs about as much as the convolutions,
:func:`tune_convolutions` gives each of its convolutions the fastest of PyTorch's CPU kernels
at a batch shape, and :class:`InChunks` runs a convolutional net on slices of a large batch.
``benchmarks/bench_inference.py`` measures all three ways.
"""
from __future__ import annotations

import collections
import copy
import functools
import importlib.util
import operator
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
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


def faster_eager(net: nn.Module, width_multiple: int = 1, transposed: bool = False) -> torch.fx.GraphModule:
    """A copy of a plain network, rewritten for inference in eager PyTorch; same outputs, bit for bit.

    Exact rewrites of its ``torch.fx`` graph (``prune``'s nets are graphs already; others are
    traced):

    - a 2x2 max pool with stride 2 (``nn.MaxPool2d(2)``, no padding, dilation 1, floor mode)
      becomes the maximum of the four strided views of its input: PyTorch's CPU pooling kernel,
      which also computes indices, takes several times as long;
    - a ReLU whose only use is such a pool moves after it: ``relu(max(a, b)) = max(relu(a),
      relu(b))``, on a quarter of the values;
    - ``nn.Linear``, ``nn.Conv{1,2,3}d`` (zero padding), ``nn.Flatten`` and ``nn.ReLU`` modules
      become calls of their functions, with their weights and biases as attributes of the
      result (``"1.weight"`` becomes ``"1_weight"``), which skips the module call's fixed price
      (a few microseconds each, more than a small pruned layer's arithmetic at batch 1);
    - a ReLU whose input is the fresh output of a layer or pool used nowhere else runs in place
      (``torch.relu_``): no new tensor to allocate.

    ``width_multiple > 1`` also pads the outputs of every fully connected layer that feeds,
    through at most a ReLU, only another fully connected layer, with zero units up to a
    multiple of ``width_multiple`` (the next layer gets zero columns for them): CPU matrix
    kernels run odd widths (e.g. a pruned layer's 107 units) slower than multiples of 8 or 16.
    The padded units are 0 and add nothing, but the kernels then sum in another order, so the
    outputs agree to float rounding (a few units in the last place), not bit for bit.

    ``transposed=True`` keeps each fully connected layer's weight in memory as its transpose
    (``in x out``, row-major), passed to ``F.linear`` as a view of the usual shape: the CPU
    matrix kernels multiply by that layout faster (``benchmarks/bench_inference.py``, 1 thread,
    batch 64, both with ``width_multiple=16``: the dense LeNet-300-100 in 0.202 against 0.247 ms,
    its pruned BC-GNJ net in 0.051 against 0.058 ms), again to float rounding.

    The result holds torch modules and functions only, so it saves and loads without bclib.
    Keep :func:`bclib.compression.prune`'s net for exporting: the file writers read its layers.
    """
    if not isinstance(width_multiple, int) or isinstance(width_multiple, bool) or width_multiple < 1:
        raise ValueError(f"width_multiple must be a whole number >= 1 (1: no padding), got {width_multiple!r}")
    if not isinstance(transposed, bool):
        raise ValueError(f"transposed must be True or False, got {transposed!r}")
    gm = copy.deepcopy(net if isinstance(net, torch.fx.GraphModule) else torch.fx.symbolic_trace(net)).eval()
    _pools_to_maxima(gm)
    if width_multiple > 1:
        _pad_widths(gm, width_multiple)
    _modules_to_functions(gm, transposed)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


# name -> (what the graph calls, its arguments from conv2d's and the kernel size, does it take a
# convolution of this stride, dilation and groups)
_KERNELS: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., tuple], Callable[..., bool]]] = {
    "onednn": (F.conv2d, lambda x, w, b, k, s, p, d, g: (x, w, b, s, p, d, g), lambda s, d, g: True),
    "im2col": (torch.ops.aten.thnn_conv2d.default, lambda x, w, b, k, s, p, d, g: (x, w, k, b, s, p),
               lambda s, d, g: d == [1, 1] and g == 1),
    "nnpack": (torch._nnpack_spatial_convolution, lambda x, w, b, k, s, p, d, g: (x, w, b, p, s),
               lambda s, d, g: s == d == [1, 1] and g == 1 and torch._nnpack_available()),
}  # fmt: skip
CONVOLUTION_KERNELS = tuple(target for target, _, _ in _KERNELS.values())  # what a tuned graph calls for a convolution


@torch.no_grad()
def tune_convolutions(net: torch.fx.GraphModule, example_input: torch.Tensor, kernels: Sequence[str] = tuple(_KERNELS),
                      repeats: int = 10, margin: float = 0.1) -> torch.fx.GraphModule:  # fmt: skip
    """A copy of ``net`` (a :func:`faster_eager` graph) whose every 2-d convolution runs the
    fastest of ``kernels`` on the shapes it sees for ``example_input``.

    PyTorch's CPU ``conv2d`` hands float32 convolutions to oneDNN, which is fastest for wide
    layers but not always for narrow ones: with im2col or NNPACK for both convolutions the
    pruned LeNet-5-Caffe nets ran 1.9-2.1x faster at batch 1, and NNPACK made the dense net's
    second convolution faster at batch 64 and 1,024 (``benchmarks/bench_inference.py``, its
    tuned runtime; `benchmarks/README.md` gives the runs). Kernels:

    - ``"onednn"``: ``F.conv2d``, PyTorch's own choice (oneDNN for float32 on x86 builds);
    - ``"im2col"``: the input unfolded and multiplied by the weights
      (``torch.ops.aten.thnn_conv2d``; dilation 1, no groups);
    - ``"nnpack"``: NNPACK (``torch._nnpack_spatial_convolution``; stride and dilation 1, no
      groups; where this build of PyTorch has it), which computes by fast transforms.

    Each kernel a convolution can take is timed on that convolution's input (the median of
    ``repeats`` calls, after two untimed ones), and the fastest wins if it takes at least
    ``margin`` less time than ``"onednn"`` (when that is among ``kernels``): timed alone, a
    layer's near-ties are noise, and taking them made chapter 7's small ResNet 2-4 % slower
    at batch 1 (three runs in fast mode, margin 0). The choice holds for ``example_input``'s
    batch size on this machine: tune at the batch size the net will run at (with
    :class:`InChunks`, at the slice size), and time the result against ``net``. Any batch
    runs afterwards. Outputs agree with ``net``'s closely, not bit for bit (im2col: to a few
    units in the last place; NNPACK: about 1e-5 relative). ``chosen_kernels(result)``
    lists the winners. The result holds torch functions only, so it saves and loads without
    bclib (it calls ``torch._nnpack_available()`` first, which starts NNPACK in a fresh
    process).
    """
    if not isinstance(net, torch.fx.GraphModule):
        raise TypeError(f"tune_convolutions takes a torch.fx.GraphModule, got {type(net).__name__}: "
                        "pass faster_eager(net)")  # fmt: skip
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor batch, got {type(example_input).__name__}")
    unknown = [k for k in kernels if k not in _KERNELS] if not isinstance(kernels, str) else [kernels]
    if unknown or not kernels:
        raise ValueError(f"kernels must be a non-empty sequence of {list(_KERNELS)}, got {kernels!r}")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats must be a whole number >= 1, got {repeats!r}")
    if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        raise ValueError(f"margin must be a share of time in [0, 1), e.g. 0.1, got {margin!r}")
    gm = copy.deepcopy(net).eval()
    if any(n.target in (_KERNELS["im2col"][0], _KERNELS["nnpack"][0]) for n in gm.graph.nodes):
        raise ValueError("this net is tuned already: tune faster_eager(net) itself")
    if any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d) for n in gm.graph.nodes):
        raise ValueError("this graph calls nn.Conv2d modules, which tune_convolutions leaves as they are: "
                         "tune faster_eager(net), which calls them as functions")  # fmt: skip
    seen: dict[torch.fx.Node, tuple] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            if n.op == "call_function" and n.target is F.conv2d:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                seen[n] = _conv2d_args(*args, **kwargs)
            return super().run_node(n)

    Recorder(gm).run(example_input)
    pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
    for node, (x, w, b, stride, padding, dilation, groups) in seen.items():
        if isinstance(padding, str) or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4:
            continue  # padding="same", other dtypes and devices: F.conv2d
        stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
        conv = (list(w.shape[2:]), stride, padding, dilation, groups)  # the kernel size, then conv2d's own
        times = {name: _median_ms(lambda: _KERNELS[name][0](*_KERNELS[name][1](x, w, b, *conv)), repeats)
                 for name in kernels if _KERNELS[name][2](stride, dilation, groups)}  # fmt: skip
        if not times:
            continue  # none of ``kernels`` takes this convolution: F.conv2d
        best = min(times, key=times.__getitem__)
        if "onednn" in times and times[best] > (1 - margin) * times["onednn"]:
            best = "onednn"
        if best != "onednn":
            target, args, _ = _KERNELS[best]
            x_w_b = _conv2d_args(*node.args, **node.kwargs)[:3]  # the graph's nodes for them
            node.target, node.args, node.kwargs = target, args(*x_w_b, *conv), {}
    if any(n.target is torch._nnpack_spatial_convolution for n in gm.graph.nodes):
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        with gm.graph.inserting_before(first):
            gm.graph.call_function(torch._nnpack_available)  # starts NNPACK in a fresh process; result unused
    gm.graph.lint()
    gm.recompile()
    return gm


def _conv2d_args(x: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                 groups: Any = 1) -> tuple:  # fmt: skip
    """``F.conv2d``'s arguments in order, defaults filled in."""
    return x, weight, bias, stride, padding, dilation, groups


def chosen_kernels(net: torch.fx.GraphModule) -> list[str]:
    """The kernel :func:`tune_convolutions` chose for each 2-d convolution of ``net``, in graph order."""
    names = {target: name for name, (target, _, _) in _KERNELS.items()}
    return [names[n.target] for n in net.graph.nodes if n.op == "call_function" and n.target in names]


def _median_ms(f: Callable[[], Any], repeats: int) -> float:
    f(), f()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        samples.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(samples)


class InChunks(nn.Module):
    """``net`` run on slices of at most ``size`` examples of each batch, the outputs concatenated.

    A convolutional net's activations at a large batch are large tensors: LeNet-5-Caffe's first
    convolution writes 16 MB at batch 1,024. glibc's allocator gives a block that large straight
    from the kernel (``mmap``) and returns it at once when freed, so every pass pays the page
    faults of zeroing fresh memory for every such tensor. Slices keep each tensor small enough
    to be reused from the heap (and in cache), which made the ``faster_eager`` pruned
    LeNet-5-Caffe 2.8-3.0x faster at batch 1,024 (``bench_inference.py``). Raising glibc's
    thresholds instead (``MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=4000000000``
    in the environment, set before Python starts) gave whole batches most of that gain: 26.7 ->
    11.5 ms, against 10.0 ms in slices. Examples are independent in eval mode, so the outputs are those of
    ``net`` on the whole batch, to float rounding: a slice of another size can take another
    matrix kernel (bit for bit for the shipped LeNet-5-Caffe nets at batch 1,024 in slices of
    128; a ragged last slice of 2 examples differed by a unit in the last place). A fully
    connected net gains nothing: its activations are small and its matrix products run best
    on the whole batch.

    ``torch.load`` of this module needs bclib (its class lives here); save ``net`` itself to
    load it without.
    """

    def __init__(self, net: nn.Module, size: int = 128) -> None:
        super().__init__()
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a whole number >= 1 (examples per slice), got {size!r}")
        self.net, self.size = net, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) <= self.size:
            return self.net(x)
        outs = [self.net(part) for part in x.split(self.size)]
        if not all(isinstance(o, torch.Tensor) for o in outs):
            raise TypeError(f"InChunks needs a net that returns one tensor, this one returns {type(outs[0]).__name__}")
        return torch.cat(outs)


def _pools_to_maxima(gm: torch.fx.GraphModule) -> None:
    g = gm.graph
    for node in list(g.nodes):
        if not (node.op == "call_module" and _is_2x2_pool(gm.get_submodule(node.target))):
            continue
        x, relu = node.args[0], None
        if isinstance(x, torch.fx.Node) and _is_relu(gm, x) and len(x.users) == 1:
            relu, x = x, x.args[0]
        with g.inserting_before(node):
            even = [g.call_function(operator.mul, (g.call_function(operator.floordiv, (g.call_method("size", (x, d)), 2)), 2))
                    for d in (-2, -1)]  # fmt: skip
            cropped = g.call_function(operator.getitem, (x, (Ellipsis, slice(None, even[0]), slice(None, even[1]))))
            views = [g.call_function(operator.getitem, (cropped, (Ellipsis, slice(i, None, 2), slice(j, None, 2))))
                     for i in (0, 1) for j in (0, 1)]  # fmt: skip
            top, bottom = (g.call_function(torch.maximum, (views[k], views[k + 1])) for k in (0, 2))
            out = g.call_function(torch.maximum, (top, bottom))
            if relu is not None:
                out = g.call_function(torch.relu, (out,))
        node.replace_all_uses_with(out)
        g.erase_node(node)
        if relu is not None:
            g.erase_node(relu)


@torch.no_grad()
def _pad_widths(gm: torch.fx.GraphModule, multiple: int) -> None:
    """Zero units up to ``multiple`` for each ``nn.Linear`` that feeds (through a ReLU) only an ``nn.Linear``."""
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    # Only a Linear called once: padding one used twice would change its other use.
    linear = lambda n: n.op == "call_module" and calls[n.target] == 1 and type(gm.get_submodule(n.target)) is nn.Linear  # noqa: E731
    for node in list(gm.graph.nodes):
        if not linear(node) or len(node.users) != 1:
            continue
        (nxt,) = node.users
        if _is_relu(gm, nxt) and len(nxt.users) == 1:
            (nxt,) = nxt.users
        if not linear(nxt):
            continue
        a, b = gm.get_submodule(node.target), gm.get_submodule(nxt.target)
        extra = -a.out_features % multiple
        if extra == 0:
            continue
        a.weight = nn.Parameter(F.pad(a.weight, (0, 0, 0, extra)))
        if a.bias is not None:
            a.bias = nn.Parameter(F.pad(a.bias, (0, extra)))
        b.weight = nn.Parameter(F.pad(b.weight, (0, extra)))
        a.out_features = b.in_features = a.out_features + extra


_FUNCTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
# Functions whose output is a new tensor, so a ReLU that is its only use may overwrite it.
_FRESH = (F.linear, F.conv1d, F.conv2d, F.conv3d, torch.maximum)


def _modules_to_functions(gm: torch.fx.GraphModule, transposed: bool) -> None:
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        attr = functools.partial(_hoisted, gm, m, node.target)
        with g.inserting_before(node):
            if type(m) is nn.Linear:
                weight = attr("weight", _transposed_layout(m.weight) if transposed else None)
                new = g.call_function(F.linear, (node.args[0], weight, attr("bias")))
            elif type(m) in _FUNCTIONS and m.padding_mode == "zeros":
                new = g.call_function(_FUNCTIONS[type(m)], (node.args[0], attr("weight"), attr("bias"), m.stride,
                                                            m.padding, m.dilation, m.groups))  # fmt: skip
            elif type(m) is nn.Flatten:
                new = g.call_function(torch.flatten, (node.args[0], m.start_dim, m.end_dim))
            elif type(m) is nn.ReLU and not m.inplace:
                new = g.call_function(torch.relu, (node.args[0],))
            else:
                continue
        node.replace_all_uses_with(new)
        g.erase_node(node)
    for node in g.nodes:
        x = node.args[0] if node.args else None
        if (node.op == "call_function" and node.target is torch.relu and isinstance(x, torch.fx.Node)
                and x.op == "call_function" and x.target in _FRESH and len(x.users) == 1):  # fmt: skip
            node.target = torch.relu_


def _transposed_layout(w: torch.Tensor) -> nn.Parameter:
    """``w`` with the same shape and values, stored as its transpose (``w.t()`` contiguous)."""
    return nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)


def _hoisted(gm: torch.fx.GraphModule, m: nn.Module, target: str, name: str,
             value: Optional[torch.Tensor] = None) -> Optional[torch.fx.Node]:  # fmt: skip
    """``m.name`` (or ``value`` in its place) as an attribute of ``gm`` itself: one attribute lookup per call instead of two."""
    value = getattr(m, name) if value is None else value
    if value is None:
        return None
    alias = f"{target}_{name}".replace(".", "_")
    while hasattr(gm, alias) and getattr(gm, alias) is not value:
        alias += "_"
    if isinstance(value, nn.Parameter):
        gm.register_parameter(alias, value)
    else:
        gm.register_buffer(alias, value)
    return gm.graph.get_attr(alias)


def _is_2x2_pool(m: nn.Module) -> bool:
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    return (type(m) is nn.MaxPool2d and pair(m.kernel_size) == (2, 2) and pair(m.stride or m.kernel_size) == (2, 2)
            and pair(m.padding) == (0, 0) and pair(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices)  # fmt: skip


def _is_relu(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    return node.op == "call_function" and node.target in (torch.relu, F.relu) and not node.kwargs.get("inplace")
