"""bclib.export.export_onnx: onnxruntime, an independent runtime, gives the torch net's outputs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx
from torch import nn

from bclib import models
from bclib.compression import prune
from bclib.export import export_onnx
from bclib.testing import randomise_batchnorm


@pytest.fixture(scope="module")
def ort() -> Any:
    pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript (pip install onnxscript)")
    pytest.importorskip("onnx", reason="reading the exported graph needs onnx (pip install onnx)")
    return pytest.importorskip("onnxruntime", reason="checking the ONNX file needs onnxruntime (pip install onnxruntime)")


def with_running_stats(net: nn.Module, seed: int = 0) -> nn.Module:
    """``net`` with random BatchNorm running statistics and affine parameters (not 0/1)."""
    return randomise_batchnorm(net, seed)


class Residual(nn.Module):
    """A ResNet-like net: stem, a basic block with identity shortcut and one with a 1x1 conv shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.a1, self.bn_a1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.a2, self.bn_a2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b1, self.bn_b1 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 12, 1, stride=2, bias=False), nn.BatchNorm2d(12))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.bn_a2(self.a2(torch.relu(self.bn_a1(self.a1(x))))) + x)
        x = torch.relu(self.bn_b1(self.b1(x)) + self.shortcut(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class Branches(nn.Module):
    """Two conv branches concatenated along the channels, then an adaptive average pool to 2x2."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Tanh())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(6 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.cat([self.left(x), self.right(x)], dim=1)).flatten(1))


class Selected(nn.Module):
    """Keeps some input features (``index_select`` on a buffer, as ``prune`` writes), then an MLP with BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("idx", torch.tensor([0, 2, 3, 7, 9, 12]))
        self.fc1, self.bn, self.fc2 = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x.index_select(-1, self.idx)))))


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 10),
    )  # fmt: skip


