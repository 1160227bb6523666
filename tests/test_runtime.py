"""bclib.runtime.OnnxRuntimeNet: onnxruntime gives the torch net's outputs, at any batch size, with clear errors."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bclib import models
from bclib.compression import dense, prune
from bclib.export import export_onnx
from bclib.testing import sparsify

from bclib.runtime import InChunks, OnnxRuntimeNet, chosen_kernels, faster_eager, tune_convolutions

needs_onnxruntime = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnxscript", "onnxruntime")),
    reason="OnnxRuntimeNet needs onnxruntime, and torch.onnx's exporter onnxscript",
)


def _pruned(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = models.build(arch, "nj").eval()
    return prune(net, sparsify(net, 0.6, seed=1))


@needs_onnxruntime
@pytest.mark.parametrize("arch", ["lenet_300_100", "lenet5_caffe"])
@pytest.mark.parametrize("threads", [None, 1])
def test_outputs_match_torch_at_any_batch_size(arch, threads):
    net = _pruned(arch)
    fast = OnnxRuntimeNet(net, torch.randn(1, 1, 28, 28), threads=threads)
    for batch in (1, 7, 64):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), net(x), rtol=1e-4, atol=1e-5)


@needs_onnxruntime
def test_dense_and_file_round_trip(tmp_path):
    torch.manual_seed(0)
    model = models.build("lenet5_caffe", "nj").eval()
    net, x = dense(model), torch.randn(3, 1, 28, 28)
    export_onnx(net, tmp_path / "net.onnx", x)
    with torch.no_grad():
        torch.testing.assert_close(OnnxRuntimeNet.load(tmp_path / "net.onnx", threads=2)(x), net(x), rtol=1e-4, atol=1e-5)


@needs_onnxruntime
def test_bad_inputs_are_clear_errors(tmp_path):
    fast = OnnxRuntimeNet(_pruned("lenet_300_100"), torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match=r"takes input of shape .*got \(2, 1, 14, 14\)"):
        fast(torch.randn(2, 1, 14, 14))
    with pytest.raises(TypeError, match="takes a torch.Tensor batch, got ndarray"):
        fast(torch.randn(2, 1, 28, 28).numpy())
    with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
        OnnxRuntimeNet(_pruned("lenet_300_100"), torch.randn(1, 1, 28, 28), threads=0)
    with pytest.raises(FileNotFoundError, match="no ONNX file at .*export_onnx"):
        OnnxRuntimeNet.load(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="onnxruntime cannot load this ONNX model"):
        OnnxRuntimeNet.load(tmp_path / "bad.onnx")
    with pytest.raises(TypeError, match="Bayesian group layers"):
        OnnxRuntimeNet(models.build("lenet_300_100", "nj"), torch.randn(1, 1, 28, 28))


class _Pools(nn.Module):
    """Pools the rewrite must change (2x2 after a ReLU, a functional ReLU) and leave (3x3, ceil mode, shared ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.relu, self.pool = nn.ReLU(), nn.MaxPool2d(2)
        self.pool3, self.ceil = nn.MaxPool2d(3, 1), nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pool(self.relu(self.conv(x)))
        b = self.pool(F.relu(self.conv(x)))
        shared = torch.relu(self.conv(x))
        c = self.pool(shared) + shared.mean()
        return torch.cat([t.flatten(1) for t in (a, b, c, self.pool3(a), self.ceil(a))], 1)


@pytest.mark.parametrize("size", [(17, 17), (16, 21), (8, 9)])  # odd sizes: floor mode drops the last row or column
def test_faster_eager_gives_the_same_outputs_bit_for_bit(size):
    torch.manual_seed(0)
    net = _Pools().eval()
    fast = faster_eager(net)
    kinds = [type(m) for m in fast.modules()]
    assert kinds.count(nn.MaxPool2d) == 2  # pool3 and ceil stay; the three 2x2 pools are rewritten
    x = torch.randn(3, 2, *size)
    x[0, 0, 0, :3] = float("nan")  # NaN propagates through max pooling: through the rewrite too
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=0, atol=0, equal_nan=True)


