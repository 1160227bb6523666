"""bclib.results: weights of kept groups against counts by hand, the JSON-checkpoint check,
the front and the point nearest the paper, and the shipped runs read through it."""
import json

import pytest

from bclib import compression, models, results
from bclib.config import results_dir
from bclib.testing import sparsify
from bclib.train import load_checkpoint, save_checkpoint


@pytest.mark.parametrize("arch, groups, weights", [
    ("lenet_300_100", "784-300-100", 266_200),  # paper.md: the full nets
    ("lenet5_caffe", "20-50-800-500", 430_500),
    ("lenet_300_100", "278-98-13", 278 * 98 + 98 * 13 + 13 * 10),  # 28,648 in paper.md
    ("lenet_300_100", "311-86-14", 28_090),
    ("lenet5_caffe", "8-13-88-13", 1 * 8 * 25 + 8 * 13 * 25 + 88 * 13 + 13 * 10),
    ("lenet5_caffe", [5, 10, 76, 16], 2_751),  # 430,500 / 2,751 = 156.5, the paper's 156x
])  # fmt: skip
def test_weights_of_kept_groups_match_counts_by_hand(arch, groups, weights):
    assert results.weights_of_kept_groups(arch, groups) == weights


def test_weights_of_kept_groups_refuses_a_wrong_number_of_layers():
    with pytest.raises(ValueError, match="lenet5_caffe has 4 weighted layers, got 3"):
        results.weights_of_kept_groups("lenet5_caffe", "8-13-88")


def test_paper_pruning_rate_is_published_or_derived():
    assert results.paper_pruning_rate("lenet5_caffe", "hs") == (156.0, False)
    rate, derived = results.paper_pruning_rate("lenet_300_100", "nj")
    assert derived and rate == pytest.approx(266_200 / 28_648)
    assert round(rate, 1) == 9.3 and round(results.paper_pruning_rate("lenet_300_100", "hs")[0], 1) == 9.5


@pytest.mark.parametrize("arch", ["lenet_300_100", "lenet5_caffe"])
def test_kept_groups_count_what_the_masks_keep(arch):
    net = models.build(arch, "nj")
    thresholds = sparsify(net, share=0.5, seed=3)
    r = dict(compression.compression_report(net, thresholds).as_dict(), arch=arch)
    groups = results.kept_groups(r)
    assert groups.count("-") == len(r["architecture"]) - 1
    assert results.weights_of_kept_groups(arch, groups) == r["weights_kept"]


def _finished_run(tmp_path, arch="lenet_300_100", prior="hs", seed=1):
    """A checkpoint and a JSON as reproduce writes them, from a hand-sparsified net."""
    net = models.build(arch, prior)
    thresholds = sparsify(net, share=0.3, seed=seed)
    path = tmp_path / f"{arch}-{prior}.pt"
    save_checkpoint(path, net, arch, prior, half=True)
    net = load_checkpoint(path)[0]  # the report of the half-precision checkpoint, as reproduce records it
    point = {"max_drop": 0.0, "thresholds": thresholds, **compression.compression_report(net, thresholds).as_dict(),
             "error_pruned": 1.5, "error_compressed": 1.6}  # fmt: skip
    r = {"arch": arch, "prior": prior, "seed": seed, "error_bayes": 1.4, **point, "tradeoff": [dict(point)]}
    (tmp_path / f"{arch}-{prior}.json").write_text(json.dumps(r))
    return r


def test_load_run_reads_and_checks_a_run(tmp_path):
    r = _finished_run(tmp_path)
    run = results.load_run("lenet_300_100", "hs", tmp_path)
    assert run.key == "lenet_300_100-hs" and run.result == r
    assert models.bayesian_layers(run.model)[0].prior == "hs"


def test_seed_runs_gather_the_seed_folders_that_hold_the_run(tmp_path):
    r1 = _finished_run(tmp_path)
    r2 = _finished_run(tmp_path / "seeds" / "seed2", seed=2)  # tmp_path/seeds/seed2 made by save_checkpoint
    _finished_run(tmp_path / "seeds" / "seed3", prior="nj", seed=3)  # another run only: left out
    assert results.seed_runs("lenet_300_100", "hs", tmp_path) == {1: r1, 2: r2}
    assert list(results.seed_runs("lenet_300_100", "nj", tmp_path)) == [3]
    (tmp_path / "seeds" / "seed2" / "lenet_300_100-hs.json").write_text(json.dumps(dict(r2, bits=[[3, 1]] * 3)))
    with pytest.raises(results.RunMismatch, match="bits"):  # each seed is checked against its checkpoint
        results.seed_runs("lenet_300_100", "hs", tmp_path)
    (tmp_path / "seeds" / "seed2" / "lenet_300_100-hs.json").write_text(json.dumps(dict(r2, seed=4)))
    with pytest.raises(ValueError, match="seed2/lenet_300_100-hs.json was trained with seed 4"):
        results.seed_runs("lenet_300_100", "hs", tmp_path)


