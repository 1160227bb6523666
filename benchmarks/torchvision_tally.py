"""Compress any network, tried on every torchvision classification model.

    python benchmarks/torchvision_tally.py [--only NAME ...] [--max-params 30e6] [--out PATH]

For each builder in ``torchvision.models.list_models(module=torchvision.models)`` (random
weights: ``weights=None``, ``num_classes=10``) it counts the parameters (on the meta device
where the builder allows it) and skips models over ``--max-params``. The others are built,
given the smallest square input they accept (tried in ``--sizes`` order, batch 2, eval
mode), converted with ``bclib.models.to_bayesian(net, "nj")``, given non-trivial BatchNorm
statistics and sparsified (``bclib.testing``: a random ``--share`` of every group layer's
groups gets a high ``log_alpha``, at least one stays, every threshold is 0). Then the
invariant of ``tests/test_any_network.py`` is checked in eval mode with ``example_input``
= the input:

- ``prune(model, t)(x)`` equals the model's output after ``apply_masks(model, group_masks(model, t))``
  (``torch.testing.assert_close``, rtol 1e-4, atol 1e-5 times the largest output if above 1);
- the masks change the output (the thresholds pruned something that matters);
- the pruned net holds no bclib modules and has fewer parameters than ``prune`` at 1e9.

A float32 mismatch is checked again in float64, to tell rounding from a wrong rule.

Each model runs in its own subprocess under ``--timeout`` seconds, so a crash, a hang or
running out of memory costs only that model. Recorded per model: passed or failed with the
stage and the reason (exception type and first line, or the largest difference), the input
size, the number of group layers, the layers ``to_bayesian`` left plain (its
ConversionWarning), the parameters (plain, Bayesian, pruned at 1e9 = "dense", pruned), the
seconds taken, and how much of the sparsification the pruning realises: of the conv
filters set to a high ``log_alpha``, how many ``group_masks`` removes, and for those it keeps,
why (the graph operation that forced their channel set whole, a producer outside the
group layers, or a coupled producer that keeps them). Results are written atomically to
``--out`` after every model; the end prints a markdown table and the tally passed / tried.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "torchvision_tally.json"
DEFAULT_SIZES = (64, 96, 128, 160, 224, 299)
# Builders that need a word more than weights=None and num_classes (init_weights silences
# a FutureWarning; the aux classifiers of the Inception nets only run in training mode).
EXTRA_KWARGS = {"googlenet": {"init_weights": True}, "inception_v3": {"init_weights": True}}
# A filter share below this realised counts as "prunes almost nothing".
LOW_REALISED = 0.10


# --------------------------------------------------------------------------------------
# worker: one model, in its own process
# --------------------------------------------------------------------------------------
def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:400]


def _where(err: BaseException) -> str:
    """The innermost frame of the traceback inside bclib (else the innermost of all)."""
    frames = traceback.extract_tb(err.__traceback__)
    inside = [f for f in frames if "/bclib/" in f.filename] or frames
    if not inside:
        return ""
    f = inside[-1]
    return f"{Path(f.filename).name}:{f.lineno} ({f.name})"


def _build(name: str, device: Optional[str] = None):
    import torch
    import torchvision

    kwargs: dict[str, Any] = {"weights": None, "num_classes": 10, **EXTRA_KWARGS.get(name, {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if device is None:
            return torchvision.models.get_model(name, **kwargs)
        with torch.device(device):
            return torchvision.models.get_model(name, **kwargs)


def _count_meta(name: str) -> tuple[int, str]:
    return sum(p.numel() for p in _build(name, "meta").parameters()), "meta"


def _count(name: str) -> tuple[int, str]:
    """Parameters of the builder's model, on the meta device where it allows (else built for real)."""
    try:
        return _count_meta(name)
    except Exception:
        return sum(p.numel() for p in _build(name).parameters()), "cpu"


def _why_kind(entry: str) -> str:
    """``"features.1.0 (groups=32 (group layers need groups=1))"`` -> ``"groups=N"``."""
    why = entry.split(" (", 1)[1][:-1] if " (" in entry else entry
    return re.sub(r"=\d+", "=N", why.split(" (", 1)[0])


def _n_params(net) -> int:
    return sum(p.numel() for p in net.parameters())


