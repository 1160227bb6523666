"""Fine-tuning after pruning (bclib.finetune, reproduce --finetune): pruned groups stay pruned,
the loss falls, training resumes, bad input is named, and the shipped fine-tuned runs agree
with their checkpoints."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bclib import compression, finetune, reproduce
from bclib.config import data_dir, results_dir
from bclib.convert import bayesian_layers, to_bayesian
from bclib.data import TensorBatches, load_mnist
from bclib.testing import randomise_batchnorm, sparsify, synthetic_mnist
from bclib.train import evaluate, load_checkpoint

X = torch.zeros(1, 1, 8, 8)


def _net(prior: str, seed: int = 0) -> nn.Module:
    """A small conv net with BatchNorm (so a pruned filter's BatchNorm shift must be zeroed too),
    a conv-to-fc hand-over and two fc layers; 30 % of every layer's groups prunable at 0."""
    torch.manual_seed(seed)
    plain = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(5 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 3))  # fmt: skip
    net = randomise_batchnorm(to_bayesian(plain, prior), seed)
    sparsify(net, 0.3, seed)
    return net


def _data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of a random teacher (learnable: the labels are a function of the inputs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.flatten(1) @ torch.randn(64, 3, generator=g)).argmax(1)
    return x, y


def _batches(seed: int = 0) -> TensorBatches:
    return TensorBatches(*_data(), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))


