"""The runs of ``python -m bclib.reproduce`` read back, checked and set beside the paper.

A run is ``<arch>-<prior>.json`` (settings, errors, thresholds and the error-compression
trade-off, one point per threshold budget) with its float16 posterior ``<arch>-<prior>.pt``.
This module loads both and checks that they agree (:func:`load_run`), writes the kept groups
as the paper does (:func:`kept_groups`), counts the weights a list of kept groups leaves
(:func:`weights_of_kept_groups`, which gives the paper's LeNet-300-100 pruning rates from its
architectures), gathers a run's training seeds (:func:`seed_runs`), finds a run's
error-compression front and the point nearest the paper's error (:func:`front`,
:func:`nearest_to_paper`) and builds the Markdown tables of ``reproduce`` and
the book, among them the fine-tuned levels of ``reproduce --finetune`` (:func:`finetuned_table`,
:func:`best_within`). The published figures come from :mod:`bclib.paper`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from . import compression, models
from .config import results_dir
from .paper import PAPER, PRIOR_NAMES
from .train import load_checkpoint

Result = dict[str, Any]  # one run's JSON, or one point of its "tradeoff" (with "arch" added)

MNIST_RUNS = [(a, p) for a in ("lenet_300_100", "lenet5_caffe") for p in ("nj", "hs")]
NET_NAMES = {"lenet_300_100": "LeNet-300-100", "lenet5_caffe": "LeNet-5-Caffe", "vgg_cifar10": "VGG-like"}
# The paper's rows recalled but not found in a source (../shared/reference/paper.md: [unsure]).
RECALLED = {("lenet_300_100", "nj"), ("lenet_300_100", "hs")}


class RunMismatch(ValueError):
    """A run's JSON records other compression numbers than its checkpoint gives."""


@dataclass
class Run:
    """One shipped run: its JSON (``result``), the Bayesian network and the checkpoint's metadata."""

    result: Result
    model: nn.Module
    meta: dict[str, Any]

    @property
    def key(self) -> str:
        return run_key(self.result["arch"], self.result["prior"])


def run_key(arch: str, prior: str) -> str:
    """The file stem of a run: ``<arch>-<prior>``."""
    return f"{arch}-{prior}"


def _point_mismatch(model: nn.Module, point: Result) -> Optional[str]:
    """What differs between a recorded point and ``compression_report`` at its thresholds, if anything."""
    report = compression.compression_report(model, point["thresholds"]).as_dict()
    for field in ("architecture", "weights_kept", "bits"):
        if report[field] != point[field]:
            return f"{field} {point[field]} recorded, {report[field]} recomputed"
    if not math.isclose(report["rate_precision"], point["rate_precision"], rel_tol=1e-6):
        return f"rate_precision {point['rate_precision']:.6g} recorded, {report['rate_precision']:.6g} recomputed"
    return None


def check_run(model: nn.Module, result: Result) -> None:
    """Raise :class:`RunMismatch` unless every point of ``result`` (the headline and each budget
    of the trade-off) has the kept architecture, weights, bits and precision rate that
    ``compression_report`` computes from ``model`` at the point's thresholds."""
    points = [("headline", result)] + [(f"budget {p['max_drop']}", p) for p in result.get("tradeoff", [])]
    for name, point in points:
        why = _point_mismatch(model, point)
        if why is not None:
            key = run_key(result["arch"], result["prior"])
            raise RunMismatch(f"{key}.json ({name}) disagrees with {key}.pt: {why}. The JSON was written by "
                              f"another version of bclib: run `python -m bclib.reproduce --recompress "
                              f"--only {key}` to write it again")  # fmt: skip


def load_run(arch: str, prior: str, directory: Optional[Path] = None, check: bool = True) -> Run:
    """Load ``<arch>-<prior>.json`` and ``.pt`` from ``directory`` (default :func:`results_dir`).

    With ``check``, :func:`check_run` must pass. Raises ``FileNotFoundError`` naming the
    missing file and the command that makes it.
    """
    directory = results_dir() if directory is None else Path(directory)
    key = run_key(arch, prior)
    for path in (directory / f"{key}.json", directory / f"{key}.pt"):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: `python -m bclib.reproduce --only {key}` makes it "
                                    "(or point BCLIB_RESULTS at a folder of runs)")  # fmt: skip
    result = json.loads((directory / f"{key}.json").read_text())
    model, meta = load_checkpoint(directory / f"{key}.pt")
    if (meta["arch"], meta["prior"]) != (arch, prior):
        raise RunMismatch(f"{key}.pt holds {run_key(meta['arch'], meta['prior'])}, not {key}")
    if check:
        check_run(model, result)
    return Run(result, model, meta)