def onnx_outputs(ort: Any, path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def op_types(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    return [node.op_type for node in model.graph.node]


def traced_selected() -> torch.fx.GraphModule:
    gm = torch.fx.symbolic_trace(with_running_stats(Selected()))
    assert any(n.op == "get_attr" for n in gm.graph.nodes)
    assert any(n.op == "call_method" and n.target == "index_select" for n in gm.graph.nodes)
    return gm


@pytest.mark.parametrize(
    "make, shape",
    [(cnn, (1, 12, 12)), (Residual, (3, 8, 8)), (Branches, (3, 8, 8)), (traced_selected, (14,))],
    ids=["sequential-cnn", "residual", "cat-adaptive-pool", "fx-index-select"],
)
def test_onnxruntime_matches_torch(ort: Any, tmp_path: Path, make: Any, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = with_running_stats(make()).eval()
    path = tmp_path / "net.onnx"
    size = export_onnx(net, path, torch.randn(2, *shape))
    assert size == path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["net.onnx"]  # no temporary file left
    assert "BatchNormalization" not in op_types(path)  # every BatchNorm here folds exactly
    for batch in (1, 7):  # not the example's 2: the batch dimension is dynamic
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            torch.testing.assert_close(onnx_outputs(ort, path, x), net(x), atol=1e-5, rtol=1e-5)


def gather_axes(path: Path) -> list[int]:
    import onnx

    model = onnx.load(str(path))
    return [next((a.i for a in n.attribute if a.name == "axis"), 0) for n in model.graph.node if n.op_type == "Gather"]


class SelectedLinear(nn.Module):
    """``index_select`` on the last dimension of any input, then a Linear layer (for 3-d inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("idx", torch.tensor([1, 2, 5, 8, 11, 13]))
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.index_select(-1, self.idx))


def selected_linear() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(SelectedLinear())


@pytest.mark.parametrize("make, shape", [(traced_selected, (14,)), (selected_linear, (3, 14))], ids=["features", "3d"])
def test_feature_selection_gathers_whole_rows(ort: Any, tmp_path: Path, make: Any, shape: tuple[int, ...]) -> None:
    """``index_select(-1, idx)`` is written as Transpose, Gather along axis 0, Transpose (onnxruntime
    copies rows as blocks, the last axis value by value); the outputs stay the net's."""
    torch.manual_seed(0)
    net = make().eval()
    export_onnx(net, tmp_path / "net.onnx", torch.randn(2, *shape))
    assert gather_axes(tmp_path / "net.onnx") == [0]
    x = torch.randn(5, *shape)
    with torch.no_grad():
        torch.testing.assert_close(onnx_outputs(ort, tmp_path / "net.onnx", x), net(x), atol=1e-5, rtol=1e-5)
    assert any(n.target == "index_select" and n.args[1] == -1 for n in net.graph.nodes)  # the net itself unchanged


def test_pruned_bayesian_residual_net(ort: Any, tmp_path: Path) -> None:
    """What the export is for: ``prune``'s output for a residual net with some filters and features pruned."""
    torch.manual_seed(0)
    model = models.to_bayesian(with_running_stats(Residual())).eval()
    layers = models.bayesian_layers(model)
    with torch.no_grad():
        for layer in layers:
            layer.scale.z_logvar[torch.rand(layer.scale.z_logvar.shape) < 0.3] = 4.0  # log_alpha > 0: pruned
    x = torch.randn(2, 3, 8, 8)
    net = prune(model, [0.0] * len(layers), x)
    assert net.get_submodule("fc").in_features < 12
    export_onnx(net, tmp_path / "net.onnx", x)
    assert "BatchNormalization" not in op_types(tmp_path / "net.onnx")
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(onnx_outputs(ort, tmp_path / "net.onnx", x), net(x), atol=1e-5, rtol=1e-5)


def test_unfoldable_batchnorm_is_kept(ort: Any, tmp_path: Path) -> None:
    """A BatchNorm after a ReLU cannot fold; it stays and the outputs still agree."""
    net = with_running_stats(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.BatchNorm2d(3), nn.Flatten())).eval()
    export_onnx(net, tmp_path / "net.onnx", torch.randn(2, 2, 5, 5))
    assert "BatchNormalization" in op_types(tmp_path / "net.onnx")
    x = torch.randn(4, 2, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(onnx_outputs(ort, tmp_path / "net.onnx", x), net(x), atol=1e-5, rtol=1e-5)


def test_exports_eval_mode_and_leaves_the_net_alone(ort: Any, tmp_path: Path) -> None:
    net = with_running_stats(cnn()).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    export_onnx(net, tmp_path / "net.onnx", torch.randn(3, 1, 12, 12))
    assert net.training and isinstance(net[1], nn.BatchNorm2d)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(onnx_outputs(ort, tmp_path / "net.onnx", x), net.eval()(x), atol=1e-5, rtol=1e-5)


# --- bad input (no ONNX packages needed: checked before exporting) ---------------------------
def test_example_input_not_a_tensor(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"example_input must be a torch.Tensor.*not list"):
        export_onnx(cnn(), tmp_path / "net.onnx", [[0.0] * 12] * 12)


def test_net_not_a_module(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="needs an nn.Module"):
        export_onnx(lambda x: x, tmp_path / "net.onnx", torch.randn(1, 3))


def test_wrong_input_shape_names_the_expected_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shape \(2, 3, 12, 12\).*Conv2d\(1, 4.*takes input of shape \(N, 1, H, W\)"):
        export_onnx(cnn(), tmp_path / "net.onnx", torch.randn(2, 3, 12, 12))
    with pytest.raises(ValueError, match=r"shape \(2, 5\).*Linear\(in_features=6.*\(\.\.\., 6\)"):
        export_onnx(nn.Sequential(nn.Linear(6, 2)), tmp_path / "net.onnx", torch.randn(2, 5))
    assert list(tmp_path.iterdir()) == []


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no directory .*missing.*create it first"):
        export_onnx(cnn(), tmp_path / "missing" / "net.onnx", torch.randn(1, 1, 12, 12))
    assert list(tmp_path.iterdir()) == []
