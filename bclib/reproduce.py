"""Reproduce the paper's MNIST table: ``python -m bclib.reproduce [--fast]``.

For each network (LeNet-300-100, LeNet-5-Caffe) and prior (group normal-Jeffreys, group
horseshoe): train a plain net (shared by both priors), start the Bayesian net from it, train
it on the variational objective with a KL warm-up, choose thresholds on held-out data,
prune, round to the chosen bit precision and evaluate, once for each accuracy budget of
``BUDGETS`` (the last gives the headline numbers, all of them the error-compression
trade-off). Every stage is resumable: finished stages are read back from ``--out`` and an
interrupted training resumes at its last epoch; ``--recompress`` redoes only the compression
of finished runs. Each run writes ``<arch>-<prior>.json``; ``table.md`` sets them beside the
paper's figures.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from . import compression, data, models, precision
from .atomic import atomic_write
from .config import default_device, fast_mode, seed_everything
from .train import atomic_save, evaluate, load_checkpoint, save_checkpoint, train

# Paper, Table 1 (error %, compression after pruning, after precision reduction) and the
# pruned architectures; see ../shared/reference/paper.md for the sources.
PAPER = {
    ("lenet5_caffe", "nj"): {"error": 1.0, "rate_pruning": 108, "rate_precision": 361, "architecture": "8-13-88-13"},
    ("lenet5_caffe", "hs"): {"error": 1.0, "rate_pruning": 156, "rate_precision": 419, "architecture": "5-10-76-16"},
    ("lenet_300_100", "nj"): {"error": 1.8, "rate_pruning": None, "rate_precision": 58, "architecture": "278-98-13"},
    ("lenet_300_100", "hs"): {"error": 1.8, "rate_pruning": None, "rate_precision": 59, "architecture": "311-86-14"},
}
PRIOR_NAMES = {"nj": "BC-GNJ", "hs": "BC-GHS"}
VALIDATION = 5000  # last training images, held out for choosing thresholds
# Held-out accuracy (0-1) the threshold search may give up; the last is search_thresholds' default.
BUDGETS = (0.0, 0.001, 0.002, 0.003)


def _settings(arch: str, fast: bool) -> dict[str, int]:
    if fast:
        return {"pre_epochs": 1, "epochs": 2, "warmup": 1, "cooldown": 2, "train_limit": 6000}
    if arch == "lenet_300_100":
        return {"pre_epochs": 20, "epochs": 250, "warmup": 5, "cooldown": 50, "train_limit": 0}
    return {"pre_epochs": 5, "epochs": 350, "warmup": 3, "cooldown": 80, "train_limit": 0}


def _atomic_json(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def _split(limit: int, batch_size: int, seed: int):
    x, y = data.load_mnist(True)
    if limit:
        x, y = x[:limit], y[:limit]
    n_val = min(VALIDATION, len(x) // 10)
    g = torch.Generator().manual_seed(seed)
    train_b = data.TensorBatches(x[:-n_val], y[:-n_val], batch_size, shuffle=True, generator=g)
    val_b = data.TensorBatches(x[-n_val:], y[-n_val:], 1000)
    xt, yt = data.load_mnist(False)
    return train_b, val_b, data.TensorBatches(xt, yt, 1000)


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def quantized(net: torch.nn.Module, bits: list[compression.LayerBits]) -> torch.nn.Module:
    """A copy of a pruned plain net with every layer's weights rounded to its bit widths."""
    net = copy.deepcopy(net)
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))]
    with torch.no_grad():
        for layer, b in zip(layers, bits):
            if layer.weight.numel():
                layer.weight.copy_(precision.round_to_bits(layer.weight, b.exponent, b.significand))
    return net


def _compress_one(bayes: torch.nn.Module, max_drop: float, val_b, test_b) -> tuple[dict[str, Any], torch.nn.Module]:
    """Thresholds within ``max_drop`` on held-out data, then prune and round; returns (numbers, pruned net)."""
    thresholds = compression.search_thresholds(bayes, lambda net: evaluate(net, val_b), max_drop=max_drop)
    report = compression.compression_report(bayes, thresholds)
    pruned = compression.prune(bayes, thresholds)
    point = {"max_drop": max_drop, "thresholds": thresholds, **report.as_dict(),
             "error_pruned": 100 * (1 - evaluate(pruned, test_b)),
             "error_compressed": 100 * (1 - evaluate(quantized(pruned, report.bits), test_b))}  # fmt: skip
    return point, pruned


