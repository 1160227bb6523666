"""Training on several processes: TensorBatches' shards, and two gloo processes checked against one process."""
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from bclib import data, distributed, models, train

N, BATCH, WORLD, EPOCHS, LR = 64, 8, 2, 2, 1e-2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return models.to_bayesian(nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4)), "nj")


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 10, generator=g), torch.randint(0, 4, (N,), generator=g)


def _batches(batch_size: int, **kw) -> data.TensorBatches:
    x, y = _data()
    return data.TensorBatches(x, y, batch_size, shuffle=True, generator=torch.Generator().manual_seed(5), **kw)


@contextmanager
def _no_noise():
    """The group layers' noise (``torch.randn``) set to zero, so that one process can equal two exactly:
    with noise each rank draws its own, which no single process reproduces."""
    randn = torch.randn
    torch.randn = lambda *size, generator=None, **kw: torch.zeros(*size, **kw)
    try:
        yield
    finally:
        torch.randn = randn


def _worker(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks, set up as torchrun would; writes what it trained to ``out/rank<r>.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))  # fmt: skip
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    assert distributed.init_from_env() and distributed.world_size() == WORLD and distributed.rank() == rank
    try:
        net = _model()
        with _no_noise():  # n_data left to its default: the whole set, not the shard
            history = train.train(distributed.wrap(net), _batches(BATCH), EPOCHS, lr=LR,
                                  state_path=Path(out) / "ddp.state.pt", progress=False)  # fmt: skip
        # With noise, drawn per rank: 1 epoch + 1 resumed from the state file equal 2 in one run.
        straight = _model()
        torch.manual_seed(10 + rank)
        train.train(distributed.wrap(straight), _batches(BATCH), 2, lr=LR, progress=False)
        for epochs, seed in ((1, 10 + rank), (2, 99)):
            resumed = _model()
            torch.manual_seed(seed)  # the second run resumes each rank's own saved random state instead
            train.train(distributed.wrap(resumed), _batches(BATCH), epochs, lr=LR,
                        state_path=Path(out) / "resume.state.pt", progress=False)  # fmt: skip
        # A NaN that only one rank's shard holds stops both ranks at the same step (none hangs in backward).
        x, y = _data()
        x[7, 3] = float("nan")
        poisoned = data.TensorBatches(x, y, BATCH, shuffle=True, generator=torch.Generator().manual_seed(5))
        try:
            train.train(distributed.wrap(_model()), poisoned, 1, lr=LR, progress=False)
            stopped = None
        except train.NonFiniteLossError as err:
            stopped = [err.epoch, err.step, str(err)]
        torch.save({"net": net.state_dict(), "history": history, "straight": straight.state_dict(),
                    "resumed": resumed.state_dict(), "stopped": stopped}, Path(out) / f"rank{rank}.pt")  # fmt: skip
    finally:
        distributed.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_two(out: Path, limit_s: float = 120.0) -> None:
    """Run :func:`_worker` on two processes; fail (and end them) after ``limit_s`` seconds."""
    ctx = mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the two gloo processes did not finish within {limit_s:.0f} s")


def _single_process(n_data: int) -> tuple[nn.Module, list[dict[str, float]]]:
    """The oracle: one process over the same global batches (``BATCH * WORLD`` examples of the same permutation)."""
    net = _model()
    with _no_noise():
        history = train.train(net, _batches(BATCH * WORLD), EPOCHS, n_data=n_data, lr=LR, progress=False)
    return net, history