def load_runs(runs: Sequence[tuple[str, str]] = MNIST_RUNS, directory: Optional[Path] = None,
              check: bool = True) -> tuple[dict[str, Run], list[str]]:
    """The runs of ``runs`` found in ``directory``, by key, and a message for each one missing."""
    found, missing = {}, []
    for arch, prior in runs:
        try:
            found[run_key(arch, prior)] = load_run(arch, prior, directory, check)
        except FileNotFoundError as err:
            missing.append(str(err))
    return found, missing


def seed_runs(arch: str, prior: str, directory: Optional[Path] = None) -> dict[int, Result]:
    """The results of ``<arch>-<prior>`` by training seed: the run in ``directory`` (default
    :func:`results_dir`) and those in its ``seeds/seed<S>`` folders (``reproduce --seed S --out
    ...``) that hold this run, each checked against its checkpoint by :func:`load_run`."""
    directory = results_dir() if directory is None else Path(directory)
    key, found = run_key(arch, prior), {}
    for folder in [directory] + sorted((directory / "seeds").glob("seed*")):
        if (folder / f"{key}.json").is_file():
            r = load_run(arch, prior, folder).result
            if folder != directory and folder.name != f"seed{r['seed']}":
                raise ValueError(f"{folder / key}.json was trained with seed {r['seed']}, not the one its folder names")
            found[r["seed"]] = r
    return found


@lru_cache(maxsize=None)
def _weighted_layers(arch: str) -> tuple[nn.Module, ...]:
    """The plain net's linear and conv layers, in the order of a report's ``architecture``."""
    kinds = (nn.Linear, nn.modules.conv._ConvNd)
    return tuple(m for m in models.build(arch, None).modules() if isinstance(m, kinds))


def _is_conv(arch: str) -> tuple[bool, ...]:
    return tuple(isinstance(m, nn.modules.conv._ConvNd) for m in _weighted_layers(arch))


def kept_groups(result: Result) -> str:
    """Kept groups as the paper lists them: filters (outputs) of conv layers, inputs of fc layers."""
    arch = result["architecture"]
    return "-".join(str(a[1] if conv else a[0]) for conv, a in zip(_is_conv(result["arch"]), arch))


def weights_of_kept_groups(arch: str, groups: str | Sequence[int]) -> int:
    """Weights left in ``arch`` (a chain of layers, as the LeNets) when it keeps ``groups``.

    ``groups`` as :func:`kept_groups` writes them ("8-13-88-13"): a conv layer keeps that many
    filters and reads the kept filters of the layer before; a fc layer keeps that many inputs
    and writes the inputs kept by the next fc layer (the last one all its outputs).
    """
    counts = [int(g) for g in groups.split("-")] if isinstance(groups, str) else [int(g) for g in groups]
    layers = _weighted_layers(arch)
    if len(counts) != len(layers):
        raise ValueError(f"{arch} has {len(layers)} weighted layers, got {len(counts)} kept groups {groups!r}")
    total, conv_in = 0, None
    for i, (m, k) in enumerate(zip(layers, counts)):
        if isinstance(m, nn.modules.conv._ConvNd):
            c_in = m.in_channels if conv_in is None else conv_in
            total += c_in * k * math.prod(m.kernel_size)
            conv_in = k
        else:
            last = i + 1 == len(layers)
            total += k * (m.out_features if last else counts[i + 1])
    return total


def paper_pruning_rate(arch: str, prior: str) -> tuple[Optional[float], bool]:
    """The paper's pruning rate and whether it is derived: published if given, else the weights
    before over those its architecture keeps (:func:`weights_of_kept_groups`); ``None`` without one."""
    p = PAPER[(arch, prior)]
    if p["rate_pruning"] is not None:
        return float(p["rate_pruning"]), False
    if p["architecture"] is None:
        return None, False
    before = sum(m.weight.numel() for m in _weighted_layers(arch))
    return before / weights_of_kept_groups(arch, p["architecture"]), True


def dominates(a: Result, b: Result) -> bool:
    """``a`` is at most ``b``'s test error and at least its precision rate, and better in one."""
    no_worse = a["error_compressed"] <= b["error_compressed"] and a["rate_precision"] >= b["rate_precision"]
    better = a["error_compressed"] < b["error_compressed"] or a["rate_precision"] > b["rate_precision"]
    return no_worse and better