def test_check_run_names_the_field_and_the_fix(tmp_path):
    r = _finished_run(tmp_path)
    run = results.load_run("lenet_300_100", "hs", tmp_path)
    bad = dict(r, bits=[[3, 1]] * 3)
    with pytest.raises(results.RunMismatch, match=r"\(headline\).*bits.*--recompress --only lenet_300_100-hs"):
        results.check_run(run.model, bad)
    bad = dict(r, tradeoff=[dict(r["tradeoff"][0], rate_precision=2 * r["rate_precision"])])
    with pytest.raises(results.RunMismatch, match=r"budget 0.0.*rate_precision"):
        results.check_run(run.model, bad)
    (tmp_path / "lenet_300_100-hs.json").write_text(json.dumps(dict(r, weights_kept=r["weights_kept"] + 1)))
    with pytest.raises(results.RunMismatch, match="weights_kept"):
        results.load_run("lenet_300_100", "hs", tmp_path)
    assert results.load_run("lenet_300_100", "hs", tmp_path, check=False).result["weights_kept"] > r["weights_kept"]


def test_missing_runs_say_how_to_make_them(tmp_path):
    _finished_run(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"lenet5_caffe-nj.json not found.*--only lenet5_caffe-nj"):
        results.load_run("lenet5_caffe", "nj", tmp_path)
    (tmp_path / "lenet_300_100-hs.pt").rename(tmp_path / "lenet_300_100-nj.pt")
    (tmp_path / "lenet_300_100-hs.json").rename(tmp_path / "lenet_300_100-nj.json")
    with pytest.raises(results.RunMismatch, match="holds lenet_300_100-hs"):
        results.load_run("lenet_300_100", "nj", tmp_path)
    found, missing = results.load_runs([("lenet5_caffe", "hs")], tmp_path)
    assert found == {} and len(missing) == 1 and "lenet5_caffe-hs" in missing[0]


def _points(*pairs):
    return [{"max_drop": i / 1000, "error_compressed": e, "rate_precision": c} for i, (e, c) in enumerate(pairs)]


def test_front_drops_dominated_points():
    pts = _points((0.95, 310), (1.08, 433), (1.27, 352), (1.34, 354), (1.08, 400))
    assert [(p["error_compressed"], p["rate_precision"]) for p in results.front(pts)] == [(0.95, 310), (1.08, 433)]
    assert results.dominates(pts[1], pts[3]) and not results.dominates(pts[0], pts[1])
    assert not results.dominates(pts[1], dict(pts[1]))  # equal points do not dominate each other


def test_nearest_to_paper_prefers_the_higher_rate_on_ties():
    r = {"arch": "lenet5_caffe", "prior": "nj", "tradeoff": _points((0.75, 300), (1.25, 350), (1.5, 400))}
    assert results.nearest_to_paper(r)["rate_precision"] == 350  # 0.75 and 1.25: both 0.25 from the paper's 1.0
    r["tradeoff"] = _points((1.02, 100), (1.3, 400))
    assert results.nearest_to_paper(r) == dict(r["tradeoff"][0], arch="lenet5_caffe")


@pytest.mark.skipif(not (results_dir() / "lenet5_caffe-nj.json").is_file(), reason="no shipped runs")
def test_shipped_runs_agree_with_their_checkpoints():
    found, missing = results.load_runs()
    assert not missing and sorted(found) == sorted(results.run_key(a, p) for a, p in results.MNIST_RUNS)
    for run in found.values():
        arch = run.result["arch"]
        for p in run.result["tradeoff"]:
            assert results.weights_of_kept_groups(arch, results.kept_groups(dict(p, arch=arch))) == p["weights_kept"]
    table = results.matched_table([run.result for run in found.values()])
    assert "9.3? (derived)" in table and "9.5? (derived)" in table


@pytest.mark.skipif(not (results_dir() / "lenet5_caffe-nj.json").is_file(), reason="no shipped runs")
@pytest.mark.parametrize("table, section", [(results.quantized_table, "quantized"), (results.grid_table, "grid")])
def test_headline_tables_hold_each_runs_headline_row_of_the_full_table(table, section):
    runs = [json.loads((results_dir() / f"{key}.json").read_text()) for key in ("lenet5_caffe-nj", "lenet_300_100-hs")]
    full, heads = table(runs).splitlines(), table(runs, headlines=True).splitlines()
    assert heads[:2] == full[:2]
    assert len(full) == 2 + sum(len(r[section]["points"]) for r in runs)
    marked = [line.replace(" (headline)", "").replace(" (headline, held)", " (held)")
              for line in full[2:] if "(headline" in line or "(held)" in line]  # fmt: skip
    assert heads[2:] == marked
    for r in runs:  # the headline's row, and the held point's (marked) where there is one
        s = r[section]
        lines = [line for line in heads[2:] if line.startswith(f"| {results.NET_NAMES[r['arch']]} ")]
        held = s.get("held")
        assert len(lines) == 1 + (held not in (None, s["headline"]))
        assert any(f"**{s['points'][s['headline']]['coded_bytes']:,}**" in line for line in lines)
        if held is not None:
            assert sum("(held)" in line for line in lines) == 1
