"""bclib.train.train fails safely: non-finite numbers, bad arguments and batches, foreign state files, resuming."""
import pytest
import torch
from torch import nn

from bclib import data, models, train


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.to_bayesian(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), "nj")


def _data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _batches(x: torch.Tensor, y: torch.Tensor) -> data.TensorBatches:
    return data.TensorBatches(x, y, 8, shuffle=True, generator=torch.Generator().manual_seed(2))


def _fit(net: nn.Module, batches, epochs: int = 1, **kw) -> list[dict[str, float]]:
    kw = {"n_data": 48, "progress": False, **kw}
    return train.train(net, batches, epochs, **kw)


def _assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_nan_data_stops_with_epoch_and_step_and_keeps_the_last_good_state(tmp_path):
    x, y = _data()
    state = tmp_path / "s.pt"
    _fit(_net(), _batches(x, y), 1, state_path=state)
    good = state.read_bytes()
    # Oracle for the step: the permutation of epoch 2, drawn from the data generator saved after epoch 1.
    g = torch.Generator()
    g.set_state(torch.load(state, weights_only=True)["data_rng"])
    poisoned = 29
    step = (torch.randperm(48, generator=g) == poisoned).nonzero().item() // 8 + 1
    bad_x = x.clone()
    bad_x[poisoned, 2] = float("nan")
    with pytest.raises(train.NonFiniteLossError, match=rf"epoch 2, step {step}: the loss is nan") as err:
        _fit(_net(), _batches(bad_x, y), 2, state_path=state)
    assert (err.value.epoch, err.value.step) == (2, step)
    assert "inputs hold 1 NaN or infinite values" in str(err.value) and "after epoch 1" in str(err.value)
    assert state.read_bytes() == good
    # the kept state resumes: 1 + 1 epochs equal 2 epochs in one run, to the last bit
    resumed = _net()
    _fit(resumed, _batches(x, y), 2, state_path=state)
    straight = _net()  # the random state right after building, as in the first run
    _fit(straight, _batches(x, y), 2)
    _assert_same_parameters(resumed, straight)


class _SqrtNet(nn.Module):
    """Finite outputs and loss, but the gradient of sqrt at 0 times 0 is NaN: Adam makes ``p`` NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + 0 * torch.sqrt(self.p)


def test_non_finite_parameters_after_a_step_stop_training(tmp_path):
    x, y = _data()
    with pytest.raises(train.NonFiniteLossError, match=r"epoch 1, step 1: at the epoch's end, the parameters \['p'\]"):
        _fit(_SqrtNet(), [(x, y)], 2, state_path=tmp_path / "s.pt")
    assert not (tmp_path / "s.pt").exists()


class _HiddenNaNNet(_SqrtNet):
    """Like _SqrtNet, but ``p`` never reaches the loss once NaN: only the end-of-epoch check can find it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.where(torch.isfinite(self.p), self.p, torch.zeros(()))
        return self.fc(x) + 0 * torch.sqrt(p)


@pytest.mark.parametrize("net_cls, where", [(_SqrtNet, "step 1: after the optimiser's step"),
                                             (_HiddenNaNNet, "step 6: at the epoch's end")])  # fmt: skip
