"""bclib.runtime.OnnxRuntimeNet: onnxruntime gives the torch net's outputs, at any batch size, with clear errors."""
from __future__ import annotations

import pytest
import torch

from bclib import models
from bclib.compression import dense, prune
from bclib.export import export_onnx
from bclib.testing import sparsify

pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript")
pytest.importorskip("onnxruntime", reason="OnnxRuntimeNet needs onnxruntime")
from bclib.runtime import OnnxRuntimeNet  # noqa: E402


def _pruned(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = models.build(arch, "nj").eval()
    return prune(net, sparsify(net, 0.6, seed=1))


@pytest.mark.parametrize("arch", ["lenet_300_100", "lenet5_caffe"])
@pytest.mark.parametrize("threads", [None, 1])
def test_outputs_match_torch_at_any_batch_size(arch, threads):
    net = _pruned(arch)
    fast = OnnxRuntimeNet(net, torch.randn(1, 1, 28, 28), threads=threads)
    for batch in (1, 7, 64):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), net(x), rtol=1e-4, atol=1e-5)


def test_dense_and_file_round_trip(tmp_path):
    torch.manual_seed(0)
    model = models.build("lenet5_caffe", "nj").eval()
    net, x = dense(model), torch.randn(3, 1, 28, 28)
    export_onnx(net, tmp_path / "net.onnx", x)
    with torch.no_grad():
        torch.testing.assert_close(OnnxRuntimeNet.load(tmp_path / "net.onnx", threads=2)(x), net(x), rtol=1e-4, atol=1e-5)


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
