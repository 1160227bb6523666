"""Baselines: what the Bayesian training and the pruning statistic buy.

The paper prunes the groups of a trained posterior whose ``log alpha`` (sec. 4) exceeds a
per-layer threshold; bclib searches those thresholds on held-out data
(:func:`bclib.compression.search_thresholds`). Each baseline changes one of the two parts:

- ``norm``: the same posterior and the same search, but groups ranked by the norm of their
  posterior-mean weights ``||E[w_g]||_2`` (a small norm is prunable) instead of ``log alpha``;
- ``plain``: the same search and ranking by norm on the plain pretrained net the Bayesian
  one started from (no variational training at all; pruning only, as its variances mean nothing);
- ``fixed``: the posterior's ``log alpha`` with one threshold fixed in advance for every
  layer, without search.

A ranking is swapped in by :func:`ranked_by`: a copy of the model whose ``log_alpha`` is the
new statistic, so every compression function works on it unchanged.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from . import compression
from .compression import EmptyLayerError, quantized
from .convert import bayesian_layers, to_bayesian
from .layers import BayesianGroupLayer
from .paper import PAPER, PRIOR_NAMES
from .results import NET_NAMES
from .train import evaluate

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
FIXED_THRESHOLDS = (-4.0, -3.0, -2.0, -1.0, 0.0)  # log alpha, the same for every layer


class _Ranked(nn.Module):
    """A scale posterior whose pruning statistic ``log_alpha`` is replaced by ``statistic``."""

    def __init__(self, scale: nn.Module, statistic: torch.Tensor) -> None:
        super().__init__()
        self.inner = scale
        self.register_buffer("statistic", statistic.detach().clone())

    @property
    def mean(self) -> torch.Tensor:
        return self.inner.mean

    @property
    def variance(self) -> torch.Tensor:
        return self.inner.variance

    @property
    def log_alpha(self) -> torch.Tensor:
        return self.statistic


@torch.no_grad()
def ranked_by(model: nn.Module, statistic: Callable[[BayesianGroupLayer], torch.Tensor]) -> nn.Module:
    """A copy of ``model`` (for evaluation only) whose group layers are ranked by ``statistic(layer)``.

    ``statistic`` gives one value per group, larger meaning more prunable (like ``log alpha``).
    """
    ranked = copy.deepcopy(model).eval()
    for layer in bayesian_layers(ranked):
        s = statistic(layer)
        if s.shape != (layer.num_groups,):
            raise ValueError(f"statistic must give one value per group, shape ({layer.num_groups},), got {tuple(s.shape)}")
        layer.scale = _Ranked(layer.scale, s)
    return ranked


def neg_log_group_norm(layer: BayesianGroupLayer) -> torch.Tensor:
    """``-log ||E[w_g]||_2`` per group ``g`` (input neuron or filter): large for small groups."""
    w = layer.posterior_weight_mean().detach().transpose(0, layer.group_dim).flatten(1)
    return -torch.log(w.norm(dim=1) + 1e-12)


def plain_as_group_net(plain: nn.Module) -> nn.Module:
    """The plain net as normal-Jeffreys group layers with ``E[z] = 1`` exactly: its posterior mean is the plain net."""
    net = to_bayesian(copy.deepcopy(plain), "nj")
    for layer in bayesian_layers(net):
        layer.scale.z_mu.data.fill_(1.0)
    return net.eval()


def point(model: nn.Module, thresholds: Sequence[float], test: Batches, example_input: torch.Tensor,
          **fields: Any) -> dict[str, Any]:  # fmt: skip
    """Prune ``model`` at ``thresholds``, round to the bit precision, and report both test errors (%)."""
    report = compression.compression_report(model, thresholds, example_input)
    pruned = compression.prune(model, thresholds, example_input)
    return {**fields, "thresholds": list(thresholds), **report.as_dict(),
            "error_pruned": 100 * (1 - evaluate(pruned, test)),
            "error_compressed": 100 * (1 - evaluate(quantized(pruned, report.bits), test))}  # fmt: skip


def searched(model: nn.Module, budgets: Sequence[float], held_out: Batches, test: Batches,
             example_input: torch.Tensor) -> list[dict[str, Any]]:  # fmt: skip
    """One :func:`point` per accuracy budget, thresholds from the search on ``held_out``."""
    out = []
    for max_drop in budgets:
        t = compression.search_thresholds(model, lambda net: evaluate(net, held_out), max_drop=max_drop,
                                          example_input=example_input)  # fmt: skip
        out.append(point(model, t, test, example_input, max_drop=max_drop))
    return out


def fixed(model: nn.Module, test: Batches, example_input: torch.Tensor,
          values: Sequence[float] = FIXED_THRESHOLDS) -> list[dict[str, Any]]:  # fmt: skip
    """One :func:`point` per fixed threshold (the same for every layer); values that empty a layer are left out."""
    n = len(bayesian_layers(model))
    out = []
    for v in values:
        try:
            out.append(point(model, [v] * n, test, example_input, fixed_threshold=v))
        except EmptyLayerError:
            continue
    return out


def all_baselines(bayes: nn.Module, plain: nn.Module, budgets: Sequence[float], held_out: Batches,
                  test: Batches, example_input: torch.Tensor) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """The three baselines of a run: ``{"error_plain": %, "norm": [...], "plain": [...], "fixed": [...]}``.

    ``plain`` points keep only the pruning fields (``rate_pruning``, ``architecture``,
    ``error_pruned``): the plain net has no posterior variances to set a bit precision from.
    """
    plain_points = searched(ranked_by(plain_as_group_net(plain), neg_log_group_norm), budgets, held_out, test,
                            example_input)  # fmt: skip
    keep = ("max_drop", "thresholds", "architecture", "weights_before", "weights_kept", "rate_pruning", "error_pruned")
    return {
        "error_plain": 100 * (1 - evaluate(plain, test)),
        "norm": searched(ranked_by(bayes, neg_log_group_norm), budgets, held_out, test, example_input),
        "plain": [{k: p[k] for k in keep} for p in plain_points],
        "fixed": fixed(bayes, test, example_input),
    }


METHODS = {  # key in a run's JSON -> what it is, for tables
    "log_alpha": "log α, searched (the paper's statistic)",
    "norm": "‖E[w]‖, searched (same posterior)",
    "fixed": "log α, one fixed threshold",
    "plain": "‖w‖ of the plain net, searched",
}


def nearest(points: Sequence[dict[str, Any]], error: float) -> dict[str, Any]:
    """The point whose test error (after precision reduction, or after pruning where a point has
    none) is nearest ``error``; ties go to the higher pruning rate."""
    err = lambda p: p.get("error_compressed", p["error_pruned"])  # noqa: E731
    return min(points, key=lambda p: (abs(err(p) - error), -p["rate_pruning"]))


def table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one row per method of :data:`METHODS`, one column per run (a reproduce
    JSON with ``baselines``); each cell is the method's point nearest the paper's test error:
    error %, pruning rate, precision rate, and the budget or fixed threshold that gave it."""
    for r in results:
        if "baselines" not in r:
            raise ValueError(f"{r['arch']}-{r['prior']} has no baselines: run python -m bclib.reproduce --baselines")
    head = [f"{NET_NAMES[r['arch']]} {PRIOR_NAMES[r['prior']]}" for r in results]
    rows = ["| groups chosen by | " + " | ".join(head) + " |", "|---|" + "---|" * len(results)]
    for key, name in METHODS.items():
        cells = []
        for r in results:
            target = PAPER[(r["arch"], r["prior"])]["error"]
            p = nearest(r["tradeoff"] if key == "log_alpha" else r["baselines"][key], target)
            setting = f"t = {p['fixed_threshold']:g}" if key == "fixed" else f"budget {100 * p['max_drop']:.1f}"
            precision = f", {p['rate_precision']:.0f}x" if "rate_precision" in p else ""
            cells.append(f"{p.get('error_compressed', p['error_pruned']):.2f} %, {p['rate_pruning']:.1f}x"
                         f"{precision} ({setting})")  # fmt: skip
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