def test_a_parameter_made_nan_mid_epoch_stops_training(tmp_path, net_cls, where):
    x, y = _data()
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)]  # 6 steps; step 1 makes p NaN
    with pytest.raises(train.NonFiniteLossError, match=rf"epoch 1, {where}, the parameters \['p'\]"):
        _fit(net_cls(), batches, 2, state_path=tmp_path / "s.pt")
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.parametrize(
    "kw, error, message",
    [
        ({"epochs": 0}, ValueError, "epochs must be at least 1"),
        ({"epochs": -2}, ValueError, "epochs must be at least 1"),
        ({"epochs": 2.0}, TypeError, "epochs must be an int"),
        ({"n_data": 0}, ValueError, "n_data must be at least 1"),
        ({"n_data": -48}, ValueError, "n_data must be at least 1"),
        ({"n_data": 48.0}, TypeError, "n_data must be an int"),
        ({"n_data": True}, TypeError, "n_data must be an int"),
        ({"lr": 0.0}, ValueError, "lr must be a positive finite number"),
        ({"lr": -1e-3}, ValueError, "lr must be a positive finite number"),
        ({"lr": float("nan")}, ValueError, "lr must be a positive finite number"),
        ({"kl_warmup": -1}, ValueError, "kl_warmup must be at least 0"),
        ({"lr_cooldown": -1}, ValueError, "lr_cooldown must be at least 0"),
    ],
)
def test_bad_arguments_are_clear_errors(kw, error, message):
    x, y = _data()
    net = _net()
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(error, match=message):
        _fit(net, [(x, y)], **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_empty_or_spent_batches_are_errors_not_a_zero_loss():
    x, y = _data()
    with pytest.raises(ValueError, match="no batches in epoch 1"):
        _fit(_net(), [])
    with pytest.raises(ValueError, match="no batches in epoch 2: .* spent by an earlier pass"):
        _fit(_net(), iter([(x, y)]), 2)
    with pytest.raises(ValueError, match="pass n_data"):
        train.train(_net(), [(x, y)], 1, progress=False)


@pytest.mark.parametrize(
    "batch, error, message",
    [
        (lambda x, y: (x.double(), y), TypeError, r"epoch 1, step 1: the inputs are torch.float64 but the model's parameters are torch.float32"),
        (lambda x, y: (x, y.float()), TypeError, "labels must be integer class indices, got torch.float32"),
        (lambda x, y: (x, y[:, None]), ValueError, r"labels have shape \(48, 1\) but .* shape \(48,\)"),
        (lambda x, y: (x, y + 1), ValueError, r"labels must lie in \[0, 2\] for the model's 3 outputs, got labels from 1 to 3"),
        (lambda x, y: (x, y - 1), ValueError, r"labels must lie in \[0, 2\] .* from -1 to 1"),
        (lambda x, y: (x[:0], y[:0]), ValueError, "an empty batch"),
        (lambda x, y: (x,), TypeError, "a pair \\(x, y\\) of tensors"),
    ],
)
def test_bad_batches_are_clear_errors(batch, error, message):
    x, y = _data()
    with pytest.raises(error, match=message):
        _fit(_net(), [batch(x, y)])


def test_integer_labels_of_any_dtype_train_as_int64():
    x, y = _data()
    a, b = _net(), _net()
    torch.manual_seed(5)
    _fit(a, [(x, y.to(torch.int32))])
    torch.manual_seed(5)
    _fit(b, [(x, y)])
    _assert_same_parameters(a, b)


def test_n_data_defaults_to_the_whole_data_set():
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=48)
    assert train._count(loader) == train._count(_batches(x, y)) == 48
    # The default equals passing N: the KL weight 1/N is the same.
    a, b = _net(), _net()
    torch.manual_seed(5)
    train.train(a, loader, 1, progress=False)
    torch.manual_seed(5)
    train.train(b, loader, 1, n_data=48, progress=False)
    _assert_same_parameters(a, b)


def test_state_files_of_another_model_or_kind_are_clear_errors(tmp_path):
    x, y = _data()
    state = tmp_path / "s.pt"
    _fit(_net(), [(x, y)], 2, state_path=state)
    saved = state.read_bytes()
    torch.manual_seed(0)
    other = models.to_bayesian(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), "nj")
    with pytest.raises(ValueError, match=r"s.pt is the training state of another model \(shapes differ"):
        _fit(other, [(x, y)], 3, state_path=state)
    plain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="training state of another model .*missing: 0.weight"):
        _fit(plain, [(x, y)], 3, state_path=state)
    with pytest.raises(ValueError, match=r"holds 2 trained epochs, more than epochs=1: pass epochs >= 2"):
        _fit(_net(), [(x, y)], 1, state_path=state)
    assert state.read_bytes() == saved
    checkpoint = tmp_path / "c.pt"
    train.save_checkpoint(checkpoint, models.lenet_300_100("nj"), "lenet_300_100", "nj")
    with pytest.raises(ValueError, match="c.pt is not a training state written by bclib.train.train"):
        _fit(_net(), [(x, y)], 1, state_path=checkpoint)


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    x, y = _data()
    straight, resumed = _net(), _net()
    torch.manual_seed(3)
    _fit(straight, _batches(x, y), 2, kl_warmup=2)
    torch.manual_seed(3)
    _fit(resumed, _batches(x, y), 1, kl_warmup=2, state_path=tmp_path / "s.pt")
    torch.manual_seed(99)  # the saved random state, not this one, drives the second epoch
    resumed = _net()
    _fit(resumed, _batches(x, y), 2, kl_warmup=2, state_path=tmp_path / "s.pt")
    _assert_same_parameters(resumed, straight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the GPU's random state must be saved and restored")
def test_resumed_cuda_run_equals_an_uninterrupted_one(tmp_path):
    x, y = (t.cuda() for t in _data())

    def run(epochs: int, state=None, seed: int = 3) -> nn.Module:
        net = _net().cuda()
        torch.manual_seed(seed)  # seeds the CUDA generators too; the noise is drawn on the GPU
        _fit(net, _batches(x, y), epochs, state_path=state)
        return net

    straight = run(2)
    run(1, tmp_path / "s.pt")
    assert "cuda_rng" in torch.load(tmp_path / "s.pt", weights_only=True)
    _assert_same_parameters(run(2, tmp_path / "s.pt", seed=99), straight)
