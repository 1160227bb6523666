"""Which channels a pruned group takes with it, read from the network's ``torch.fx`` graph.

A group layer prunes its own groups: a convolution its output filters, a fully connected
layer its input features (paper sec. 4). What that removes elsewhere depends on the graph:

- BatchNorm, activations that keep zero at zero (ReLU, GELU, tanh, ...), dropout, pooling
  and adaptive pooling pass channels through: a channel's BatchNorm entries go with its filter;
- ``flatten`` hands each channel over to its block of features of a fully connected layer;
- a residual ``add`` (or a product) couples the channels of its operands: they are one set,
  and a channel of the set is removed only when **every** producer drops it;
- ``torch.cat`` along the channels places its operands' channel sets side by side;
- a sigmoid gate (squeeze-excitation: ``x * sigmoid(fc(pool(x)))``) turns a zero channel
  into 0.5, so it may only be a factor of a product: there the product is zero wherever
  the other factor is, and the gate's channels are coupled to that factor's;
- a channel (or neuron) no consumer uses is removed from its producer too.

Every other operation (softmax, slicing, a sigmoid not used as a gate, an unknown function,
the network's output, ...) needs all of its input channels: they are kept. So are the channels of
anything that is not a group layer's output (the network's input, a plain layer's output),
for they exist whatever the thresholds; a group layer that uses only some of them selects
them (``index_select``).

**What a pruned channel means.** A pruned channel is zero: in :func:`bclib.compression.apply_masks`
its filter's weights and bias are masked, and the layers that would make it non-zero again
on their own (BatchNorm's shift, a depthwise convolution's bias) are masked on that channel
too. So removing the channel from every layer that holds it (``prune``) gives the same outputs.
"""
from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .layers import BayesianGroupLayer, ConvGroup, LinearGroup


@dataclass(frozen=True)
class Seg:
    """A channel set (``atom``) laid along a tensor's channel dimension, each channel
    repeated ``block`` times (1 for an ``(N, C, ...)`` tensor, ``H*W`` after flatten; None: not known yet)."""

    atom: int
    block: Optional[int]


class Atoms:
    """Channel sets with a union-find: coupled sets become one."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[Optional[int]] = []
        self.plain: list[bool] = []  # some producer is not a group layer: all channels exist
        self.forced: list[bool] = []  # some consumer needs every channel
        self.used_all: list[bool] = []  # some consumer uses every channel that exists

    def new(self, size: Optional[int], plain: bool) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.plain.append(plain)
        self.forced.append(False)
        self.used_all.append(False)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        self.parent[b] = a
        if self.size[a] is None:
            self.size[a] = self.size[b]
        self.plain[a] |= self.plain[b]
        self.forced[a] |= self.forced[b]
        self.used_all[a] |= self.used_all[b]

    def force(self, a: int) -> None:
        self.forced[self.find(a)] = True

    def use_all(self, a: int) -> None:
        self.used_all[self.find(a)] = True

    def get_size(self, a: int) -> Optional[int]:
        return self.size[self.find(a)]

    def set_size(self, a: int, n: int) -> None:
        self.size[self.find(a)] = n


@dataclass
class LayerUse:
    """Where a group layer sits: its inputs' channel sets and its output's."""

    in_segs: list[Seg]
    out_atom: int


@dataclass
class Structure:
    """The channel dependencies of a model (independent of the thresholds)."""

    gm: torch.fx.GraphModule  # traced: group layers and torch.nn modules are leaves
    atoms: Atoms
    layers: dict[str, LayerUse]  # qualified name of each group layer
    channelwise: dict[str, list[Seg]] = field(default_factory=dict)  # BatchNorm, depthwise conv
    plain_consumers: dict[str, list[Seg]] = field(default_factory=dict)  # plain Linear/Conv: inputs sliced

    def features(self, segs: list[Seg], per_atom: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """A boolean over the features of ``segs``: ``per_atom(root, size)`` repeated by block."""
        parts = []
        for s in segs:
            size = self.atoms.get_size(s.atom)
            parts.append(per_atom(self.atoms.find(s.atom), size).repeat_interleave(s.block))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


class _Tracer(torch.fx.Tracer):
    """Keeps group layers whole (they hold sampling code that tracing need not see)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, BayesianGroupLayer) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """``model`` as a ``torch.fx.GraphModule`` whose leaves are group layers and torch.nn modules."""
    if isinstance(model, BayesianGroupLayer):
        raise TypeError(f"compression needs a network holding group layers, not a single {type(model).__name__}: "
                        "wrap it, e.g. nn.Sequential(layer)")  # fmt: skip
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises many kinds: report them all the same way
        raise TypeError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(err).__name__}: {err}). "
            "Compression reads the network's graph: a forward pass with Python control flow that depends "
            "on tensor values (if/while on a tensor, loops over its size) cannot be traced. Move that logic "
            "out of forward, give it fixed sizes, or compress a traceable submodule instead."
        ) from err
    return torch.fx.GraphModule(model, graph)