def _pruned_parts_randomised(net: nn.Module, masks: compression.Masks) -> None:
    """Overwrite everything the masks drop: pruned groups' weights and biases, pruned BatchNorm channels."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer, m in zip(bayesian_layers(net), masks):
            drop = ~finetune.kept_groups(layer, m)
            w = layer.weight_mu.transpose(0, layer.group_dim)
            w[drop] = torch.randn(w[drop].shape, generator=g) * 10
            if layer.groups_on == "outputs" and layer.bias_mu is not None:
                layer.bias_mu[drop] = torch.randn(int(drop.sum()), generator=g) * 10
        for name, keep in masks.channels.items():
            bn = net.get_submodule(name)
            bn.bias[~keep] = 5.0


@pytest.mark.parametrize("prior", ["nj", "hs"])
def test_pruned_groups_contribute_exactly_nothing_in_training(prior):
    net = _net(prior).train()
    masks = compression.group_masks(net, [0.0] * 4, X)
    assert any(not bool(finetune.kept_groups(layer, m).all()) for layer, m in zip(bayesian_layers(net), masks))
    assert masks.channels  # the pruned filters of conv 1 take BatchNorm channels with them
    x = _data(32)[0]
    with finetune.fixed_pruning(net, masks):
        torch.manual_seed(3)
        out = net(x)
        _pruned_parts_randomised(net, masks)
        torch.manual_seed(3)
        assert torch.equal(net(x), out)  # the same noise, whatever the pruned groups hold
    torch.manual_seed(3)
    assert not torch.equal(net(x), out)  # released: the (changed) pruned groups count again


def test_fixed_pruning_in_eval_is_the_pruned_net():
    net = _net("nj")
    masks = compression.group_masks(net, [0.0] * 4, X)
    x = _data(32)[0]
    with finetune.fixed_pruning(net, masks):
        masked = net.eval()(x)
    assert torch.allclose(masked, compression.prune(net, [0.0] * 4, X)(x), atol=1e-5)
    assert all(layer.group_keep is None and layer.weight_mask is None for layer in bayesian_layers(net))


@pytest.mark.parametrize("prior", ["nj", "hs"])
def test_finetune_lowers_the_loss_and_keeps_exactly_the_pruned_groups(prior):
    net = _net(prior)
    start = copy.deepcopy(net)
    x, y = _data()
    before = F.cross_entropy(compression.prune(net, [0.0] * 4, X)(x), y).item()
    torch.manual_seed(0)
    ft = finetune.finetune(net, [0.0] * 4, _batches(), epochs=15, lr=1e-2, example_input=X, progress=False)
    assert ft.history[-1]["loss"] < ft.history[0]["loss"]
    pruned = compression.prune(net, ft.thresholds, X)
    assert F.cross_entropy(pruned(x), y).item() < before - 0.1  # the pruned net itself fits better
    # the thresholds keep exactly the fixed groups: the same masks, and prune gives the masked net
    assert finetune._same_masks(compression.group_masks(net, ft.thresholds, X), ft.masks) is None
    compression.apply_masks(net, ft.masks)
    assert torch.allclose(pruned(x), net.eval()(x), atol=1e-5)
    report = compression.compression_report(net, ft.thresholds, X)
    assert report.architecture == compression.compression_report(start, [0.0] * 4, X).architecture
    if prior == "nj":  # the dropped groups, trained by the KL alone (falling in log alpha), became more prunable
        for layer, old, m in zip(bayesian_layers(net), bayesian_layers(start), ft.masks):
            drop = ~finetune.kept_groups(layer, m)
            assert bool((layer.log_alpha[drop] > old.log_alpha[drop]).all())


class _Interrupted(Exception):
    pass


class _StopsInEpoch(TensorBatches):
    """Training batches that raise when their ``stop``-th pass begins (a killed run)."""

    def __init__(self, stop: int, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stop, self.passes = stop, 0

    def __iter__(self):
        self.passes += 1
        if self.passes == self.stop:
            raise _Interrupted
        return super().__iter__()


def test_interrupted_finetune_resumes_to_the_same_model(tmp_path):
    start = _net("nj")
    whole = copy.deepcopy(start)
    torch.manual_seed(1)
    expected = finetune.finetune(whole, [0.0] * 4, _batches(), epochs=3, example_input=X, progress=False)
    state = tmp_path / "ft.state.pt"
    torch.manual_seed(1)
    with pytest.raises(_Interrupted):
        finetune.finetune(copy.deepcopy(start), [0.0] * 4, _StopsInEpoch(3, *_data(), batch_size=64, shuffle=True,
                          generator=torch.Generator().manual_seed(0)), epochs=3, example_input=X,
                          state_path=state, progress=False)  # fmt: skip
    torch.manual_seed(99)  # the state file restores the random state
    resumed_net = copy.deepcopy(start)
    resumed = finetune.finetune(resumed_net, [0.0] * 4, _batches(5), epochs=3, example_input=X, state_path=state,
                                progress=False)  # fmt: skip
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in expected.history]
    for (name, a), b in zip(whole.state_dict().items(), resumed_net.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.thresholds == expected.thresholds


def test_bad_input_is_named():
    net = _net("nj")
    other = to_bayesian(nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 3)), "nj")
    with pytest.raises(ValueError, match="masks for the model's 4 group layers: they are the masks of another model"):
        finetune.fix_pruning(net, compression.group_masks(other, [1.0, 1.0], X))
    wrong = compression.group_masks(_net("nj"), [0.0] * 4, X)
    wrong[2] = compression.LayerMask(torch.ones(7, dtype=torch.bool), wrong[2].outputs)
    with pytest.raises(ValueError, match="mask 2 covers 7 inputs .* belong to another model"):
        finetune.fix_pruning(net, wrong)
    with pytest.raises(TypeError, match="not the thresholds themselves"):
        finetune.fix_pruning(net, [0.0] * 4)
    with pytest.raises(TypeError, match="no Bayesian group layers"):
        finetune.fix_pruning(nn.Linear(3, 3), wrong)
    empty = compression.group_masks(net, [0.0] * 4, X)
    empty[3] = compression.LayerMask(torch.zeros_like(empty[3].inputs), empty[3].outputs)
    with pytest.raises(ValueError, match="mask 3 keeps no group"):
        finetune.fix_pruning(net, empty)
    assert all(layer.group_keep is None for layer in bayesian_layers(net))  # nothing half-applied


def test_thresholds_that_cannot_keep_the_fixed_groups_are_an_error():
    net = _net("nj")
    masks = compression.group_masks(net, [0.0] * 4, X)
    assert finetune.thresholds_keeping(net, masks, X)  # possible as trained
    layer = bayesian_layers(net)[3]  # last fc layer: groups are its inputs, the graph removes no more
    with torch.no_grad():
        dropped = (~masks[3].inputs).nonzero()[0]
        layer.scale.z_logvar[dropped] = -30.0  # a pruned group now looks more important than every kept one
    with pytest.raises(finetune.FixedPruningError, match="no log-alpha thresholds keep exactly the fixed groups.*layer 3"):
        finetune.thresholds_keeping(net, masks, X)


def test_fast_finetune_stage_writes_its_section_and_reads_levels_back(tmp_path, monkeypatch):
    """``reproduce --fast`` then ``--finetune`` on synthetic MNIST-shaped tensors (into tmp_path only)."""
    monkeypatch.setattr(reproduce, "load_data", synthetic_mnist)
    reproduce.main(["--fast", "--out", str(tmp_path), "--only", "lenet_300_100-nj"])
    with pytest.raises(FileNotFoundError, match="run it first without --finetune"):
        reproduce.finetune_run("lenet_300_100", "hs", tmp_path)
    reproduce.main(["--fast", "--out", str(tmp_path), "--only", "lenet_300_100-nj", "--finetune"])
    r = json.loads((tmp_path / "lenet_300_100-nj.json").read_text())
    ft = r["finetuned"]
    s = reproduce._finetune_settings("lenet_300_100", True)
    assert [p["max_drop"] for p in ft["points"]] == s["budgets"] + s["second_round"]
    second = ft["points"][-1]  # pruned further from the best first-round level, never less
    first = next(p for p in ft["points"] if "first_round" not in p and p["max_drop"] == second["first_round"])
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(second["architecture"], first["architecture"]))
    assert second["before"]["architecture"] == second["architecture"]
    assert all(p["epochs"] == ft["epochs"] == 1 and p["train_seconds"] > 0 for p in ft["points"])
    for p in ft["points"]:  # the fine-tuned net keeps exactly the groups pruned before it
        assert p["architecture"] == p["before"]["architecture"]
    model, meta = load_checkpoint(tmp_path / ft["checkpoint"])
    head = ft["points"][ft["headline"]]
    assert meta["max_drop"] == head["max_drop"]
    assert compression.compression_report(model, head["thresholds"]).as_dict()["bits"] == head["bits"]
    table = (tmp_path / "table.md").read_text()
    assert "Fine-tuned after pruning" in table and "| LeNet-300-100 | BC-GNJ | fine-tuned, nearest" in table
    assert "(headline) |" in table
    states = sorted((tmp_path / "state" / "finetune").glob("*.state.pt"))
    assert len(states) == len(ft["points"]) + len(s["seeds"])  # the headline again with each other seed
    for path in states:
        path.unlink()
    reproduce.main(["--fast", "--out", str(tmp_path), "--only", "lenet_300_100-nj", "--finetune"])
    assert json.loads((tmp_path / "lenet_300_100-nj.json").read_text())["finetuned"]["points"] == ft["points"]
    assert not any(path.exists() for path in states)  # finished levels are read back, not trained again


SHIPPED = sorted(p.stem for p in results_dir().glob("*-*.json"))
needs_mnist = pytest.mark.skipif(
    not (data_dir() / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists(), reason="MNIST not in BCLIB_DATA"
)


@pytest.fixture(scope="module")
def test_batches():
    return TensorBatches(*load_mnist(train=False), batch_size=1000)


def test_every_shipped_run_is_fine_tuned():
    assert SHIPPED and all("finetuned" in json.loads((results_dir() / f"{r}.json").read_text()) for r in SHIPPED)


@needs_mnist
@pytest.mark.parametrize("run", SHIPPED)
def test_shipped_finetuned_headline_reproduces_from_its_checkpoint(run, test_batches):
    """The fine-tuned headline: its checkpoint gives the recorded rates and test errors, and its
    thresholds keep exactly the groups that the pre-fine-tuning thresholds kept on the shipped posterior."""
    r = json.loads((results_dir() / f"{run}.json").read_text())
    ft = r["finetuned"]
    head = ft["points"][ft["headline"]]
    model, meta = load_checkpoint(results_dir() / ft["checkpoint"])
    assert (meta["arch"], meta["prior"], meta["max_drop"]) == (r["arch"], r["prior"], head["max_drop"])
    assert meta["thresholds_before"] == head["before"]["thresholds"]
    shipped, _ = load_checkpoint(results_dir() / f"{run}.pt")
    kept = compression.group_masks(model, head["thresholds"])
    if "first_round" not in head:
        fixed = compression.group_masks(shipped, head["before"]["thresholds"])
        assert finetune._same_masks(kept, fixed) is None
    else:  # a second-round level keeps a subset of the groups its first-round level kept
        first = next(p for p in ft["points"] if "first_round" not in p and p["max_drop"] == head["first_round"])
        fixed = compression.group_masks(shipped, first["before"]["thresholds"])
        for a, b in zip(kept, fixed):
            assert not (a.inputs.cpu() & ~b.inputs.cpu()).any() and not (a.outputs.cpu() & ~b.outputs.cpu()).any()
    report = compression.compression_report(model, head["thresholds"])
    assert [list(a) for a in report.architecture] == head["architecture"]
    assert [[b.exponent, b.significand] for b in report.bits] == head["bits"]
    assert report.rate_precision == pytest.approx(head["rate_precision"], rel=1e-6)
    pruned = compression.prune(model, head["thresholds"])
    error = lambda net: 100 * (1 - evaluate(net, test_batches))  # noqa: E731
    assert error(pruned) == pytest.approx(head["error_pruned"], abs=0.011)
    assert error(compression.quantized(pruned, report.bits)) == pytest.approx(head["error_compressed"], abs=0.011)
    # the headline: most compression at or below the paper's error, else the level nearest it
    paper = reproduce.PAPER[(r["arch"], r["prior"])]["error"]
    within = [p for p in ft["points"] if p["error_compressed"] <= paper + 1e-9]
    expected = (max(within, key=lambda p: p["rate_precision"]) if within else
                min(ft["points"], key=lambda p: (abs(p["error_compressed"] - paper), -p["rate_pruning"])))
    assert ft["headline"] == ft["points"].index(expected)