def test_faster_eager_on_a_pruned_lenet_saves_and_loads_without_bclib(tmp_path):
    net = faster_eager(_pruned("lenet5_caffe"))
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net(x), _pruned("lenet5_caffe")(x), rtol=0, atol=0)
    torch.save(net, tmp_path / "net.pt")
    torch.save(x, tmp_path / "x.pt")
    code = (f"import sys, torch; sys.modules['bclib'] = None; "
            f"net = torch.load({str(tmp_path / 'net.pt')!r}, weights_only=False); "
            f"print(net(torch.load({str(tmp_path / 'x.pt')!r})).shape)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch.Size([5, 10])"


@pytest.mark.parametrize("arch", ["lenet_300_100", "lenet5_caffe"])
def test_faster_eager_calls_functions_not_modules_and_stays_exact(arch):
    net = _pruned(arch)
    fast = faster_eager(net)
    assert not [n for n in fast.graph.nodes if n.op == "call_module"]
    assert not list(fast.children())  # weights and biases hoisted, the modules gone
    assert any(n.target is torch.relu_ for n in fast.graph.nodes)
    for batch in (1, 7, 64):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), net(x), rtol=0, atol=0)


def test_faster_eager_never_overwrites_the_input_or_a_shared_tensor():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(torch.relu(x))  # the input: not in place
            return torch.relu(h) + h  # h has two uses: not in place

    torch.manual_seed(0)
    net, x = Shared().eval(), torch.randn(3, 4)
    x0, fast = x.clone(), faster_eager(net)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=0, atol=0)
    assert torch.equal(x, x0)
    assert not any(n.target is torch.relu_ for n in fast.graph.nodes)


def _linear_widths(fast: torch.fx.GraphModule) -> list[int]:
    """Output widths of the fully connected layers, which ``faster_eager`` calls as ``F.linear``."""
    return [getattr(fast, n.args[1].target).shape[0] for n in fast.graph.nodes if n.target is F.linear]