_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Softsign, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip  (each maps a zero channel to a zero channel, channel by channel)
_PASS_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, torch.tanh,
    F.hardtanh, F.hardswish, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.max_pool1d, F.max_pool2d,
    F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}  # fmt: skip
_PASS_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone"}
_ADD = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub, "add", "add_", "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, torch.div, "div", "div_"}
_REDUCE = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}
_NON_TENSOR = {"size", "dim", "numel"}
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, "sigmoid"}


def _is_stochastic_depth(target: Any) -> bool:
    """torchvision's stochastic depth (wrapped for fx): drops whole examples, so zero stays zero."""
    return getattr(target, "__name__", "") == "stochastic_depth" and "torchvision" in getattr(target, "__module__", "")
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Analysis:
    """One pass over the graph in execution order, giving each value its channel sets."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.atoms = Atoms()
        self.s = Structure(gm, self.atoms, {})
        self.env: dict[torch.fx.Node, Optional[list[Seg]]] = {}
        # Outputs of sigmoid-like ops: channel by channel, but a pruned (zero) channel becomes
        # non-zero. Fine as one factor of a product whose other factor is zero there.
        self.gates: set[torch.fx.Node] = set()

    # --- helpers ---------------------------------------------------------------------
    def shape(self, n: Any) -> Optional[torch.Size]:
        meta = n.meta.get("tensor_meta") if isinstance(n, torch.fx.Node) else None
        return getattr(meta, "shape", None)

    def segs(self, n: Any) -> Optional[list[Seg]]:
        return self.env.get(n) if isinstance(n, torch.fx.Node) else None

    def fresh(self, n: torch.fx.Node) -> list[Seg]:
        shape = self.shape(n)
        return [Seg(self.atoms.new(shape[1] if shape is not None and len(shape) > 1 else None, plain=True), 1)]

    def need_all(self, *args: Any) -> None:
        """A consumer that needs every channel of these values."""
        flat: list[Any] = []
        torch.fx.node.map_arg(args, flat.append)
        for n in flat:
            for s in self.segs(n) or []:
                self.atoms.force(s.atom)
                self.atoms.use_all(s.atom)

    def barrier(self, node: torch.fx.Node) -> list[Seg]:
        self.need_all(node.args, node.kwargs)
        return self.fresh(node)

    def resolve(self, segs: list[Seg], total: int, what: str) -> list[Seg]:
        """Fill in unknown sizes and blocks so the segments span ``total`` features."""
        known, unknown = 0, []
        for i, s in enumerate(segs):
            size = self.atoms.get_size(s.atom)
            if size is not None and s.block is not None:
                known += size * s.block
            else:
                unknown.append(i)
        if len(unknown) > 1:
            raise ValueError(f"cannot tell how the inputs of {what} split into channels: pass example_input=")
        out = list(segs)
        if unknown:
            i, rest = unknown[0], total - known
            s, size = segs[i], self.atoms.get_size(segs[i].atom)
            if size is None:
                self.atoms.set_size(s.atom, rest if s.block is None else rest // s.block)
                size = self.atoms.get_size(s.atom)
            if not size or rest % size:
                raise ValueError(f"{what} has {total} inputs, which do not split into blocks of its input's {size} channels")
            out[i] = Seg(s.atom, rest // size)
            known = total
        if known != total:
            raise ValueError(f"{what} expects {total} input features or channels, but its input has {known}")
        return out

    def unify(self, a: list[Seg], b: list[Seg]) -> bool:
        """Couple two values' channel sets one to one; False if their layouts differ."""
        def differ(p: Optional[int], q: Optional[int]) -> bool:
            return p is not None and q is not None and p != q

        if len(a) != len(b) or any(
            differ(x.block, y.block) or differ(self.atoms.get_size(x.atom), self.atoms.get_size(y.atom))
            for x, y in zip(a, b)
        ):
            return False
        for x, y in zip(a, b):
            self.atoms.union(x.atom, y.atom)
        return True

    def tensor_args(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [a for a in node.args if isinstance(a, torch.fx.Node) and self.segs(a) is not None]

    # --- node rules ------------------------------------------------------------------
    def run(self) -> Structure:
        for node in self.gm.graph.nodes:
            self.release_gates(node)
            self.env[node] = self.visit(node)
        return self.s

    def visit(self, node: torch.fx.Node) -> Optional[list[Seg]]:
        if node.op in ("placeholder", "get_attr"):
            return self.fresh(node)
        if node.op == "output":
            self.need_all(node.args)
            return None
        if node.op == "call_module":
            return self.module(node, self.gm.get_submodule(node.target))
        target = node.target
        if node.op == "call_method" and target in _NON_TENSOR or target is getattr:
            return None
        if target is operator.getitem and self.segs(node.args[0]) is None:
            return None
        if target is torch.cat or target is torch.concat:
            return self.cat(node)
        x = self.segs(node.args[0]) if node.args else None
        if x is None:
            return self.barrier(node)
        if target in _PASS_FUNCTIONS or _is_stochastic_depth(target) or (node.op == "call_method" and target in _PASS_METHODS):
            return x if len(self.tensor_args(node)) == 1 else self.barrier(node)
        if target in _GATE_FUNCTIONS and len(self.tensor_args(node)) == 1:
            self.gates.add(node)
            return x
        if target in (torch.flatten, "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, x, start, end)
        if target in ("view", "reshape") or target is torch.reshape:
            return self.reshape(node, x)
        if target in _ADD or target in _MUL or target in _DIV:
            return self.binary(node, x)
        if target in _REDUCE:
            return self.reduce(node, x)
        return self.barrier(node)

    def release_gates(self, node: torch.fx.Node) -> None:
        """A gate read by anything but a product needs its channels whole: zero is not zero there."""
        if node.op in ("call_function", "call_method") and node.target in _MUL:
            return
        for g in node.all_input_nodes:
            if g in self.gates:
                self.need_all(g)

    def module(self, node: torch.fx.Node, m: nn.Module) -> list[Seg]:
        x = self.segs(node.args[0]) if node.args else None
        if x is None or len(self.tensor_args(node)) != 1 or node.kwargs:
            return self.barrier(node)
        if isinstance(m, BayesianGroupLayer):
            return self.group_layer(node, m, x)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or (
            type(m) in _CONV_TYPES and m.groups == m.in_channels == m.out_channels and m.padding_mode == "zeros"
        ):  # BatchNorm and depthwise convolutions act channel by channel
            self.s.channelwise[node.target] = self.resolve(x, _channels(m), f"{node.target}")
            return self.s.channelwise[node.target]
        if (type(m) is nn.Linear and self.is_2d(node.args[0])) or (type(m) in _CONV_TYPES and m.groups == 1):
            n_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            segs = self.resolve(x, n_in, f"{node.target}")
            self.s.plain_consumers[node.target] = segs
            for s in segs:
                self.atoms.use_all(s.atom)
            return self.fresh(node)
        if isinstance(m, _PASS_MODULES):
            return x
        if isinstance(m, (nn.Sigmoid, nn.Hardsigmoid)):
            self.gates.add(node)
            return x
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x, m.start_dim, m.end_dim)
        return self.barrier(node)

    def is_2d(self, n: Any) -> bool:
        shape = self.shape(n)
        return shape is None or len(shape) == 2

    def group_layer(self, node: torch.fx.Node, m: BayesianGroupLayer, x: list[Seg]) -> list[Seg]:
        if node.target in self.s.layers:
            raise ValueError(f"group layer {node.target} is called more than once: compression needs each layer used once")
        if isinstance(m, LinearGroup) and not self.is_2d(node.args[0]):
            # Inputs of more than two dimensions: its groups select features of every position.
            self.need_all(node.args)
            x = [Seg(self.atoms.new(m.in_features, plain=True), 1)]
            out = self.atoms.new(m.out_features, plain=True)
            self.s.layers[node.target] = LayerUse(x, out)
            return self.fresh(node)  # its features are the last dimension, not the channels
        if isinstance(m, LinearGroup):
            x = self.resolve(x, m.in_features, node.target)
            out = self.atoms.new(m.out_features, plain=False)
        else:
            assert isinstance(m, ConvGroup)
            x = self.resolve(x, m.in_channels, node.target)
            for s in x:
                self.atoms.use_all(s.atom)
            out = self.atoms.new(m.out_channels, plain=False)
        self.s.layers[node.target] = LayerUse(x, out)
        return [Seg(out, 1)]

    def flatten(self, node: torch.fx.Node, x: list[Seg], start: int, end: int) -> list[Seg]:
        shape = self.shape(node.args[0])
        ndim = len(shape) if shape is not None else None
        if start != 1 or end not in (-1, (ndim - 1) if ndim else -1):
            return self.barrier(node)
        if ndim is not None and ndim <= 2:
            return x
        if all(self.atoms.plain[self.atoms.find(s.atom)] for s in x):
            return [Seg(self.atoms.new(None, plain=True), 1)]
        spatial = math.prod(shape[2:]) if shape is not None else None
        return [Seg(s.atom, None if spatial is None or s.block is None else s.block * spatial) for s in x]

    def reshape(self, node: torch.fx.Node, x: list[Seg]) -> list[Seg]:
        src, out = self.shape(node.args[0]), self.shape(node)
        if src is None or out is None:
            raise ValueError(f"{node.format_node()}: view/reshape needs the tensors' shapes: pass example_input=")
        if tuple(out) == tuple(src):
            return x
        if len(out) == 2 and len(src) > 2 and out[0] == src[0]:
            return self.flatten(node, x, 1, -1)
        return self.barrier(node)

    def binary(self, node: torch.fx.Node, x: list[Seg]) -> list[Seg]:
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        y = self.segs(b)
        mul, div = node.target in _MUL, node.target in _DIV
        if y is None:
            if isinstance(b, torch.fx.Node) or not (mul or div) or a in self.gates:
                return self.barrier(node)  # plus a number, or an operand we know nothing of
            return x  # times or over a number: zero stays zero
        gate_a, gate_b = a in self.gates, b in self.gates
        if div or (gate_a and gate_b) or ((gate_a or gate_b) and not mul):
            return self.barrier(node)
        sa, sb = self.shape(a), self.shape(b)
        if sa is not None and sb is not None and tuple(sa) != tuple(sb):
            if len(sa) != len(sb) or len(sa) < 2:
                return self.barrier(node)
            if sa[1] != sb[1]:  # one factor shared by all channels, e.g. a spatial gate (N, 1, H, W)
                full, shared = (a, b) if sb[1] == 1 else (b, a)
                if not mul or self.shape(shared)[1] != 1 or full in self.gates:
                    return self.barrier(node)
                self.need_all(shared)
                return self.segs(full)
            # Same channels, other dimensions broadcast: a squeeze-excitation gate (N, C, 1, 1).
        if not self.unify(x, y):
            return self.barrier(node)
        return y if gate_a else x

    def cat(self, node: torch.fx.Node) -> list[Seg]:
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        segs = [self.segs(p) for p in parts] if isinstance(parts, (list, tuple)) else [None]
        shape = self.shape(node)
        if shape is not None and dim < 0:
            dim += len(shape)
        if any(s is None for s in segs) or dim != 1:
            return self.barrier(node)
        return [s for part in segs for s in part]

    def reduce(self, node: torch.fx.Node, x: list[Seg]) -> list[Seg]:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        src = self.shape(node.args[0])
        if dims is None or src is None:
            return self.barrier(node)
        dims = [d % len(src) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        return x if min(dims) >= 2 else self.barrier(node)


def _channels(m: nn.Module) -> int:
    return m.num_features if isinstance(m, nn.modules.batchnorm._BatchNorm) else m.in_channels


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[Any, Structure]]" = weakref.WeakKeyDictionary()


def analyse(model: nn.Module, example_input: Optional[torch.Tensor] = None) -> Structure:
    """The channel dependencies of ``model`` (cached until its modules change).

    ``example_input`` (one batch, any size) lets the analysis see every tensor's shape; it is
    needed where the graph reshapes with ``view``/``reshape`` or flattens several channel sets
    at once, and makes broadcasting visible.
    """
    key = (
        None if example_input is None else (tuple(example_input.shape), example_input.dtype),
        tuple((name, type(m)) for name, m in model.named_modules()),
    )
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    gm = trace(model)
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor):
            raise TypeError(f"example_input must be a tensor (one batch of inputs), got {type(example_input).__name__}")
        from torch.fx.passes.shape_prop import ShapeProp

        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            with torch.no_grad():
                ShapeProp(gm).propagate(example_input.to(device))
        except Exception as err:
            raise ValueError(f"the model fails on example_input of shape {tuple(example_input.shape)}: {err}") from err
        finally:
            model.train(was_training)
    structure = _Analysis(gm).run()
    _CACHE[model] = (key, structure)
    return structure


def coupled_layers(model: nn.Module, example_input: Optional[torch.Tensor] = None) -> list[list[str]]:
    """The group layers whose outputs share one channel set (e.g. the convolutions that write
    into a ResNet's residual stream), by qualified name; only sets written by two or more."""
    st = analyse(model, example_input)
    by_set: dict[int, list[str]] = {}
    for name, use in st.layers.items():
        by_set.setdefault(st.atoms.find(use.out_atom), []).append(name)
    return [names for names in by_set.values() if len(names) > 1]