def front(points: Sequence[Result]) -> list[Result]:
    """The points no other point dominates (error against precision rate), by rising rate."""
    kept = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(kept, key=lambda p: p["rate_precision"])


def nearest_to_paper(result: Result) -> Result:
    """The trade-off point whose test error is nearest the paper's (ties: the higher rate),
    with ``arch`` added so :func:`kept_groups` reads it."""
    target = PAPER[(result["arch"], result["prior"])]["error"]
    points = result.get("tradeoff") or [result]
    best = min(points, key=lambda p: (abs(p["error_compressed"] - target), -p["rate_precision"]))
    return dict(best, arch=result["arch"])


def _fmt(v: float | str | None) -> str:
    """A paper figure for the table: numbers as ``%g``, ``n/a`` where the paper gives none."""
    return "n/a" if v is None else v if isinstance(v, str) else f"{v:g}"


def table(results: list[Result]) -> str:
    """Markdown table: our runs beside the paper's published figures, then the paper's rows not run here."""
    rows = ["| network | method | error % (ours / paper) | pruning rate (ours / paper) | "
            "precision rate (ours / paper) | kept architecture (ours / paper) | bits (exp, sig) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        p = PAPER[(r["arch"], r["prior"])]
        bits = " ".join(f"({b[0]},{b[1]})" for b in r["bits"])
        rows.append(
            f"| {r['arch']} | {PRIOR_NAMES[r['prior']]} | {r['error_compressed']:.2f} / {_fmt(p['error'])} | "
            f"{r['rate_pruning']:.0f} / {_fmt(p['rate_pruning'])} | {r['rate_precision']:.0f} / "
            f"{_fmt(p['rate_precision'])} | {kept_groups(r)} / {_fmt(p['architecture'])} | {bits} |"
        )
    done = {(r["arch"], r["prior"]) for r in results}
    for (arch, prior), p in PAPER.items():
        if (arch, prior) not in done:
            rows.append(f"| {arch} | {PRIOR_NAMES[prior]} | not run here / {_fmt(p['error'])} | "
                        f"– / {_fmt(p['rate_pruning'])} | – / {_fmt(p['rate_precision'])} | "
                        f"– / {_fmt(p['architecture'])} | |")  # fmt: skip
    return "\n".join(rows) + "\n"


def tradeoff_table(results: list[Result]) -> str:
    """Markdown table: each run compressed under every threshold budget it records."""
    rows = ["| network | method | budget (points of held-out accuracy) | error % | pruning rate | "
            "precision rate | kept architecture |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        for p in r.get("tradeoff", []):  # JSONs from before the trade-off have none
            rows.append(
                f"| {r['arch']} | {PRIOR_NAMES[r['prior']]} | {100 * p['max_drop']:.1f} | "
                f"{p['error_compressed']:.2f} | {p['rate_pruning']:.0f} | {p['rate_precision']:.0f} | "
                f"{kept_groups(dict(p, arch=r['arch']))} |"
            )
    return "\n".join(rows) + "\n"


def matched_table(results: list[Result]) -> str:
    """Markdown table for the book: each run's point nearest the paper's error beside the paper.

    ``?`` marks the paper's recalled rows, ``(derived)`` a pruning rate computed from the
    paper's architecture; the budget column says which threshold budget gave the point.
    """
    rows = ["| network | method | budget (points) | error % (ours / paper) | pruning rate (ours / paper) | "
            "precision rate (ours / paper) | kept groups (ours / paper) | bits per layer (ours) |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        arch, prior = r["arch"], r["prior"]
        p, q = PAPER[(arch, prior)], nearest_to_paper(r)
        mark = "?" if (arch, prior) in RECALLED else ""
        rate, derived = paper_pruning_rate(arch, prior)
        paper_rate = "–" if rate is None else f"{rate:.1f}{mark} (derived)" if derived else f"{rate:g}{mark}"
        bits = " ".join(f"1+{e}+{s}" for e, s in q["bits"])
        rows.append(
            f"| {NET_NAMES[arch]} | {PRIOR_NAMES[prior]} | {100 * q['max_drop']:.1f} | "
            f"{q['error_compressed']:.2f} / {p['error']:.1f}{mark} | {q['rate_pruning']:.1f} / {paper_rate} | "
            f"{q['rate_precision']:.1f} / {p['rate_precision']:g}{mark} | "
            f"{kept_groups(q)} / {p['architecture']}{mark} | {bits} |"
        )
    return "\n".join(rows) + "\n"


def best_within(points: Sequence[Result], error: float) -> Optional[Result]:
    """The point of most compression after precision reduction among those with a test error
    (after precision reduction) at most ``error`` (to 1e-9: 1.00 % of the test set may be
    computed as 1.0000000000000009); ``None`` if there is none."""
    within = [p for p in points if p["error_compressed"] <= error + 1e-9]
    return max(within, key=lambda p: (p["rate_precision"], -p["error_compressed"])) if within else None


def _level_budget(q: Result) -> str:
    """A fine-tuning level's budget in points; ``1.0, then 0.25`` for a second-round level."""
    return f"{100 * q['first_round']:.1f}, then {100 * q['max_drop']:.2g}" if "first_round" in q else \
        f"{100 * q['max_drop']:.1f}"


def finetuned_table(results: list[Result]) -> str:
    """Markdown tables of fine-tuning after pruning (``reproduce --finetune``, :mod:`bclib.finetune`).

    First, per run, the shipped point nearest the paper's error, the fine-tuned level nearest it
    and the fine-tuned level of most compression at or below it, beside the paper, the headline
    marked (the latter, or the former where none is at or below); then every level (a
    second-round level: the first round's budget, then its own): before and after fine-tuning.
    """
    rows = ["| network | method | point | budget (points) | error % | pruning rate | precision rate | "
            "kept groups | bits per layer | paper (error % / pruning / precision) |",
            "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    levels = ["| run | budget (points) | before fine-tuning: error %, pruning, precision | after: error %, pruning, "
              "precision | held-out error % before / after | kept groups after | epochs | seconds | "
              "error % with other fine-tuning seeds |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        arch, prior, ft = r["arch"], r["prior"], r["finetuned"]
        p = PAPER[(arch, prior)]
        name = f"{NET_NAMES[arch]} | {PRIOR_NAMES[prior]}"
        paper = f"{p['error']:g} / {_fmt(p['rate_pruning'])} / {p['rate_precision']:g}"
        head = _level_budget(ft["points"][ft["headline"]])
        picks = [("shipped", nearest_to_paper(r)),
                 ("fine-tuned, nearest", nearest_to_paper({**r, "tradeoff": ft["points"]})),
                 (f"fine-tuned, most at <= {p['error']:g} %", best_within(ft["points"], p["error"]))]
        for label, q in picks:
            if q is None:
                rows.append(f"| {name} | {label} | – | none | – | – | – | – | {paper} |")
                continue
            label += " (headline)" if label != "shipped" and _level_budget(q) == head else ""
            bits = " ".join(f"1+{e}+{s}" for e, s in q["bits"])
            rows.append(f"| {name} | {label} | {_level_budget(q)} | {q['error_compressed']:.2f} | "
                        f"{q['rate_pruning']:.1f} | {q['rate_precision']:.1f} | {kept_groups(dict(q, arch=arch))} | "
                        f"{bits} | {paper} |")  # fmt: skip
        for q in ft["points"]:
            b = q["before"]
            levels.append(f"| {NET_NAMES[arch]} {PRIOR_NAMES[prior]} | {_level_budget(q)} | "
                          f"{b['error_compressed']:.2f}, {b['rate_pruning']:.1f}x, {b['rate_precision']:.0f}x | "
                          f"{q['error_compressed']:.2f}, {q['rate_pruning']:.1f}x, {q['rate_precision']:.0f}x | "
                          f"{q['held_out_error_before']:.2f} / {q['held_out_error_compressed']:.2f} | "
                          f"{kept_groups(dict(q, arch=arch))} | {q['epochs']} | {q['train_seconds']:.0f} | "
                          f"{_seed_errors(q)} |")  # fmt: skip
    return "\n".join(rows) + "\n\n" + "\n".join(levels) + "\n"


def _seed_errors(q: Result) -> str:
    """``"2: 1.75, 3: 1.71"``: a level's test errors with the other seeds it was fine-tuned with (– if none)."""
    return ", ".join(f"{o['seed']}: {o['error_compressed']:.2f}" for o in q.get("other_seeds", [])) or "–"


# Issue 16's goals, (coded bytes, test error %) per network; MIRACLE codes LeNet-5 in about 1.52 kB at 0.96 %.
BYTES_GOALS = {"lenet_300_100": (5000, 1.8), "lenet5_caffe": (1500, 1.0)}


def _goal_cell(arch: str, p: dict[str, Any]) -> str:
    """Whether a coded file meets the bytes goal of its network (``BYTES_GOALS``), with the goal."""
    if arch not in BYTES_GOALS:
        return "–"
    goal_bytes, goal_error = BYTES_GOALS[arch]
    met = p["coded_bytes"] <= goal_bytes and p["error"] <= goal_error + 1e-9
    return f"{'met' if met else 'missed'} ({goal_bytes:,} at {goal_error:g} %)"


def _row_label(r: Result, section: str, i: int, headlines: bool) -> Optional[str]:
    """The run's name for point ``i`` of its ``section``, its marks in brackets ("headline",
    "held"); with ``headlines`` only the marked points have a row (None for the rest) and the
    headline's mark goes without saying."""
    s = r[section]
    marks = [m for m, j in (("headline", s["headline"]), ("held", s.get("held"))) if i == j]
    if headlines and not marks:
        return None
    marks = [m for m in marks if not (headlines and m == "headline")]
    return f"{NET_NAMES[r['arch']]} {PRIOR_NAMES[r['prior']]}" + (f" ({', '.join(marks)})" if marks else "")


def _seeds_cell(p: dict[str, Any]) -> str:
    """The test errors of a point trained again with other seeds (a headline, or a point tried for
    the held one; empty for the rest)."""
    return " ".join(f"{o['error']:.2f}" for o in p.get("other_seeds", []))


def quantized_table(results: list[Result], headlines: bool = False) -> str:
    """Markdown: bits fitted to the data (``reproduce --quantize``, :mod:`bclib.quantize`), every
    fine-tuned level and budget of every run, the headline marked (``headlines``: the headline
    alone), beside the KL of the level's posterior and the bytes goal; for the headline also the
    test errors of its budget under other training seeds."""
    rows = ["| run | fine-tuned level: budget, pruning | budget (points) | test error % | held-out error % | "
            "coded bytes | bit-packed bytes | KL bytes | precision rate | bits per layer | goal | "
            "other seeds: error % |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        q = r["quantized"]
        for i, p in enumerate(q["points"]):
            label = _row_label(r, "quantized", i, headlines)
            if label is None:
                continue
            bits = " ".join(f"1+{e}+{s}" for e, s in p["bits"])
            seeds, goal = _seeds_cell(p), _goal_cell(r["arch"], p)
            level = _level_budget(p["finetuned_level"])
            rows.append(f"| {label} | {level}, {p['rate_pruning']:.1f}x | {100 * p['max_drop']:.1f} | {p['error']:.2f} | "
                        f"{p['held_out_error']:.2f} | **{p['coded_bytes']:,}** | {p['bitpacked_bytes']:,} | "
                        f"{p['kl_bytes']:,.0f} | {p['rate_precision']:.0f} | {bits} | {goal} | {seeds} |")  # fmt: skip
    return "\n".join(rows) + "\n"


def grid_table(results: list[Result], headlines: bool = False) -> str:
    """Markdown: uniform grids (``reproduce --grid``, :mod:`bclib.uniform_grid`) on each run's
    fine-tuned levels, every budget, the headline and the held point marked (``headlines``: those
    two alone, the held one marked), beside the fitted bits' file of the same level and budget
    (``reproduce --quantize``), the KL and the bytes goal; for the points trained again (the
    headline, and those tried for the held point) the test errors under other training seeds."""
    rows = ["| run | fine-tuned level: budget, pruning | budget (points) | test error % | held-out error % | "
            "coded bytes | fitted bits, same level and budget | KL bytes | goal | other seeds: error % |",
            "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        g = r["grid"]
        fitted = {(p["level"], p["max_drop"]): p for p in r.get("quantized", {}).get("points", [])}
        for i, p in enumerate(g["points"]):
            label = _row_label(r, "grid", i, headlines)
            if label is None:
                continue
            f = fitted.get((p["level"], p["max_drop"]))
            beside = f"{f['coded_bytes']:,} at {f['error']:.2f} %" if f else "–"
            seeds, goal = _seeds_cell(p), _goal_cell(r["arch"], p)
            rows.append(f"| {label} | "
                        f"{_level_budget(p['finetuned_level'])}, {p['rate_pruning']:.1f}x | {100 * p['max_drop']:.1f} | "
                        f"{p['error']:.2f} | {p['held_out_error']:.2f} | **{p['coded_bytes']:,}** | {beside} | "
                        f"{p['kl_bytes']:,.0f} | {goal} | {seeds} |")  # fmt: skip
    return "\n".join(rows) + "\n"
