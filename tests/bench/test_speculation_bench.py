"""``gmner bench speculation``: its flags and errors, its id check, and a run on tiny.

Speed is not asserted (the figures go to docs/benchmarks.md): the run on the tiny preset
checks that every variant ran, generated its reference's ids, and that the counts add up.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

spec_bench = pytest.importorskip("gmner.bench.speculation", reason="the gmner-bench package")
from gmner.bench.speculation import SpeculationConfig, Tally  # noqa: E402
from gmner.bench.speculation_peers import Decoded  # noqa: E402
from gmner.runtime.cli import build_parser, main  # noqa: E402

from gmner_rt.errors import GmnerError, InputError  # noqa: E402

HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({}, "--bundle / --preset"),
        ({"preset": "tiny", "bundle": Path("b")}, "--bundle / --preset"),
        ({"preset": "tiny", "model": Path("m")}, "--model"),
        ({"bundle": Path("b")}, "--model"),  # the peers need the checkpoint
        ({"preset": "tiny", "peers": ("vllm",)}, "--peers"),
        ({"preset": "tiny", "provider": "cuda"}, "--peers"),  # ortgenai: CPU only
        ({"preset": "tiny", "provider": "tensorrt", "peers": ()}, "--provider"),
        ({"preset": "tiny", "data": Path("d")}, "--data / --images"),
        ({"preset": "tiny", "limit": 0}, "--limit"),
        ({"preset": "tiny", "max_new_tokens": 0}, "--max-new-tokens"),
    ],
)
def test_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(InputError, match=flag.replace("/", ".")):
        SpeculationConfig(**kwargs)


def test_a_bundle_alone_needs_no_checkpoint_without_peers():
    assert SpeculationConfig(bundle=Path("b"), peers=()).model is None


def test_flags_given_to_gmner_bench_are_kept_and_its_own_refused(caplog):
    parser = build_parser("bench")
    args = parser.parse_args(["bench", "--threads", "1", "speculation", "--preset", "tiny"])
    assert (args.action, args.threads, args.preset) == ("speculation", 1, "tiny")
    args = parser.parse_args(["bench", "speculation", "--preset", "tiny", "--peers", "none"])
    config = spec_bench.config_from_args(args)
    assert config.peers == () and config.max_new_tokens == 256
    with caplog.at_level(logging.ERROR):
        assert main(["bench", "--rounds", "3", "speculation", "--preset", "tiny"]) == 2
    assert "--rounds: a flag of the peer comparison" in caplog.text


def test_tally_counts_tokens_calls_and_drafts():
    tally = Tally("x")
    tally.add(Decoded([1, 2, 3, 4], 2, 0.2, 0.5, drafted=3, accepted=1, stages={"decode": 0.1}))
    tally.add(Decoded([5, 6], 2, 0.2, 0.3, drafted=0, accepted=0, stages={"decode": 0.1}))
    f = tally.figures()
    assert (f["tokens"], f["decoder_calls"], f["drafted"], f["accepted"]) == (6, 4, 3, 1)
    assert f["decoder_calls_per_token"] == pytest.approx(4 / 6)
    assert f["tokens_per_call"] == pytest.approx(6 / 4)
    assert f["decode_tokens_per_s"] == pytest.approx(6 / 0.4)
    assert f["e2e_ms_median"] == pytest.approx(400.0)
    ms = f["decode_ms_per_token"]
    assert ms["decode"] == pytest.approx(200 / 6) and ms["draft"] == 0.0
    assert ms["other"] == pytest.approx(400 / 6 - 200 / 6)
    hf = Tally("hf")
    hf.add(Decoded([1], 1, 0.1, 0.2))
    assert hf.figures()["drafted"] is None and "decode_ms_per_token" not in hf.figures()


def test_different_ids_are_reported_then_fail(tmp_path, monkeypatch, capsys):
    def figures(name):
        tally = Tally(name)
        tally.add(Decoded([1, 2, 3], 2, 0.1, 0.2, drafted=0, accepted=0))
        return tally.figures()

    report = {
        "bundle": "b",
        "requests": 1,
        "think": "on",
        "threads": 1,
        "max_new_tokens": 8,
        "variants": {n: figures(n) for n in ("gmner_rt", "onnxruntime-genai")},
        "id_check": {
            "onnxruntime-genai": {
                "against": "gmner_rt",
                "difference": "row 0 differs at token 2 (of 3 and 3)",
            }
        },
    }
    monkeypatch.setattr(spec_bench, "run", lambda config: report)
    out = tmp_path / "spec.json"
    args = build_parser("bench").parse_args(
        ["bench", "speculation", "--preset", "tiny", "--json", str(out)]
    )
    with pytest.raises(GmnerError, match="onnxruntime-genai against gmner_rt: row 0 differs"):
        spec_bench.run_command(args)
    assert json.loads(out.read_text())["id_check"] == report["id_check"]
    table = capsys.readouterr().out
    assert "onnxruntime-genai" in table and " NO" in table


@pytest.mark.slow
def test_run_on_tiny_every_variant_same_ids(tmp_path, capsys):
    """Every variant on the tiny preset: the same ids as its reference, consistent counts."""
    pytest.importorskip("torch")
    out = tmp_path / "spec.json"
    peers = "hf,ortgenai" if HAS_GENAI else "hf"
    args = ["bench", "speculation", "--preset", "tiny", "--peers", peers, "--limit", "2"]
    args += ["--max-new-tokens", "24", "--threads", "1", "--cache", str(tmp_path / "cache")]
    # in a process of its own, as the command runs: after the peers ran inside the test
    # session, torch training later in the same session (tests/train/test_kills.py) no longer
    # matched the same training in fresh subprocesses bit for bit
    done = subprocess.run(
        [sys.executable, "-m", "gmner", *args, "--json", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    print(done.stdout)
    report = json.loads(out.read_text())
    variants = report["variants"]
    expected = set(spec_bench.REFERENCE) | {"gmner_rt", "gmner_rt unconstrained"}
    if not HAS_GENAI:
        expected -= {"onnxruntime-genai", "onnxruntime-genai unconstrained"}
    assert set(variants) == expected
    assert report["requests"] == 2 and spec_bench.failed_checks(report) == []
    assert all(check["difference"] is None for check in report["id_check"].values())
    for name, f in variants.items():
        assert f["tokens"] == variants[spec_bench.REFERENCE.get(name, name)]["tokens"] > 0
        assert f["decoder_calls_per_token"] * f["tokens"] == pytest.approx(f["decoder_calls"])
        assert f["decode_tokens_per_s"] > 0 and f["e2e_ms_median"] > 0
        if f["drafted"] is not None:
            assert 0 <= f["accepted"] <= f["drafted"]
            assert f["drafted"] == 0 or name.endswith("speculation")
    for plain in ("gmner_rt", "gmner_rt unconstrained"):  # drafts kept save calls
        fast = variants[f"{plain} + speculation"]
        saved = variants[plain]["decoder_calls"] - fast["decoder_calls"]
        assert saved <= fast["accepted"] and fast["decode_speedup"] > 0
    if HAS_GENAI:
        genai = variants["onnxruntime-genai"]
        assert genai["decoder_calls"] == variants["gmner_rt"]["decoder_calls"]  # one per token
        assert variants["gmner_rt + speculation"]["decode_vs_ortgenai"] > 0
    table = capsys.readouterr().out
    assert "gmner_rt + speculation" in table and "hf + prompt lookup" in table
    assert ("onnxruntime-genai" in table) == HAS_GENAI


def test_a_bench_run_gives_torch_threads_back():
    torch = pytest.importorskip("torch")
    from gmner.bench.speculation import _torch_threads_kept

    before = torch.get_num_threads()
    with _torch_threads_kept():
        torch.set_num_threads(1 if before != 1 else 2)
    assert torch.get_num_threads() == before