class _Recorder:
    """Watches bclib.graph's analysis (read-only): which node forced which channel sets
    whole, and which node made each fresh (non group layer) channel set."""

    def __init__(self) -> None:
        self.analyses: list[Any] = []

    def install(self) -> None:
        from bclib import graph

        rec = self
        A = graph._Analysis
        orig_run, orig_visit, orig_need_all, orig_fresh = A.run, A.visit, A.need_all, A.fresh

        def run(self):  # noqa: ANN001
            self._tally_forced, self._tally_fresh, self._tally_node = [], {}, None
            rec.analyses.append(self)
            return orig_run(self)

        def visit(self, node):  # noqa: ANN001
            self._tally_node = node
            return orig_visit(self, node)

        def need_all(self, *args):  # noqa: ANN001
            flat: list[Any] = []
            import torch.fx

            torch.fx.node.map_arg(args, flat.append)
            atoms = [s.atom for n in flat for s in (self.segs(n) or [])]
            if atoms and self._tally_node is not None:
                self._tally_forced.append((_describe(self, self._tally_node), atoms))
            return orig_need_all(self, *args)

        def fresh(self, node):  # noqa: ANN001
            segs = orig_fresh(self, node)
            for s in segs:
                self._tally_fresh[s.atom] = _describe(self, node)
            return segs

        A.run, A.visit, A.need_all, A.fresh = run, visit, need_all, fresh

    def analysis_of(self, structure) -> Any:
        for a in reversed(self.analyses):
            if a.s is structure:
                return a
        return None