def test_width_multiple_pads_hidden_layers_with_zero_units():
    net = _pruned("lenet_300_100")
    widths = [m.out_features for m in net.modules() if isinstance(m, nn.Linear)]
    assert any(w % 16 for w in widths[:-1])  # the test needs an odd hidden width to pad
    fast = faster_eager(net, width_multiple=16)
    padded = _linear_widths(fast)
    assert padded == [-(-w // 16) * 16 for w in widths[:-1]] + widths[-1:]  # the output layer keeps its width
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        want, got = net(x), fast(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float rounding only
    assert torch.equal(got.argmax(1), want.argmax(1))


@pytest.mark.parametrize("width_multiple", [1, 16])
def test_transposed_stores_fully_connected_weights_as_their_transpose(width_multiple):
    net = _pruned("lenet_300_100")
    fast = faster_eager(net, width_multiple=width_multiple, transposed=True)
    weights = [getattr(fast, n.args[1].target) for n in fast.graph.nodes if n.target is F.linear]
    assert len(weights) == 3
    for w in weights:  # the usual out x in shape, laid out in memory as in x out
        assert w.stride() == (1, w.shape[0]) and w.t().is_contiguous()
    plain = faster_eager(net, width_multiple=width_multiple)
    assert _linear_widths(fast) == _linear_widths(plain)
    for batch in (1, 64):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            want, got = net(x), fast(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # another summation order: float rounding
    with torch.no_grad():  # a Linear on a 3-d input takes the view too
        seq = nn.Sequential(nn.Linear(5, 3)).eval()
        x3 = torch.randn(2, 4, 5)
        torch.testing.assert_close(faster_eager(seq, transposed=True)(x3), seq(x3), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="transposed must be True or False"):
        faster_eager(net, transposed=1)


def test_width_multiple_leaves_layers_whose_output_goes_elsewhere():
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.c(torch.sigmoid(self.b(h)) + h)  # a feeds b and the sum; b feeds a sigmoid

    net = Branch().eval()
    fast = faster_eager(net, width_multiple=4)
    assert _linear_widths(fast) == [5, 5, 2]
    x = torch.randn(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=0, atol=0)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="width_multiple must be a whole number >= 1"):
            faster_eager(net, width_multiple=bad)


def test_width_multiple_leaves_a_layer_used_twice():
    fc = nn.Linear(5, 5)
    net = nn.Sequential(fc, nn.ReLU(), fc).eval()
    fast = faster_eager(net, width_multiple=4)
    x = torch.randn(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["lenet_300_100", "lenet5_caffe"])
def test_in_chunks_gives_the_whole_batch_outputs(arch):
    net = faster_eager(_pruned(arch))
    chunked = InChunks(net, size=16)
    for batch in (5, 16, 50):  # one slice, exactly one, and a ragged last one
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            want, got = net(x), chunked(x)
        exact = batch <= 16  # a single slice is the net's own call; others may take other kernels
        torch.testing.assert_close(got, want, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)


def test_in_chunks_bad_input_is_a_clear_error():
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="size must be a whole number >= 1"):
            InChunks(nn.Identity(), bad)

    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    with pytest.raises(TypeError, match="returns one tensor, this one returns tuple"):
        InChunks(Pair(), 2)(torch.zeros(3, 1))


class _Convs(nn.Module):
    """Convolutions each kernel takes (stride 1), only some take (stride 2, dilation), none but oneDNN takes
    (groups, padding given as a string)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.c, self.d = nn.Conv2d(8, 8, 3, dilation=2, bias=False), nn.Conv2d(8, 4, 1, groups=2)
        self.e = nn.Conv2d(4, 4, 3, padding="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.e(self.d(torch.relu(self.c(self.b(torch.relu(self.a(x)))))))


@pytest.mark.parametrize("kernels, expected", [
    (("im2col",), ["im2col", "im2col", "onednn", "onednn", "onednn"]),
    (("nnpack",), ["nnpack", "onednn", "onednn", "onednn", "onednn"]),
    (("onednn",), ["onednn"] * 5),
])  # fmt: skip
def test_tune_convolutions_runs_each_kernel_where_it_applies_to_float_rounding(kernels, expected):
    if "nnpack" in kernels and not torch._nnpack_available():
        pytest.skip("this build of PyTorch has no NNPACK")
    torch.manual_seed(0)
    net = faster_eager(_Convs().eval())
    x = torch.randn(3, 1, 21, 21)
    tuned = tune_convolutions(net, x, kernels, repeats=1)
    assert chosen_kernels(tuned) == expected
    assert chosen_kernels(net) == ["onednn"] * 5  # the original is left as it was
    with torch.no_grad():
        for batch in (1, 3, 8):  # tuned at 3, correct at any batch
            x = torch.randn(batch, 1, 21, 21)
            torch.testing.assert_close(tuned(x), net(x), rtol=1e-4, atol=1e-5)


def test_tune_convolutions_keeps_the_fastest_and_the_result_loads_without_bclib(tmp_path):
    net = faster_eager(_pruned("lenet5_caffe"))
    x = torch.randn(4, 1, 28, 28)
    tuned = tune_convolutions(net, x, repeats=3)
    assert len(chosen_kernels(tuned)) == 2 and set(chosen_kernels(tuned)) <= {"onednn", "im2col", "nnpack"}
    # a margin of 99.9 % keeps oneDNN wherever it can run: no other kernel is a thousand times faster
    assert chosen_kernels(tune_convolutions(net, x, repeats=1, margin=0.999)) == ["onednn", "onednn"]
    with torch.no_grad():
        torch.testing.assert_close(tuned(x), net(x), rtol=1e-4, atol=1e-5)
    torch.save(x, tmp_path / "x.pt")
    for kernel in ("im2col", "nnpack") if torch._nnpack_available() else ("im2col",):
        torch.save(tune_convolutions(net, x, (kernel,), repeats=1), tmp_path / f"{kernel}.pt")
        code = (f"import sys, torch; sys.modules['bclib'] = None; "  # a fresh process: NNPACK not started
                f"net = torch.load({str(tmp_path / f'{kernel}.pt')!r}, weights_only=False); "
                f"print(net(torch.load({str(tmp_path / 'x.pt')!r})).shape)")  # fmt: skip
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "torch.Size([4, 10])"


def test_tune_convolutions_bad_inputs_are_clear_errors():
    net, x = faster_eager(_pruned("lenet5_caffe")), torch.randn(2, 1, 28, 28)
    with pytest.raises(TypeError, match=r"takes a torch.fx.GraphModule, got Sequential: pass faster_eager\(net\)"):
        tune_convolutions(nn.Sequential(nn.Conv2d(1, 2, 3)), x)
    with pytest.raises(TypeError, match="example_input must be a torch.Tensor batch, got list"):
        tune_convolutions(net, [x])
    with pytest.raises(ValueError, match=r"kernels must be a non-empty sequence of \['onednn', 'im2col', 'nnpack'\]"):
        tune_convolutions(net, x, ("cudnn",))
    with pytest.raises(ValueError, match="kernels must be"):
        tune_convolutions(net, x, "im2col")
    with pytest.raises(ValueError, match="repeats must be a whole number >= 1"):
        tune_convolutions(net, x, repeats=0)
    with pytest.raises(ValueError, match=r"margin must be a share of time in \[0, 1\)"):
        tune_convolutions(net, x, margin=1.0)
    with pytest.raises(ValueError, match=r"calls nn.Conv2d modules.*tune faster_eager\(net\)"):
        tune_convolutions(_pruned("lenet5_caffe"), x)  # prune's graph: convolutions as modules
    with pytest.raises(ValueError, match="tuned already"):
        tune_convolutions(tune_convolutions(net, x, ("im2col",), repeats=1), x)
