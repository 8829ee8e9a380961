"""``gmner bench``: its configuration, its checks and arithmetic, and a smoke run on tiny.

Speed is not asserted here (benchmarks print figures; see docs/benchmarks.md): the smoke run
checks that every system ran, did the same work as gmner_rt, and that every figure the JSON
promises is there and sane.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

bench = pytest.importorskip("gmner.bench.peers", reason="the gmner-bench package (./bench)")
from gmner.bench.peers import BenchConfig, BenchError  # noqa: E402
from gmner.runtime.cli import main  # noqa: E402
from gmner.runtime.timing import Run, bench_pairs, tokens_per_s  # noqa: E402

from gmner_rt.errors import InputError  # noqa: E402

HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None
HAS_PLOT = importlib.util.find_spec("matplotlib") is not None


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"preset": "huge"}, "--preset"),
        ({}, "--bundle / --preset"),
        ({"preset": "tiny", "bundle": Path("b")}, "--bundle / --preset"),
        ({"preset": "tiny", "model": Path("m")}, "--model"),
        ({"preset": "tiny", "systems": ("hf", "gmner_rt")}, "--systems"),
        ({"preset": "tiny", "systems": ("gmner_rt", "vllm")}, "--systems"),
        ({"preset": "tiny", "new_tokens": 1}, "--new-tokens"),
        ({"preset": "tiny", "threads": 0}, "--threads"),
        ({"preset": "tiny", "repeats": 0}, "--repeats"),
        ({"bundle": Path("b"), "systems": ("gmner_rt", "hf")}, "--model"),
    ],
)
def test_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(InputError, match=flag.replace("/", ".")):
        BenchConfig(**kwargs)


def test_gmner_rt_alone_needs_no_checkpoint():
    assert BenchConfig(bundle=Path("b"), systems=("gmner_rt",)).model is None


def test_bench_pairs_are_fixed_and_distinct():
    a, b = bench_pairs(3), bench_pairs(3)
    assert [t for _, t in a] == [t for _, t in b]
    assert all(x.tobytes() == y.tobytes() for (x, _), (y, _) in zip(a, b, strict=True))
    assert a[0][0].tobytes() != a[1][0].tobytes()
    assert len({x.size for x, _ in a}) == 1  # one size: a batch pads only its texts


def test_tokens_per_second_counts_rows_and_steps():
    runs = [Run(0.1, [0.01, 0.03], [[1, 2, 3]]), Run(0.1, [0.02, 0.02], [[1, 2, 3]])]
    assert tokens_per_s(runs, 1) == pytest.approx(4 / 0.08)
    assert tokens_per_s(runs, 4) == pytest.approx(16 / 0.08)


def _figures(tokens, **extra):
    base = {key: 1.0 for key in bench.RATIO_FIGURES}
    base.update(tokens=tokens, tokens_batch=[], tokens_e2e=tokens, text_only=None)
    base.update(extra)
    return base


def test_token_check_finds_the_first_difference():
    results = {
        "gmner_rt": _figures([[1, 2, 3], [4, 5, 6]]),
        "hf": _figures([[1, 2, 3], [4, 5, 6]]),
        "ortgenai": _figures([[1, 2, 3], [4, 9, 6]]),
    }
    report = {"token_check": bench.compare_tokens(results)}
    assert report["token_check"]["hf"] == {"tokens": None, "tokens_e2e": None}
    assert "row 1 differs at token 1" in report["token_check"]["ortgenai"]["tokens"]
    assert bench.failed_checks(report) == [
        "ortgenai/tokens: row 1 differs at token 1 (of 3 and 3)",
        "ortgenai/tokens_e2e: row 1 differs at token 1 (of 3 and 3)",
    ]


def test_token_check_catches_a_shorter_run():
    assert bench.first_difference([[1, 2, 3]], [[1, 2]]) == "row 0 differs at token 2 (of 3 and 2)"
    assert bench.first_difference([[1]], [[1], [2]]) == "1 rows against 2"


def test_ratios_say_how_many_times_better_gmner_rt_is():
    systems = {
        "gmner_rt": {"decode_tokens_per_s": 20.0, "ttft_ms": 100.0, "peak_rss_mb": 500.0},
        "hf": {"decode_tokens_per_s": 10.0, "ttft_ms": 300.0, "peak_rss_mb": 250.0},
    }
    r = bench.ratios(systems)["hf"]
    assert r["decode_tokens_per_s"] == pytest.approx(2.0)
    assert r["ttft_ms"] == pytest.approx(3.0)
    assert r["peak_rss_mb"] == pytest.approx(0.5)  # gmner_rt uses twice the memory here
    assert r["e2e_ms_median"] is None  # not measured: no ratio


def test_rounds_merge_to_medians_and_must_agree_on_tokens():
    def run(tps, rss, tokens):
        return _figures(
            tokens, system="x", decode_tokens_per_s=tps, peak_rss_mb=rss, token_ms=[tps]
        )

    merged = bench.merge_rounds(
        [run(10.0, 100.0, [[1]]), run(14.0, 300.0, [[1]]), run(11.0, 200.0, [[1]])]
    )
    assert merged["decode_tokens_per_s"] == 11.0 and merged["peak_rss_mb"] == 300.0
    assert merged["token_ms"] == [11.0] and merged["rounds"]["decode_tokens_per_s"] == [
        10.0,
        14.0,
        11.0,
    ]
    with pytest.raises(BenchError, match="x: tokens differ between rounds"):
        bench.merge_rounds([run(10.0, 1.0, [[1]]), run(10.0, 1.0, [[2]])])


def test_quantized_variants_are_named_and_measured_by_agreement():
    assert bench.split_system("gmner_rt:int4") == ("gmner_rt", "int4")
    assert BenchConfig(preset="tiny", systems=("gmner_rt", "gmner_rt:int4", "ortgenai:int8"))
    for bad in ("hf:int4", "gmner_rt:int3"):
        with pytest.raises(InputError, match="--systems"):
            BenchConfig(preset="tiny", systems=("gmner_rt", bad))
    results = {
        "gmner_rt": _figures([[1, 2, 3, 4], [5, 6, 7, 8]]),
        "gmner_rt:int4": _figures([[1, 2, 9, 9], [5, 6, 7, 8]]),
    }
    assert bench.compare_tokens(results) == {}  # a variant is not held to the fp ids
    assert bench.agreement(results)["gmner_rt:int4"] == {
        "greedy_prefix_mean": 3.0,
        "greedy_prefix_min": 2,
        "tokens": 4,
    }


def test_roofline_arithmetic():
    r = bench.roofline(32.0, 1_900_000_000, 100_000_000, 14.4)
    assert r["decode_tokens_per_s"] == pytest.approx(16.0)
    assert r["gmner_rt_fraction"] == pytest.approx(0.9)


def test_bandwidth_is_a_plausible_figure():
    pytest.importorskip("onnx")
    figures = bench.BandwidthProbe(64, runs=3).measure()
    assert set(figures) == {"numpy_matvec", "onnxruntime_matmul"}
    assert all(0.5 < gb_s < 5000 for gb_s in figures.values())
    probe = bench.BandwidthProbe(16, runs=1, threads=1)
    assert 0.5 < probe.once() < 5000


def test_bandwidth_probe_refuses_an_empty_matrix():
    with pytest.raises(ValueError, match="megabytes must be >= 1, got 0"):
        bench.BandwidthProbe(0)


@pytest.mark.slow
def test_smoke_run_on_tiny(tmp_path, capsys):
    """CI's smoke run: every installed system, one repeat, the same tokens, every figure."""
    pytest.importorskip("torch")
    systems = ["gmner_rt", "hf"] + (["ortgenai", "ortgenai_text"] if HAS_GENAI else [])
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "--preset",
        "tiny",
        "--systems",
        ",".join(systems),
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--rounds",
        "1",
        "--new-tokens",
        "6",
        "--pairs",
        "1",
        "--batch",
        "2",
        "--threads",
        "2",
        "--bandwidth-mb",
        "64",
        "--cache",
        str(tmp_path / "cache"),
        "--json",
        str(out),
    ]
    if HAS_PLOT:
        args += ["--plot", str(tmp_path / "tokens.png")]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert set(report["systems"]) == set(systems)
    assert bench.failed_checks(report) == []
    for name in systems:
        figures = report["systems"][name]
        assert figures["peak_rss_mb"] > 50
        if name == "ortgenai_text":
            assert figures["text_only"]["decode_tokens_per_s"] > 0
            continue
        assert figures["ttft_ms"] > 0 and figures["decode_tokens_per_s"] > 0
        assert figures["decode_tokens_per_s_batch"] > 0
        assert 0 < figures["e2e_ms_median"] <= figures["e2e_ms_p90"]
        assert len(figures["token_ms"]) == 5
    for name in systems[1:]:
        assert all(
            v is None or (v > 0 and math.isfinite(v))
            for v in report["ratios_vs_gmner_rt"][name].values()
        )
    roof = report["roofline"]
    assert roof["weight_bytes"] > 0 and roof["bandwidth_gb_s"] > 0
    assert roof["gmner_rt_fraction"] == pytest.approx(
        report["systems"]["gmner_rt"]["decode_tokens_per_s"] / roof["decode_tokens_per_s"]
    )
    table = capsys.readouterr().out
    assert report["machine"]["threads"] == 2
    assert len(report["bandwidth_gb_s"]["numpy_matvec"]) == 2 * len(systems)  # around each
    if HAS_GENAI:
        paired = report["paired_decode"]["fp32"]
        assert paired["tokens_equal"] and paired["steps"] == 3 * 5
        assert paired["ortgenai_over_gmner_rt_median"] > 0
        assert paired["bandwidth_gb_s_median"] > 0
        assert set(paired["roofline_fraction"]) == {"gmner_rt", "ortgenai"}
        assert all(0 < f < 10 for f in paired["roofline_fraction"].values())
        assert "paired decode (fp32" in table
    assert "| gmner_rt |" in table and "roofline (gmner_rt):" in table
    if HAS_PLOT:
        assert (tmp_path / "tokens.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failing_worker_names_the_system(tmp_path):
    spec = bench.WorkerSpec(
        system="gmner_rt",
        bundle=str(tmp_path / "missing"),
        model=None,
        threads=1,
        new_tokens=2,
        repeats=1,
        warmup=0,
        pairs=1,
        batch=0,
        cache=str(tmp_path),
    )
    with pytest.raises(BenchError, match="gmner_rt: the worker failed"):
        bench._run_system(spec, timeout_s=120)