def _compress_all(bayes: torch.nn.Module, val_b, test_b, pruned_path: Path) -> dict[str, Any]:
    """Compress under every budget: the headline (last budget) fields, the trade-off and the time.

    Saves the headline's pruned plain net to ``pruned_path``.
    """
    t0 = time.perf_counter()
    tradeoff = [_compress_one(bayes, d, val_b, test_b) for d in BUDGETS]
    headline, pruned = tradeoff[-1]
    atomic_save(pruned.cpu(), pruned_path)
    return {**headline, "tradeoff": [point for point, _ in tradeoff], "compress_seconds": time.perf_counter() - t0}


def run(arch: str, prior: str, out: Path, fast: bool, seed: int = 1, batch_size: int = 128,
        epochs: int | None = None) -> dict[str, Any]:
    """One row of the table; returns (and writes) its results.

    ``epochs`` overrides the Bayesian epochs of ``_settings``: with a training state from a
    shorter run in ``out/state`` (and no finished ``<arch>-<prior>.pt``), training goes on from it.
    """
    result_path = out / f"{arch}-{prior}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    s = _settings(arch, fast)
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f"--epochs must be at least 1, got {epochs}")
        s["epochs"] = epochs
    device = default_device()
    train_b, val_b, test_b = _split(s["train_limit"], batch_size, seed)
    train_b.to(device), val_b.to(device), test_b.to(device)
    n_train = len(train_b.x)

    plain_path = out / f"{arch}-plain.pt"
    if plain_path.exists():
        plain, _ = load_checkpoint(plain_path)
        plain = plain.to(device)
    else:
        seed_everything(seed)
        plain = models.build(arch, None).to(device)
        train(plain, train_b, s["pre_epochs"], state_path=out / "state" / f"{arch}-plain.state.pt")
        save_checkpoint(plain_path, plain, arch, None, test_acc=evaluate(plain, test_b), seed=seed, epochs=s["pre_epochs"])
    plain_acc = evaluate(plain, test_b)

    bayes_path = out / f"{arch}-{prior}.pt"
    if not bayes_path.exists():
        seed_everything(seed)
        bayes = models.to_bayesian(plain.cpu(), prior).to(device)
        plain.to(device)
        history = train(bayes, train_b, s["epochs"], n_data=n_train, kl_warmup=s["warmup"],
                        lr_cooldown=s["cooldown"], test_batches=test_b,
                        state_path=out / "state" / f"{arch}-{prior}.state.pt")  # fmt: skip
        save_checkpoint(bayes_path, bayes, arch, prior, half=True, seed=seed, history=history, settings=s)
    # Everything below reads the shipped (float16) checkpoint, so its numbers are the file's.
    bayes, meta = load_checkpoint(bayes_path)
    bayes = bayes.to(device)
    history = meta["history"]
    bayes_acc = evaluate(bayes, test_b)

    result = {
        "arch": arch, "prior": prior, "seed": seed, "fast": fast, **meta.get("settings", s),
        "epochs": len(history),
        "error_plain": 100 * (1 - plain_acc),
        "error_bayes": 100 * (1 - bayes_acc),
        **_compress_all(bayes, val_b, test_b, out / f"{arch}-{prior}-pruned.pt"),
        "train_seconds": sum(h["seconds"] for h in history),
        "device": _describe_device(device),
        "torch": torch.__version__,
    }  # fmt: skip
    _atomic_json(result, result_path)
    return result


