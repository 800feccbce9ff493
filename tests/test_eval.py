"""`cacheblend eval` / `cacheblend tune` end to end on the real embedded model (small: 2 questions,
2 short passages each), plus the pure helpers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from bench import stats, tune
from bench.eval_variants import parse_variant, parse_variants, schedule_budget
from cacheblend.cli import main as cli_main
from engine.quality import first_token_kl

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "musique_s.json"
needs_data = pytest.mark.skipif(not DATA.is_file(), reason="../shared/data/musique_s.json not present")

ROW_KEYS = {"mode", "ratio", "f1", "agreement_f1", "exact_match", "kl_first_token", "kl_below_full_reuse",
            "top1_agreement", "ttft_median_s", "ttft_p95_s", "tokens_recomputed"}
# short passages keep the run small; --threads 1 is faster than 2 on a shared 2-core machine;
# float32 as in conftest: the exactness checks (prefix reuse, ratio 1.0) must not depend on the CPU's ISA
SMALL = ["--dataset", str(DATA), "--limit", "2", "--passages", "2", "--passage-chars", "300", "--max-new-tokens", "6", "--threads", "1",
         "--no-progress", "--dtype", "float32"]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"


@needs_data
def test_eval_end_to_end(tmp_path, capsys):
    out, plots = tmp_path / "eval.json", tmp_path / "plots"
    rc = cli_main(["eval"] + SMALL + ["--questions", "50-51", "--ratios", "0.15,1.0", "--variants", "default,head2,prefix_ctx,random_sel",
                                      "--context-points", "1,2", "--context-questions", "1", "--json", str(out), "--plots", str(plots)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "cacheblend@0.15" in printed and "variants" in printed and "bootstrap interval" in printed

    res = json.loads(out.read_text())
    rows = {r["label"]: r for r in res["rows"]}
    assert list(rows) == ["full_prefill", "prefix_cache", "full_reuse", "cacheblend@0.15", "cacheblend@1"]
    for r in rows.values():
        assert ROW_KEYS <= set(r)
        assert r["n"] == 2
        assert r["ttft_median_s"] > 0 and r["ttft_p95_s"] >= r["ttft_median_s"]
        assert 0 <= r["f1"] <= 1 and 0 <= r["top1_agreement"] <= 1 and r["kl_first_token"] >= 0
    assert rows["cacheblend@0.15"]["ratio"] == 0.15 and rows["full_reuse"]["ratio"] is None

    # the reference against itself, and exact prefix reuse
    assert rows["full_prefill"]["kl_first_token"] == 0 and rows["full_prefill"]["agreement_f1"] == 1
    assert rows["prefix_cache"]["kl_first_token"] < 1e-3 and rows["prefix_cache"]["top1_agreement"] == 1
    # ratio 1.0 recomputes every token: the same distribution and the same answers as full prefill
    full_r = rows["cacheblend@1"]
    assert full_r["kl_first_token"] < 1e-4
    assert full_r["top1_agreement"] == 1 and full_r["exact_match"] == 1 and full_r["same_answer"] == 1
    for q in res["questions"]:
        assert q["results"]["cacheblend@1"]["answer"] == q["results"]["full_prefill"]["answer"]
    assert [q["index"] for q in res["questions"]] == [50, 51]
    # every table value can be recomputed from the per-question rows
    per_q = lambda label, key: [q["results"][label][key] for q in res["questions"]]  # noqa: E731
    for label, r in rows.items():
        for key in ("f1", "agreement_f1", "exact_match", "kl_first_token", "kl_below_full_reuse", "top1_agreement"):
            assert r[key] == pytest.approx(stats.mean(per_q(label, key)))
        assert r["ttft_median_s"] == pytest.approx(stats.percentile(per_q(label, "ttft_s"), 50))
    blend = rows["cacheblend@0.15"]
    assert blend["kl_vs_full_reuse"] == pytest.approx(sum(per_q("cacheblend@0.15", "kl_first_token")) /
                                                      sum(per_q("full_reuse", "kl_first_token")))
    lo, hi = blend["ci95"]["kl_vs_full_reuse"]
    assert lo <= blend["kl_vs_full_reuse"] <= hi
    assert set(blend["ci95"]) == {"kl_vs_full_reuse", "kl_below_full_reuse", "agreement_f1", "exact_match", "top1_agreement"}
    assert rows["full_reuse"]["kl_vs_full_reuse"] == 1.0
    # fewer tokens recomputed at a lower ratio; full_reuse recomputes only prefix/suffix
    assert rows["full_reuse"]["tokens_recomputed"] < rows["cacheblend@0.15"]["tokens_recomputed"] < rows["full_prefill"]["tokens_recomputed"]
    assert rows["cacheblend@1"]["tokens_recomputed"] == rows["full_prefill"]["tokens_recomputed"]

    variants = {v["variant"]: v for v in res["variants"]}
    assert set(variants) == {"default", "head2", "prefix_ctx", "random_sel"}
    assert variants["default"]["kl_first_token"] == rows["cacheblend@0.15"]["kl_first_token"]  # the same runs
    assert variants["head2"]["tokens_recomputed"] > variants["default"]["tokens_recomputed"]
    assert variants["random_sel"]["tokens_recomputed"] == variants["default"]["tokens_recomputed"]
    assert variants["random_sel"]["kl_first_token"] != variants["default"]["kl_first_token"]  # other tokens chosen
    for v in variants.values():
        assert {"kl_first_token", "kl_below_full_reuse", "ttft_median_s"} <= set(v)

    ctx = res["context"]
    assert {r["passages"] for r in ctx} == {1, 2} and len(ctx) == 8
    assert all(r["ttft_median_s"] > 0 for r in ctx)

    names = sorted(p.name for p in plots.iterdir())
    assert names == ["frontier.png", "quality_vs_ratio.png", "ttft_vs_context.png", "ttft_vs_ratio.png", "variants.png"]
    for p in plots.iterdir():
        assert_png(p)


@needs_data
@pytest.mark.parametrize("flags", [["--questions", "120-135"], ["--start", "140", "--limit", "2"]])
def test_eval_refuses_reserved_questions(flags):
    with pytest.raises(SystemExit, match="reserved"):
        cli_main(["eval", "--dataset", str(DATA)] + flags)


@needs_data
def test_eval_variants_at_several_ratios_and_an_interrupted_run_resumed(tmp_path, capsys):
    """A signal variant runs at each --variant-ratios value (a curve of the frontier plot), the
    JSON is saved after every question, and --resume keeps the saved questions and runs the rest."""
    out = tmp_path / "eval.json"
    flags = SMALL + ["--questions", "0-1", "--ratios", "0.15", "--modes", "full_reuse", "--variants", "value_signal",
                     "--variant-ratios", "0.05,0.15", "--context-points", "none", "--json", str(out)]
    assert cli_main(["eval"] + flags) == 0
    whole = json.loads(out.read_text())
    assert "partial" not in whole
    assert [(v["variant"], v["ratio"]) for v in whole["variants"]] == [("value_signal", 0.05), ("value_signal", 0.15)]
    low, high = whole["variants"]
    assert low["tokens_recomputed"] < high["tokens_recomputed"]
    assert "variant:value_signal@0.05" in capsys.readouterr().out

    # interrupted after the first question: that is what the file holds then
    first = {"config": whole["config"], "partial": True, "questions": whole["questions"][:1], "elapsed_s": 1.0}
    first["questions"][0]["results"]["full_reuse"]["answer"] = "kept as saved"
    out.write_text(json.dumps(first))
    assert cli_main(["eval"] + flags + ["--resume"]) == 0
    resumed = json.loads(out.read_text())
    assert [q["index"] for q in resumed["questions"]] == [0, 1] and "partial" not in resumed
    assert resumed["questions"][0]["results"]["full_reuse"]["answer"] == "kept as saved"  # not run again
    again, before = resumed["questions"][1]["results"], whole["questions"][1]["results"]
    assert set(again) == set(before)
    for label in before:  # run again, in the same way
        assert again[label]["kl_first_token"] == pytest.approx(before[label]["kl_first_token"], rel=1e-3, abs=1e-6)
        assert again[label]["tokens_recomputed"] == before[label]["tokens_recomputed"]
    assert resumed["elapsed_s"] > 1.0

    # a different plan cannot continue it
    other = list(flags)
    other[other.index("--ratios") + 1] = "0.1"
    with pytest.raises(SystemExit, match="other settings: ratios"):
        cli_main(["eval"] + other + ["--resume"])


@needs_data
def test_tune_picks_a_ratio(tmp_path, capsys):
    out, plot = tmp_path / "tune.json", tmp_path / "tune.png"
    rc = cli_main(['tune'] + SMALL[:3] + ["1"] + SMALL[4:] + ["--ratios", "0.1,1.0", "--tolerance", "1.0", "--json", str(out),
                                                   "--plot", str(plot)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["chosen_ratio"] == 0.1          # everything is within a tolerance of 1
    assert "chosen recompute_ratio = 0.1" in capsys.readouterr().out
    assert_png(plot)


def test_choose_smallest_within_tolerance():
    rows = [{"mode": "full_prefill", "ratio": None, "top1_agreement": 1.0, "kl_first_token": 0.0},
            {"mode": "cacheblend", "ratio": 0.3, "top1_agreement": 0.96, "kl_first_token": 0.02},
            {"mode": "cacheblend", "ratio": 0.05, "top1_agreement": 0.7, "kl_first_token": 0.4},
            {"mode": "cacheblend", "ratio": 0.1, "top1_agreement": 0.92, "kl_first_token": 0.05},
            {"mode": "cacheblend", "ratio": 1.0, "top1_agreement": 1.0, "kl_first_token": 0.0}]
    assert tune.choose(rows, "top1_agreement", 0.05) == (0.3, 1.0)
    assert tune.choose(rows, "top1_agreement", 0.1) == (0.1, 1.0)
    assert tune.choose(rows, "kl_first_token", 0.06) == (0.1, 0.0)
    assert tune.choose(rows, "kl_first_token", 0.0) == (1.0, 0.0)
    assert tune.choose([], "kl_first_token", 0.1) == (None, None)


def test_kl_is_float64_and_clamped():
    a = torch.tensor([2.0, 1.0, 0.0])
    assert first_token_kl(a, a) == 0.0
    p = torch.softmax(a.double(), -1)
    q = torch.softmax(torch.tensor([0.0, 1.0, 2.0]).double(), -1)
    assert first_token_kl(a, torch.tensor([0.0, 1.0, 2.0])) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-12)
    # a tiny difference float32 would round to noise (or below 0): float64 resolves it
    assert 0 < first_token_kl(a, a + torch.tensor([1e-4, 0.0, 0.0])) < 1e-8


def test_percentile_takes_q_in_0_to_100():
    assert stats.percentile([1, 2, 3, 4, 5], 50) == 3
    assert stats.percentile([1.0, 2.0], 95) == pytest.approx(1.95)
    assert stats.percentile([3.0, 1.0, 2.0], 0) == 1 and stats.percentile([3.0, 1.0, 2.0], 100) == 3
    assert stats.percentile([], 50) is None


def test_mean_skips_missing_values():
    assert stats.mean([True, False, None, True]) == pytest.approx(2 / 3)
    assert stats.mean([None]) is None


def test_bootstrap_intervals_are_seeded_and_paired():
    xs = [0.0, 1.0] * 20
    lo, hi = stats.mean_interval(xs)
    assert lo < 0.5 < hi and (lo, hi) == stats.mean_interval(xs)  # fixed seed: the same interval every time
    assert stats.mean_interval([0.7] * 10) == (pytest.approx(0.7), pytest.approx(0.7))
    assert stats.mean_interval([]) is None
    # paired: a numerator that is always half its denominator has ratio 0.5 in every resample
    den = [0.1, 2.0, 0.5, 3.0, 0.2]
    assert stats.ratio_interval([d / 2 for d in den], den) == (pytest.approx(0.5), pytest.approx(0.5))
    assert stats.ratio_interval([1.0], [0.0]) is None


def test_parse_variants():
    vs = parse_variants("all", num_layers=30)
    assert [v.name for v in vs] == ["default", "head4", "prefix_ctx", "gradual", "value_signal", "key_signal", "check0",
                                    "check2", "check3", "random_sel"]
    by = {v.name: v for v in vs}
    assert by["head4"].engine_overrides == {"recompute_chunk_head": 4}
    assert by["prefix_ctx"].engine_overrides == {"chunk_context": "prefix"}
    assert parse_variant("passage_ctx", 30).engine_overrides == {"chunk_context": "passage"}
    assert parse_variant("sink_ctx", 30).engine_overrides == {"chunk_context": "sink"}
    g = by["gradual"].spec(0.15)
    assert g.check_layers == (1, 8, 16) and g.check_ratios == (0.2, 0.15, 0.1) and g.ratio == 0.1
    assert by["key_signal"].spec(0.15).selection_signal == "key"
    assert by["check2"].spec(0.2).check_layers == (2,) and by["check2"].spec(0.2).ratio == 0.2
    assert by["default"].engine_key == "default" and by["head4"].engine_key != "default"
    assert by["random_sel"].spec(0.15).selection_signal == "random"
    assert by["value_signal"].spec(0.15).selection_signal == "value" and by["value_signal"].engine_key == "default"
    sens = parse_variant("sensitivity_signal", 30)
    assert sens.spec(0.15).selection_signal == "sensitivity" and sens.engine_overrides == {"selection_signal": "sensitivity"}
    stored = parse_variant("stored_signal", 30).spec(0.2)
    assert stored.selection_signal == "stored" and stored.check_layers == (0,) and stored.ratio == 0.2
    funnel = parse_variant("stored_funnel", 30)  # the signal's own schedule, on the default engine
    assert funnel.spec(0.15).selection_signal == "stored" and funnel.spec(0.15).check_layers is None
    assert funnel.engine_key == "default"
    pool = parse_variant("pool0.7", 30)
    assert pool.engine_overrides == {"sensitivity_pool": 0.7, "selection_signal": "sensitivity"}
    for bad in ("pool0", "pool1.5", "poolx"):
        with pytest.raises(ValueError, match="pool"):
            parse_variant(bad, 30)
    with pytest.raises(ValueError, match="unknown variant"):
        parse_variant("bogus", 30)
    with pytest.raises(ValueError):
        parse_variant("check40", 30)


def test_schedule_variant_and_its_budget():
    v = parse_variant("sched:1=.2/20=.05", 30)
    spec = v.spec(0.15)
    assert spec.check_layers == (1, 20) and spec.check_ratios == (0.2, 0.05) and spec.ratio == 0.05
    # layers 2-20 at 20% of the chunk tokens, 21-29 at 5%; one check layer at 1 and 15% is the default's 4.2
    assert schedule_budget((1, 20), (0.2, 0.05), 30) == pytest.approx(19 * 0.2 + 9 * 0.05)
    assert schedule_budget((1,), (0.15,), 30) == pytest.approx(4.2)
    for bad in ("sched:1=.05/20=.2", "sched:20=.2/1=.1", "sched:1=.2/30=.1", "sched:1=1.5", "sched:1-.2"):
        with pytest.raises(ValueError, match="variant sched"):
            parse_variant(bad, 30)