def _describe(analysis, node) -> str:
    """A short name for the graph operation at ``node`` (module type, function or method)."""
    if node.op == "call_module":
        m = analysis.gm.get_submodule(node.target)
        name = type(m).__name__
        if hasattr(m, "groups") and getattr(m, "groups", 1) != 1:
            groups = m.groups
            name += "(depthwise x%d)" % (m.out_channels // m.in_channels) if groups == m.in_channels else f"(groups={groups})"
        shape = analysis.shape(node.args[0]) if node.args else None
        if name.startswith("Linear") and shape is not None and len(shape) > 2:
            name += f"({len(shape)}-d input)"
        return name
    if node.op == "call_function":
        t = node.target
        return getattr(t, "__name__", str(t))
    if node.op == "call_method":
        return "." + str(node.target)
    return node.op  # placeholder, get_attr, output


def _realised(model, thresholds, example_input, recorder: _Recorder) -> dict:
    """Of the conv filters the thresholds drop, how many group_masks removes; why the others stay."""
    from bclib import compression, graph, models

    layers = models.bayesian_layers(model)
    masks = compression.group_masks(model, thresholds, example_input)
    st = graph.analyse(model, example_input)
    a = recorder.analysis_of(st)
    atoms = st.atoms
    by_id = {id(m): n for n, m in model.named_modules()}
    conv = {"groups": 0, "dropped": 0, "removed": 0}
    lin = {"groups": 0, "dropped": 0, "removed": 0}
    kept_why: Counter = Counter()
    forced_by: dict[int, Counter] = {}
    fresh_by: dict[int, Counter] = {}
    if a is not None:
        for what, ats in a._tally_forced:
            for at in ats:
                forced_by.setdefault(atoms.find(at), Counter())[what] += 1
        for at, what in a._tally_fresh.items():
            fresh_by.setdefault(atoms.find(at), Counter())[what] += 1
    for layer, m, t in zip(layers, masks, thresholds):
        dropped = ~(layer.log_alpha.detach().cpu() < t)
        if layer.groups_on == "inputs":
            lin["groups"] += dropped.numel()
            lin["dropped"] += int(dropped.sum())
            lin["removed"] += int((~m.inputs).sum())
            continue
        conv["groups"] += dropped.numel()
        conv["dropped"] += int(dropped.sum())
        conv["removed"] += int((~m.outputs).sum())
        stay = int((dropped & m.outputs).sum())
        if not stay:
            continue
        use = st.layers.get(by_id[id(layer)])
        if use is None:
            kept_why["never called"] += stay
            continue
        root = atoms.find(use.out_atom)
        if atoms.forced[root]:
            ops = forced_by.get(root)
            label = ", ".join(sorted(ops)) if ops else "channel sets of different sizes coupled"
            kept_why[f"forced by {label}"] += stay
        elif atoms.plain[root]:
            ops = fresh_by.get(root)
            kept_why[f"plain producer: {', '.join(sorted(ops)) if ops else '?'}"] += stay
        else:
            kept_why["kept by a coupled producer"] += stay
    share = conv["removed"] / conv["dropped"] if conv["dropped"] else None
    return {"conv": conv, "linear": lin, "realised_share": share, "kept_why": dict(kept_why.most_common())}


def _compare(got, want) -> dict:
    diff = (got.double() - want.double()).abs()
    return {"max_abs_diff": float(diff.max()), "max_abs_output": float(want.abs().max())}


def _check(bayes, x, thresholds, example_input) -> tuple[dict, Any, Any]:
    """The invariant, stage by stage; returns the per-stage results, want and got."""
    import torch
    from bclib import compression

    out: dict[str, Any] = {}
    stage = "group_masks"
    try:
        bayes.eval()
        masks = compression.group_masks(bayes, thresholds, example_input)
        stage = "masked forward"
        compression.apply_masks(bayes, masks)
        with torch.no_grad():
            want = bayes(x)
        compression.apply_masks(bayes, None)
        with torch.no_grad():
            unmasked = bayes(x)
        stage = "prune"
        pruned = compression.prune(bayes, thresholds, example_input)
        stage = "pruned forward"
        with torch.no_grad():
            got = pruned(x)
        stage = "prune at 1e9"
        dense = compression.prune(bayes, [1e9] * len(thresholds), example_input)
    except Exception as err:
        compression.apply_masks(bayes, None)
        out.update(stage=stage, reason=_first_line(err), where=_where(err))
        return out, None, None
    out["params_dense"], out["params_pruned"] = _n_params(dense), _n_params(pruned)
    out["params_cut"] = round(1 - out["params_pruned"] / out["params_dense"], 4)
    problems = []
    if got.shape != want.shape:
        problems.append(f"output shape {tuple(got.shape)} != {tuple(want.shape)}")
    else:
        out.update(_compare(got, want))
        try:
            scale = max(1.0, out["max_abs_output"])  # as bclib.testing: atol relative to huge outputs
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
        except AssertionError:
            problems.append(f"pruned != masked: max abs diff {out['max_abs_diff']:.3g} (outputs up to {out['max_abs_output']:.3g})")
        if torch.allclose(unmasked, want, atol=1e-4):
            problems.append("the thresholds pruned nothing that matters (masked == unmasked)")
    bclib_mods = sorted({type(m).__name__ for m in pruned.modules() if type(m).__module__.startswith("bclib")})
    if bclib_mods:
        problems.append(f"bclib modules in the pruned net: {bclib_mods}")
    if not out["params_pruned"] < out["params_dense"]:
        problems.append(f"pruned net not smaller: {out['params_pruned']} >= {out['params_dense']}")
    if problems:
        out.update(stage="invariant", reason="; ".join(problems))
    return out, want, got


def worker(name: str, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    import torch
    from bclib import models
    from bclib.convert import ConversionWarning
    from bclib.testing import randomise_batchnorm, sparsify

    rec: dict[str, Any] = {"model": name}
    recorder = _Recorder()
    recorder.install()
    stage = "count"
    try:
        rec["params_plain"], rec["counted_on"] = _count(name)
        if rec["params_plain"] > args.max_params:
            rec.update(status="skipped", reason=f"{rec['params_plain'] / 1e6:.1f} M parameters > {args.max_params / 1e6:g} M")
            return rec
        stage = "build"
        torch.manual_seed(args.seed)
        plain = _build(name).eval()
        stage = "input size"
        errors = []
        for size in args.sizes:
            x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
            try:
                with torch.no_grad():
                    plain(x)
                rec["input_size"] = size
                break
            except Exception as err:
                errors.append(f"{size}: {_first_line(err)}")
        else:
            raise RuntimeError("no input size works: " + " | ".join(errors))
        rec["smaller_sizes_refused"] = errors[-1] if errors else None
        stage = "to_bayesian"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConversionWarning)
            bayes = models.to_bayesian(plain, "nj")
        msgs = [str(w.message) for w in caught if issubclass(w.category, ConversionWarning)]
        left = msgs[0].split(": ", 1)[1].split("; ") if msgs else []
        rec["left_plain"] = len(left)
        rec["left_plain_why"] = dict(Counter(_why_kind(s) for s in left).most_common())
        del plain
        layers = models.bayesian_layers(bayes)
        rec["group_layers"] = len(layers)
        rec["params_bayes"] = _n_params(bayes)
        if not layers:
            raise RuntimeError("to_bayesian made no group layers")
        randomise_batchnorm(bayes, args.seed)
        thresholds = sparsify(bayes, args.share, args.seed)
        stage = "check"
        result, want, got = _check(bayes, x, thresholds, x)
        rec.update(result)
        if rec.get("reason") is None:
            rec["status"] = "passed"
        else:
            rec["status"] = "failed"
            if rec.get("stage") == "invariant" and "max_abs_diff" in rec and "pruned != masked" in rec["reason"]:
                stage = "float64 recheck"
                res64, _, _ = _check(bayes.double(), x.double(), thresholds, x.double())
                rec["float64"] = {k: res64.get(k) for k in ("max_abs_diff", "max_abs_output", "reason") if k in res64}
                bayes.float()
        if rec.get("stage") not in ("group_masks", "prune", "prune at 1e9"):
            stage = "realised"
            try:
                rec["pruning"] = _realised(bayes, thresholds, x, recorder)
            except Exception as err:
                rec["pruning"] = {"error": _first_line(err)}
    except Exception as err:
        rec.update(status="failed", stage=stage, reason=_first_line(err), where=_where(err))
    finally:
        rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------
def _write_json(path: Path, data: dict) -> None:
    from bclib.atomic import atomic_write

    text = json.dumps(data, indent=1, sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(text))


def _run_one(name: str, args: argparse.Namespace) -> dict:
    """One model in a subprocess under ``args.timeout`` seconds (its process group killed after)."""
    fd, res = tempfile.mkstemp(prefix=f"tally-{name}-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result", res,
           "--max-params", str(args.max_params), "--share", str(args.share), "--seed", str(args.seed),
           "--sizes", *[str(s) for s in args.sizes]]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    try:
        log, _ = proc.communicate(timeout=args.timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        log, _ = proc.communicate()
        timed_out = True
    seconds = round(time.perf_counter() - t0, 2)
    try:
        with open(res) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        rec = None
    finally:
        os.remove(res)
    if rec is None:
        why = f"timed out after {args.timeout} s" if timed_out else f"worker died (exit code {proc.returncode})"
        tail = (log or "").strip().splitlines()[-3:]
        rec = {"model": name, "status": "failed", "stage": "timeout" if timed_out else "crash",
               "reason": why + (": " + " | ".join(tail) if tail and not timed_out else "")}  # fmt: skip
    rec["wall_seconds"] = seconds
    return rec


def _git_head() -> Optional[str]:
    """The checkout's commit, with "+dirty" when bclib/ has uncommitted changes (None outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bclib"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _fmt_params(n: Optional[int]) -> str:
    return "" if n is None else f"{n / 1e6:.2f}M"


def table(records: list[dict]) -> str:
    head = ("| model | status | input | group layers | left plain | params plain | dense (1e9) | pruned | cut "
            "| filters removed / dropped | dropped filters kept mostly by | s | reason |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        p = r.get("pruning") or {}
        conv = p.get("conv") or {}
        share = f"{conv.get('removed', 0)} / {conv.get('dropped', 0)}" if conv else ""
        why = next(iter(p.get("kept_why") or {}), "")
        cut = f"{100 * r['params_cut']:.1f}%" if r.get("params_cut") is not None else ""
        reason = (r.get("reason") or "").replace("|", "\\|")
        if r.get("stage") and r.get("status") == "failed":
            reason = f"[{r['stage']}] {reason}"
        lines.append("| " + " | ".join(str(v) for v in (
            r["model"], r.get("status", "?"), r.get("input_size", ""), r.get("group_layers", ""), r.get("left_plain", ""),
            _fmt_params(r.get("params_plain")), _fmt_params(r.get("params_dense")), _fmt_params(r.get("params_pruned")),
            cut, share, why, r.get("wall_seconds", r.get("seconds", "")), reason[:160])) + " |")  # fmt: skip
    return "\n".join(lines)


def tally(records: list[dict]) -> dict:
    tried = [r for r in records if r.get("status") != "skipped"]
    passed = [r for r in tried if r.get("status") == "passed"]
    low = [r["model"] for r in tried
           if (r.get("pruning") or {}).get("realised_share") is not None and r["pruning"]["realised_share"] < LOW_REALISED]  # fmt: skip
    return {
        "passed": len(passed),
        "tried": len(tried),
        "failed": [r["model"] for r in tried if r.get("status") != "passed"],
        "skipped": [r["model"] for r in records if r.get("status") == "skipped"],
        f"realise_under_{int(LOW_REALISED * 100)}pct_of_dropped_filters": low,
        f"params_cut_under_{int(LOW_REALISED * 100)}pct": [r["model"] for r in tried if r.get("params_cut") is not None
                                                         and r["params_cut"] < LOW_REALISED],  # fmt: skip
    }


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="model names (space or comma separated)")
    ap.add_argument("--max-params", type=float, default=30e6, help="skip models with more parameters (default 30e6)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per model (default 120)")
    ap.add_argument("--share", type=float, default=0.3, help="share of each layer's groups sparsified (default 0.3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="input sizes to try, smallest first")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # one model, results to --result
        warnings.simplefilter("ignore")
        rec = worker(args.worker, args)
        with open(args.result, "w") as f:
            json.dump(rec, f)
        return 0

    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if args.only:
        wanted = [n for item in args.only for n in item.split(",") if n]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            ap.error(f"unknown models {unknown}; torchvision has e.g. {names[:5]}")
        names = [n for n in names if n in wanted]
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "bclib_commit": _git_head(),
        "torch": __import__("torch").__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "prior": "nj",
        "share": args.share,
        "seed": args.seed,
        "max_params": args.max_params,
        "timeout_s": args.timeout,
        "sizes_tried": args.sizes,
        "batch": 2,
        "tolerance": {"rtol": 1e-4, "atol": 1e-5},
    }
    records: list[dict] = []
    t0 = time.perf_counter()
    for i, name in enumerate(names, 1):
        try:  # cheap on the meta device; builders that cannot run there are counted by the worker
            n, _ = _count_meta(name)
        except Exception:
            n = None
        if n is not None and n > args.max_params:
            rec = {"model": name, "status": "skipped", "params_plain": n, "counted_on": "meta", "wall_seconds": 0.0,
                   "reason": f"{n / 1e6:.1f} M parameters > {args.max_params / 1e6:g} M"}  # fmt: skip
        else:
            rec = _run_one(name, args)
        records.append(rec)
        extra = f" ({rec['reason']})" if rec.get("status") != "passed" else ""
        print(f"[{i}/{len(names)}] {name}: {rec.get('status')} in {rec['wall_seconds']} s{extra}", flush=True)
        meta["wall_seconds"] = round(time.perf_counter() - t0, 1)
        _write_json(args.out, {"meta": meta, "tally": tally(records), "models": records})
    t = tally(records)
    if _git_head() != meta["bclib_commit"]:
        meta["bclib_commit_at_end"] = _git_head()
        _write_json(args.out, {"meta": meta, "tally": t, "models": records})
        print(f"warning: the checkout moved from {meta['bclib_commit']} to {meta['bclib_commit_at_end']} during the run")
    print()
    print(table(records))
    print()
    print(f"passed / tried: {t['passed']} / {t['tried']}  (skipped over {args.max_params / 1e6:g} M parameters: "
          f"{len(t['skipped'])}: {', '.join(t['skipped'])})")  # fmt: skip
    print(f"failed: {', '.join(t['failed']) or 'none'}")
    key = f"realise_under_{int(LOW_REALISED * 100)}pct_of_dropped_filters"
    print(f"prune under {int(LOW_REALISED * 100)}% of the dropped conv filters: {', '.join(t[key]) or 'none'}")
    key = f"params_cut_under_{int(LOW_REALISED * 100)}pct"
    print(f"cut under {int(LOW_REALISED * 100)}% of the parameters: {', '.join(t[key]) or 'none'}")
    print(f"wall time {meta['wall_seconds']} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
