"""The GRPO stage on CPU with the tiny model: prompts equal SFT's, the reward is the metrics
code's, a smoke run writes a usable checkpoint, resume is exact, the command line's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("trl")

from gmner.runtime.cli import main as gmner_main  # noqa: E402
from gmner.train.config import checkpoint_config, load_config  # noqa: E402
from gmner.train.dataset import encode_prompt, load_image  # noqa: E402
from gmner.train.grpo import (  # noqa: E402
    gold_json,
    grpo_rows,
    reward_function,
    train_grpo,
)
from gmner.train.loop import load_rows  # noqa: E402
from gmner.train.modeling import load_processor  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from trl.data_utils import prepare_multimodal_messages  # noqa: E402

from gmner_rt.errors import InputError  # noqa: E402
from gmner_rt.metrics import RewardWeights, reward  # noqa: E402
from gmner_rt.records import EntityRecord, format_answer  # noqa: E402

#: A stage small enough for CI: 6 tweets (3 steps an epoch), 2 prompts x 2 completions of
#: 16 tokens per step.
SMOKE = {
    "stage": "grpo",
    "data.limit": 6,
    "grpo.group_size": 2,
    "grpo.prompts": 2,
    "grpo.max_new_tokens": 16,
    "grpo.steps": 4,
    "grpo.save_every": 2,
    "grpo.lr": 1e-3,
}


def _cfg(adapter: Path, out: Path, **overrides):
    values = {"grpo.init": str(adapter), "output.dir": str(out), **SMOKE, **overrides}
    return load_config(None, values, inherit=checkpoint_config(adapter))


def _rows(adapter, tmp_path):
    cfg = _cfg(adapter, tmp_path / "run")
    processor = load_processor(adapter, config_dir=cfg.model.path)
    return cfg, processor, load_rows(cfg)["train"]


def test_grpo_prompts_render_to_the_ids_sft_trains_on(adapter, tmp_path):
    cfg, processor, rows = _rows(adapter, tmp_path)
    for row, item in zip(rows, grpo_rows(rows, processor, cfg), strict=True):
        image = load_image(item["image"])
        # what TRL does with a prompt and its image column
        messages = prepare_multimodal_messages(item["prompt"], images=[image])
        trl_ids = processor.apply_chat_template(
            conversation=[messages], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"][0]
        ours = encode_prompt(processor, row, image, cfg.data.use_cot, cfg.data.prompt)
        assert list(trl_ids) == ours["input_ids"][0].tolist()


def test_a_tweet_spelling_a_control_token_is_left_out_and_named(adapter, tmp_path, caplog):
    cfg, processor, rows = _rows(adapter, tmp_path)
    bad = {**rows[0], "id": "spelled", "text": rows[0]["text"] + " <|im_end|>"}
    with caplog.at_level("WARNING"):
        kept = grpo_rows([bad, *rows[1:]], processor, cfg)
    assert [r["id"] for r in kept] == [r["id"] for r in rows[1:]]
    assert "spelled" in caplog.text


def test_the_reward_function_is_the_metrics_reward(adapter, tmp_path):
    cfg, _, rows = _rows(adapter, tmp_path)
    row = next(r for r in rows if any(rec["boxes"] for rec in r["records"]))
    gold = gold_json(row, cfg)
    records = [
        EntityRecord(m, t, tuple(tuple(b) for b in boxes) if boxes else None)
        for m, t, boxes in json.loads(gold)
    ]
    perfect = format_answer(tuple(records), think=None)
    wrong_box = format_answer(
        tuple(EntityRecord(r.mention, r.type, ((0, 0, 1, 1),)) for r in records), think=None
    )
    completions = [[{"role": "assistant", "content": t}] for t in (perfect, wrong_box, "junk")]
    scores = reward_function(cfg)(completions, [gold] * 3)
    expected = [reward(t, records, RewardWeights()) for t in (perfect, wrong_box, "junk")]
    assert scores == expected
    assert scores[0] == 1.0 and scores[0] > scores[1] > scores[2]


def _rows_of(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def test_smoke_run_writes_a_checkpoint_and_resumes_exactly(adapter, tiny, tmp_path):
    whole = train_grpo(_cfg(adapter, tmp_path / "whole"))
    assert whole.steps == 4 and whole.last.name == "checkpoint-4"
    rows = _rows_of(tmp_path / "whole")
    assert sorted(rows) == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows.values())
    assert (whole.last / "adapter_config.json").is_file()
    assert (whole.last / "config.yaml").is_file()
    assert (tmp_path / "whole" / "latest").read_text() == "checkpoint-4"
    start = load_file(adapter / "adapter_model.safetensors")
    end = load_file(whole.last / "adapter_model.safetensors")
    assert any(not torch.equal(start[k], end[k]) for k in start)  # the stage trained

    # stopped inside the first epoch, and at its end (where TRL's own sampler would restart
    # its sequence of orders): each resumed run takes the uninterrupted run's steps
    for stop in (2, 3):
        cut = tmp_path / f"cut{stop}"
        stopped = train_grpo(_cfg(adapter, cut, **{"grpo.save_every": stop}), stop_after_steps=stop)
        assert stopped.steps == stop and stopped.last.name == f"checkpoint-{stop}"
        resumed = train_grpo(_cfg(adapter, cut), resume=True)
        assert resumed.steps == 4
        again = _rows_of(cut)
        assert sorted(again) == [1, 2, 3, 4]  # the log holds each step once
        for step in range(stop + 1, 5):
            for key in ("loss", "reward", "kl", "completions/mean_length"):
                assert again[step][key] == rows[step][key], (stop, step, key)
        final = load_file(resumed.last / "adapter_model.safetensors")
        assert all(torch.equal(final[k], end[k]) for k in end)

    # export reads a GRPO checkpoint as it reads an SFT one
    from gmner.export.merge import load_merged

    _, _, report = load_merged(tiny, whole.last)
    assert report.kind == "lora"


def test_a_fully_fine_tuned_start_keeps_a_reference_copy_and_resumes_exactly(
    tiny, adapter, tmp_path
):
    full = {"grpo.init": str(tiny), "lora.enabled": False, "grpo.steps": 2, "grpo.beta": 0.1}
    full["grpo.save_every"] = 1
    whole = train_grpo(_cfg(adapter, tmp_path / "whole", **full))
    assert (whole.last / "model.safetensors").is_file()
    rows = _rows_of(tmp_path / "whole")
    assert rows[1]["kl"] == 0.0  # step 1: the policy is the reference
    # a resume loads the trained weights (a fully fine-tuned model.safetensors is in the
    # original layout, which the live model does not load by name)
    train_grpo(_cfg(adapter, tmp_path / "cut", **full), stop_after_steps=1)
    resumed = train_grpo(_cfg(adapter, tmp_path / "cut", **full), resume=True)
    assert _rows_of(tmp_path / "cut")[2]["loss"] == rows[2]["loss"]
    end, again = (load_file(r.last / "trainable.safetensors") for r in (whole, resumed))
    assert set(end) == set(again) and all(torch.equal(end[k], again[k]) for k in end)


def test_cli_runs_the_stage_from_the_sft_checkpoint_config(adapter, tmp_path):
    out = tmp_path / "cli"
    flags = [f"--{k}={v}" for k, v in SMOKE.items() if k not in ("grpo.steps", "stage")]
    code = gmner_main(
        ["train", "--stage", "grpo", "--grpo.init", str(adapter), "--out", str(out)]
        + flags
        + ["--grpo.steps", "1"]
    )
    assert code == 0
    saved = load_config(out / "config.yaml")
    inherited = load_config(checkpoint_config(adapter))
    assert saved.stage == "grpo" and saved.model == inherited.model
    assert saved.data.prompt == inherited.data.prompt
    assert (out / "checkpoints" / "checkpoint-1" / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--stage", "grpo", "--out", "x"], "--grpo.init"),
        (["--stage", "grpo", "--grpo.init", "/nonexistent/ckpt"], "--grpo.init"),
        (["--stage", "grpo", "--grpo.init", "ADAPTER", "--recipe", "reference"], "--recipe"),
        (["--stage", "grpo", "--grpo.init", "ADAPTER", "--grpo.group_size", "1"], "group_size"),
        (["--stage", "grpo", "--grpo.init", "ADAPTER", "--grpo.iterations", "3"], "iterations"),
        (
            [
                "--stage",
                "grpo",
                "--grpo.init",
                "ADAPTER",
                "--out",
                "OUT",
                "--model.dtype",
                "float16",
            ],
            "--model.dtype",
        ),
    ],
)
def test_cli_errors_name_the_flag(adapter, argv, named, caplog, capsys, tmp_path):
    places = {"ADAPTER": str(adapter), "OUT": str(tmp_path / "out")}
    argv = [places.get(a, a) for a in argv]
    with caplog.at_level("ERROR"):
        assert gmner_main(["train", *argv]) != 0
    assert named in caplog.text + capsys.readouterr().err


def test_the_stage_refuses_to_write_into_its_starting_run(adapter):
    run = adapter.parent.parent  # RUN/checkpoints/step-N
    with pytest.raises(InputError, match="--out"):
        train_grpo(_cfg(adapter, run))


def test_a_new_run_refuses_a_folder_holding_another_runs_checkpoints(adapter, tmp_path):
    (tmp_path / "old" / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(InputError, match="--resume"):
        train_grpo(_cfg(adapter, tmp_path / "old"))


def test_the_stage_refuses_a_data_parallel_launch(adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="one process"):
        train_grpo(_cfg(adapter, tmp_path / "ddp"))


def test_a_best_folder_without_its_own_config_finds_its_runs(tmp_path):
    """``RUN/best`` written before best/ carried a config.yaml: the run's is used."""
    (tmp_path / "run" / "best").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("stage: sft\n")
    assert checkpoint_config(tmp_path / "run" / "best") == tmp_path / "run" / "config.yaml"
    (tmp_path / "config.yaml").write_text("stage: sft\n")  # a config two levels up
    (tmp_path / "run" / "adapter").mkdir()  # any other folder: only RUN/checkpoints/step-N
    assert checkpoint_config(tmp_path / "run" / "adapter") is None
    (tmp_path / "run" / "checkpoints" / "step-000002").mkdir(parents=True)
    step = tmp_path / "run" / "checkpoints" / "step-000002"
    assert checkpoint_config(step) == tmp_path / "run" / "config.yaml"


def test_dev_is_scored_at_each_checkpoint_and_test_once_with_the_best(adapter, tmp_path):
    run = tmp_path / "eval"
    scored = {
        "grpo.steps": 2,
        "grpo.save_every": 1,
        "eval.enabled": True,
        "eval.max_new_tokens": 8,
        "data.test_split": "dev",
    }
    result = train_grpo(_cfg(adapter, run, **scored))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in rows if "dev_gmner_f1" in r]
    assert [r["step"] for r in dev] == [1, 2]
    assert result.best_step in (1, 2) and result.best_f1 == max(r["dev_gmner_f1"] for r in dev)
    assert (run / "best" / "adapter_config.json").is_file()
    assert load_config(run / "best" / "config.yaml").stage == "grpo"
    assert json.loads((run / "test_scores.json").read_text())["protocols"]
    assert sum("test_gmner_f1" in r for r in rows) == 1