def recompress(arch: str, prior: str, out: Path) -> dict[str, Any]:
    """Redo the compression of a finished run from its checkpoint, keeping its training fields.

    For use after a change to ``BUDGETS`` or to the threshold search: no training is repeated.
    """
    result_path, bayes_path = out / f"{arch}-{prior}.json", out / f"{arch}-{prior}.pt"
    if not (result_path.is_file() and bayes_path.is_file()):
        raise FileNotFoundError(f"no finished run {arch}-{prior} in {out} (need {result_path.name} and "
                                f"{bayes_path.name}): run it first without --recompress")  # fmt: skip
    result = json.loads(result_path.read_text())
    device = default_device()
    _, val_b, test_b = _split(result["train_limit"], 128, result["seed"])  # the training part is unused
    val_b.to(device), test_b.to(device)
    bayes, _ = load_checkpoint(bayes_path)
    result.update(_compress_all(bayes.to(device), val_b, test_b, out / f"{arch}-{prior}-pruned.pt"))
    _atomic_json(result, result_path)
    return result


def _kept_groups(r: dict[str, Any]) -> str:
    """Kept groups as the paper lists them: conv filters (outputs), then fc inputs."""
    n_conv = 2 if r["arch"] == "lenet5_caffe" else 0
    return "-".join(str(a[1] if i < n_conv else a[0]) for i, a in enumerate(r["architecture"]))


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table: our runs beside the paper's published figures."""
    rows = ["| network | method | error % (ours / paper) | pruning rate (ours / paper) | "
            "precision rate (ours / paper) | kept architecture (ours / paper) | bits (exp, sig) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        p = PAPER[(r["arch"], r["prior"])]
        arch = _kept_groups(r)
        fmt = lambda v: "n/a" if v is None else f"{v:g}"  # noqa: E731
        bits = " ".join(f"({b[0]},{b[1]})" for b in r["bits"])
        rows.append(
            f"| {r['arch']} | {PRIOR_NAMES[r['prior']]} | {r['error_compressed']:.2f} / {fmt(p['error'])} | "
            f"{r['rate_pruning']:.0f} / {fmt(p['rate_pruning'])} | {r['rate_precision']:.0f} / {fmt(p['rate_precision'])} | "
            f"{arch} / {p['architecture']} | {bits} |"
        )
    return "\n".join(rows) + "\n"


def tradeoff_table(results: list[dict[str, Any]]) -> str:
    """Markdown table: each run compressed under every threshold budget of ``BUDGETS``."""
    rows = ["| network | method | budget (points of held-out accuracy) | error % | pruning rate | precision rate | kept architecture |",
            "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        for p in r.get("tradeoff", []):  # JSONs from before the trade-off have none
            rows.append(
                f"| {r['arch']} | {PRIOR_NAMES[r['prior']]} | {100 * p['max_drop']:.1f} | {p['error_compressed']:.2f} | "
                f"{p['rate_pruning']:.0f} | {p['rate_precision']:.0f} | {_kept_groups(dict(p, arch=r['arch']))} |"
            )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="tiny end-to-end pass (also BCLIB_FAST=1)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default results/, or results-fast/)")
    ap.add_argument("--only", nargs="*", default=None, help="runs such as lenet_300_100-nj lenet5_caffe-hs")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None,
                    help="Bayesian epochs instead of the per-network default (resumes a shorter run's state)")
    ap.add_argument("--recompress", action="store_true",
                    help="redo only the compression of finished runs (after changing BUDGETS or the search)")
    args = ap.parse_args(argv)
    fast = args.fast or fast_mode()
    out = args.out or Path("results-fast" if fast else "results")
    (out / "state").mkdir(parents=True, exist_ok=True)
    runs = [(a, p) for a in ("lenet_300_100", "lenet5_caffe") for p in ("nj", "hs")]
    if args.only:
        runs = [r for r in runs if f"{r[0]}-{r[1]}" in args.only]
    results = []
    for arch, prior in runs:
        r = recompress(arch, prior, out) if args.recompress else run(arch, prior, out, fast, args.seed, epochs=args.epochs)
        print(f"{arch}-{prior}: error {r['error_compressed']:.2f}%, x{r['rate_pruning']:.0f} pruning, "
              f"x{r['rate_precision']:.0f} with precision", flush=True)  # fmt: skip
        results.append(r)
    all_results = [json.loads(p.read_text()) for p in sorted(out.glob("*-*.json"))]
    text = table(all_results) + "\nThe error-compression trade-off:\n\n" + tradeoff_table(all_results)
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
