"""``python -m gmner.bench.train_at_scale --stage grpo``: the summary's arithmetic, its
refusals, and the whole path on the CPU with the tiny model (no timing asserted)."""

from __future__ import annotations

import json
import math
import sys

import pytest

torch = pytest.importorskip("torch")
real_scale = pytest.importorskip("gmner.bench.train_at_scale", reason="gmner-bench (./bench)")
from gmner.bench.grpo_at_scale import GrpoBench, grpo_summary  # noqa: E402

#: Two GRPO steps of the tiny model on small images, 1 prompt x 2 completions of 8 tokens.
TINY = [
    "--stage", "grpo", "--device", "cpu", "--preset", "tiny", "--steps", "2",
    "--group-size", "2", "--prompts", "1", "--max-new-tokens", "8", "--max-side", "224",
    "--num-workers", "0",
]  # fmt: skip


def test_grpo_summary_leaves_the_warmup_out_and_counts_tokens_per_step():
    bench = GrpoBench(group_size=4, prompts=2, warmup=1)
    watched = [
        {"step": 1, "wall_s": 9.0, "generation_s": 6.0, "peak_gpu_gib": 10.0},
        {"step": 2, "wall_s": 4.0, "generation_s": 2.0, "peak_gpu_gib": 12.0},
        {"step": 3, "wall_s": 6.0, "generation_s": 2.0, "peak_gpu_gib": 11.0},
    ]
    trl = {
        s: {"step": s, "loss": 0.1, "step_time": w - 0.5, "num_tokens": n, **length}
        for s, w, n, length in [
            (1, 9.0, 1000, {"completions/mean_length": 50.0}),
            (2, 4.0, 1800, {"completions/mean_length": 25.0}),
            (3, 6.0, 3000, {"completions/mean_length": 100.0}),
        ]
    }
    s = grpo_summary(watched, trl, bench)
    assert s["steps"] == 3 and s["timed_steps"] == 2
    assert [r["total_tokens"] for r in s["per_step"]] == [1000, 800, 1200]
    assert [r["generated_tokens"] for r in s["per_step"]] == [400, 200, 800]
    assert s["generated_tokens_per_s"] == pytest.approx((200 + 800) / (2.0 + 2.0))
    assert s["total_tokens_per_s"] == pytest.approx((800 + 1200) / (4.0 + 6.0))
    assert s["generation_share"] == pytest.approx(0.4)
    assert s["peak_gpu_gib"] == 12.0 and s["first_step_s"] == 9.0
    assert s["step_time_s_median"] == pytest.approx(4.5)


def test_no_cuda_and_profile_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device.*--device cpu"):
        real_scale.main(["--stage", "grpo", "--work", str(tmp_path)])
    with pytest.raises(SystemExit, match="--profile"):
        real_scale.main(["--stage", "grpo", "--work", str(tmp_path), "--profile", "p"])
    assert not any(tmp_path.iterdir())


def test_a_missing_trl_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ImportError
    with pytest.raises(SystemExit, match="trl is missing.*grpo-gpu-deps"):
        real_scale.main(["--work", str(tmp_path), *TINY])
    assert not any(tmp_path.iterdir())


def test_grpo_steps_of_the_tiny_model_on_the_cpu(tmp_path, capsys):
    pytest.importorskip("trl")
    assert real_scale.main(["--work", str(tmp_path), *TINY]) == 0
    summary = json.loads((tmp_path / "real_scale_grpo.json").read_text())
    assert json.loads(capsys.readouterr().out) == summary
    assert summary["stage"] == "grpo" and summary["steps"] == 2 == len(summary["per_step"])
    assert summary["settings"]["completions_per_step"] == 2
    assert summary["peak_gpu_gib"] is None  # CPU: no GPU memory to report
    figures = [
        "step_time_s_median", "wall_step_s_median", "generation_s_median", "generation_share",
        "generated_tokens_per_step_mean", "total_tokens_per_step_mean", "generated_tokens_per_s",
        "total_tokens_per_s", "first_step_s", "sft_start_s", "grpo_s", "peak_rss_gib",
    ]  # fmt: skip
    for name in figures:
        assert math.isfinite(summary[name]) and summary[name] > 0, name
    for row in summary["per_step"]:
        assert row["generated_tokens"] == 2 * row["completion_mean_length"] > 0
        assert row["total_tokens"] > row["generated_tokens"]  # prompts and images included
        assert all(math.isfinite(row[k]) for k in ("wall_s", "step_time_s", "loss", "reward"))
    assert (tmp_path / "sft-start" / "checkpoints" / "step-000001" / "config.yaml").is_file()
    assert (tmp_path / "grpo-run" / "checkpoints" / "checkpoint-2").is_dir()