def test_two_gloo_processes_equal_one_process_over_the_global_batch(tmp_path):
    _spawn_two(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    oracle, oracle_history = _single_process(n_data=N)
    for name, p in oracle.state_dict().items():
        for r in ranks:
            torch.testing.assert_close(r["net"][name], p, atol=1e-6, rtol=0, msg=name)
    for got, want in zip(ranks[0]["history"], oracle_history):  # the history is global: summed over the ranks
        for key in ("loss", "ce", "kl"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), key
    # n_data defaulted to the whole set: with N of one shard the KL weight doubles and the result moves
    shard_n, _ = _single_process(n_data=N // WORLD)
    assert max((shard_n.state_dict()[k] - v).abs().max().item() for k, v in ranks[0]["net"].items()) > 1e-4
    # rank 0's state file holds the unwrapped network's keys: it loads into a plain model
    plain = _model()
    plain.load_state_dict(torch.load(tmp_path / "ddp.state.pt", weights_only=True)["model"])
    for name, p in plain.state_dict().items():
        assert torch.equal(p, ranks[0]["net"][name]), name
    # resuming restores each rank's random state: equal to the uninterrupted run, and the ranks agree
    for r in ranks:
        for name, p in r["straight"].items():
            assert torch.equal(r["resumed"][name], p), name
            assert torch.equal(ranks[0]["straight"][name], p), name
    stops = [r["stopped"] for r in ranks]
    assert all(stop is not None for stop in stops) and len({(e, s) for e, s, _ in stops}) == 1
    messages = sorted(m for _, _, m in stops)
    assert "the loss is nan" in messages[0] and "inputs hold 1 NaN" in messages[0]
    assert "the loss is not finite on another rank; the error of the rank that met it names" in messages[1]
    state = torch.load(tmp_path / "resume.state.pt", weights_only=True)
    assert len(state["rank_rng"]) == WORLD and not torch.equal(state["rank_rng"][0]["rng"], state["rank_rng"][1]["rng"])


@pytest.mark.parametrize("world", [2, 3])
def test_tensor_batches_shard_the_global_permutation(world):
    n = 62  # not a multiple of 3 * 8: the last global batch is short, and 3 ranks need padding
    index = torch.arange(n)  # each example's label is its index

    def shard(rank: int) -> data.TensorBatches:
        return data.TensorBatches(index.float()[:, None], index, 8, shuffle=True,
                                  generator=torch.Generator().manual_seed(5), rank=rank, world_size=world)  # fmt: skip

    shards = [shard(r) for r in range(world)]
    g = torch.Generator().manual_seed(5)  # the oracle: one process's permutation, padded as DistributedSampler does
    per_rank = -(-n // world)
    for _ in range(2):  # two epochs: each draws a new permutation, the same on every rank
        order = torch.randperm(n, generator=g)
        padded = torch.cat([order, order[: per_rank * world - n]])
        batches = [list(b) for b in shards]
        assert {len(bs) for bs in batches} == {len(shards[0])} == {-(-per_rank // 8)}
        for j in range(len(batches[0])):
            assert len({len(batches[r][j][1]) for r in range(world)}) == 1  # equal shares of every global batch
            got = torch.cat([batches[r][j][1] for r in range(world)])
            assert sorted(got.tolist()) == sorted(padded[j * 8 * world : (j + 1) * 8 * world].tolist())
        shares = [set(torch.cat([y for _, y in bs]).tolist()) for bs in batches]
        assert set().union(*shares) == set(range(n))
        assert sum(map(len, shares)) == n + (world == 3)  # disjoint but for the padding (62 = 3 * 21 - 1)


def test_tensor_batches_without_a_process_group_are_one_rank():
    b = _batches(8)
    assert (b.rank, b.world_size) == (0, 1) and not distributed.is_initialized()
    assert distributed.gather("a") == ["a"] and distributed.is_main()
    ordered = data.TensorBatches(torch.arange(5.0), torch.arange(5), 2, rank=1, world_size=2)
    assert [y.tolist() for _, y in ordered] == [[1, 3], [0]]  # 1::2 of 0 1 2 3 4 0 (padded)
    with pytest.raises(ValueError, match="0 <= rank < world_size, got rank 2 and world_size 2"):
        _batches(8, rank=2, world_size=2)
    with pytest.raises(TypeError, match="world_size must be an int"):
        _batches(8, rank=0, world_size=2.0)


def test_train_refuses_an_unwrapped_model_under_several_processes(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="not in DistributedDataParallel: pass bclib.distributed.wrap"):
        train.train(_model(), _batches(8), 1, progress=False)
