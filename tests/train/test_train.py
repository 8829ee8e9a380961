"""Training on CPU with the tiny model: labels mask, loss goes down, exact resume, evaluation."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from gmner.runtime.cli import main as gmner_main  # noqa: E402
from gmner.runtime.evaluate import score_file  # noqa: E402
from gmner.train.augment import GRBPConfig  # noqa: E402
from gmner.train.config import TrainConfig, checkpoint_config, load_config  # noqa: E402
from gmner.train.dataset import (  # noqa: E402
    IGNORE_INDEX,
    ExampleSettings,
    encode_example,
    example_settings,  # noqa: E402
    load_image,
    prompt_messages,
    target_text,
)
from gmner.train.loop import latest_checkpoint, load_rows, train  # noqa: E402
from gmner.train.modeling import load_model_and_processor  # noqa: E402
from gmner.train.tiny_model import build_tiny_model  # noqa: E402
from PIL import Image  # noqa: E402

from gmner_rt.data import load_split  # noqa: E402
from gmner_rt.records import parse_output  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "fixtures" / "twitter-gmner-v2"
SMALL_PIXELS = {"model.min_pixels": 56 * 56, "model.max_pixels": 224 * 224}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Plain images of the sizes the fixture's XML gives (320 x 240 without XML)."""
    folder = tmp_path_factory.mktemp("images")
    for split in ("train", "dev"):
        for t in load_split(FIXTURE, split):
            w, h = t.image_size or (320, 240)
            Image.new("RGB", (w, h), (30 + len(t.text) % 200, 90, 150)).save(
                folder / f"{t.img_id}.jpg"
            )
    return folder


def _cfg(tiny: Path, images: Path, out: Path, **overrides) -> TrainConfig:
    values = {
        "model.path": str(tiny),
        "data.dir": str(FIXTURE),
        "data.images": str(images),
        "data.use_cot": False,
        "output.dir": str(out),
        "optim.batch_size": 2,
        "optim.grad_accum": 2,
        "optim.epochs": 1,
        "data.limit": 8,
        "eval.enabled": False,
        **SMALL_PIXELS,
        **overrides,
    }
    return load_config(None, values)


def _settings(cfg: TrainConfig, **kw) -> ExampleSettings:
    return replace(example_settings(cfg), **kw)


def _grounded_row(rows: list[dict]) -> dict:
    return next(r for r in rows if any(rec["boxes"] for rec in r["records"]))


def test_labels_cover_only_the_assistant_turn(tiny, images, tmp_path):
    cfg = _cfg(tiny, images, tmp_path)
    _, processor = load_model_and_processor(
        tiny, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels
    )
    row = dict(_grounded_row(load_rows(cfg)["train"]), think="The image shows a person.")
    settings = _settings(cfg, use_cot=True)
    example = encode_example(processor, row, settings, epoch=None, index=0)
    kept = example["input_ids"][example["labels"] != IGNORE_INDEX]
    decoded = processor.tokenizer.decode(kept)
    target = target_text(row, settings, None, 0)
    assert decoded == target + "<|im_end|>"
    assert decoded.startswith("<think>The image shows a person.</think><answer>")
    # The prompt part is exactly what the chat template renders for the whole conversation.
    image = load_image(row["images"][0])
    full = processor.apply_chat_template(
        [
            *prompt_messages(row, image, True),
            {"role": "assistant", "content": [{"type": "text", "text": target}]},
        ],
        tokenize=False,
    )
    full_ids = processor(text=[full], images=[image], return_tensors="pt")["input_ids"][0]
    n = example["input_ids"].numel()
    assert torch.equal(full_ids[:n], example["input_ids"])
    assert (example["labels"][: n - kept.numel()] == IGNORE_INDEX).all()


def test_grbp_redraws_target_boxes_each_epoch_and_never_at_evaluation(tiny, images, tmp_path):
    cfg = _cfg(tiny, images, tmp_path)
    row = _grounded_row(load_rows(cfg)["train"])
    settings = _settings(cfg, grbp=GRBPConfig(beta=0.2, gamma=0.2, tau=0.1))
    clean = target_text(row, settings, None, 3)
    epochs = {target_text(row, settings, e, 3) for e in range(6)}
    assert target_text(row, settings, 2, 3) == target_text(row, settings, 2, 3)
    assert len(epochs) >= 3  # six epochs of strong noise: fresh boxes, not one fixed draw
    assert parse_output(clean).records[0].mention == parse_output(epochs.pop()).records[0].mention
    off = _settings(cfg, grbp=GRBPConfig(enabled=False))
    assert target_text(row, off, 5, 3) == clean


def test_a_few_steps_lower_the_loss(tiny, images, tmp_path):
    cfg = _cfg(
        tiny,
        images,
        tmp_path / "run",
        **{
            "data.limit": 4,
            "optim.epochs": 8,
            "optim.lr": 5e-3,
            "optim.grad_accum": 1,
            "optim.warmup_ratio": 0.0,
            "optim.scheduler": "constant",
            "grbp.enabled": False,
        },
    )
    pos = train(cfg)
    first, last = pos.losses[:2], pos.losses[-2:]
    assert sum(last) < 0.8 * sum(first), pos.losses


def test_resume_reproduces_the_uninterrupted_losses(tiny, images, tmp_path):
    """Also with two DataLoader workers (against none): an example depends on (seed, epoch,
    index) alone, so the losses are the same floats whoever builds it, across the epoch
    boundary (persistent workers, GRBP redrawn) and after a resume."""
    overrides = {"optim.epochs": 2, "output.save_every": 1, "lora.dropout": 0.3}
    full = train(_cfg(tiny, images, tmp_path / "a", **overrides))
    assert full.step == 4
    cut = _cfg(tiny, images, tmp_path / "b", **overrides, **{"data.num_workers": 2})
    assert cut.grbp.enabled
    train(cut, stop_after_steps=3)
    # A kill mid-write leaves a temporary folder behind; resume must ignore it.
    (tmp_path / "b" / "checkpoints" / "step-000004.tmp-999").mkdir()
    resumed = train(cut, resume=True)
    assert resumed.step == 4
    assert resumed.losses == full.losses  # same floats, not approximately
    assert latest_checkpoint(tmp_path / "b").name == "step-000004"


def test_training_evaluates_dev_keeps_best_and_scores_test(tiny, images, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(
        tiny,
        images,
        run,
        **{
            "eval.enabled": True,
            "eval.max_new_tokens": 8,
            "data.test_split": "dev",
            "data.limit": 4,
        },
    )
    train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("dev_gmner_f1" in r and "dev_loss" in r for r in rows)
    assert any("test_gmner_f1" in r for r in rows)
    assert (run / "best" / "adapter_config.json").is_file()
    saved = load_config(run / "config.yaml")
    assert saved == cfg
    # best/ carries its config (what export and the grpo stage start from)
    assert load_config(checkpoint_config(run / "best")) == cfg
    # The test predictions are in the `gmner eval --pred` format and score the same there.
    scores = json.loads((run / "test_scores.json").read_text())
    report = score_file(FIXTURE, "dev", run / "test_pred.jsonl")
    assert scores["gmner"]["predicted"] == report.gmner.predicted
    assert report.missing == 30 - 4  # only the first 4 dev tweets were evaluated
    # both protocols every epoch, the configured one (hindex) selecting; the predictions
    # carry the raw model-space text that e2e scores, and score the same from the file
    dev_rows = [r for r in rows if "dev_gmner_f1" in r]
    assert all(r["dev_protocol"] == "hindex" for r in dev_rows)
    assert all(r["dev_gmner_f1"] == r["dev_hindex_gmner_f1"] for r in dev_rows)
    assert all("dev_e2e_gmner_f1" in r and "dev_e2e_eeg_f1" in r for r in dev_rows)
    assert scores["protocols"]["hindex"] == {k: v for k, v in scores.items() if k != "protocols"}
    e2e = score_file(FIXTURE, "dev", run / "test_pred.jsonl", "e2e").as_dict()
    in_training = scores["protocols"]["e2e"]
    for task in ("gmner", "mner", "eeg"):  # the file's gold also counts the 26 unscored tweets
        for key in ("correct", "predicted"):
            assert in_training[task][key] == e2e[task][key], (task, key)
    assert (in_training["malformed"], in_training["protocol"]) == (e2e["malformed"], "e2e")


def test_gmner_eval_scores_a_checkpoint(tiny, images, tmp_path):
    run = tmp_path / "run"
    train(_cfg(tiny, images, run, **{"data.limit": 2, "optim.grad_accum": 1}))
    pred = tmp_path / "pred.jsonl"
    code = gmner_main(
        [
            "eval",
            "--model",
            str(tiny),
            "--adapter",
            str(latest_checkpoint(run)),
            "--data",
            str(FIXTURE),
            "--split",
            "dev",
            "--images",
            str(images),
            "--out",
            str(pred),
            "--max-new-tokens",
            "4",
            "--json",
            str(tmp_path / "s.json"),
        ]
    )
    assert code == 0
    lines = pred.read_text().splitlines()
    assert len(lines) == 30 and all(json.loads(x)["output"] is not None for x in lines)
    assert json.loads((tmp_path / "s.json").read_text())["gmner"]["gold"] > 0


def test_config_yaml_flags_and_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1.0e-4\nlora:\n  r: 8\ngrbp:\n  beta: 0.1\n")
    cfg = load_config(path, {"optim.epochs": "3", "grbp.enabled": "false"})
    assert (cfg.optim.lr, cfg.lora.r, cfg.optim.epochs, cfg.grbp.beta) == (1e-4, 8, 3, 0.1)
    assert cfg.grbp.enabled is False and cfg.lora.alpha == 64  # paper default kept
    with pytest.raises(ValueError, match="optim.lr"):
        load_config(None, {"optim.lr": -1})
    with pytest.raises(ValueError, match="optim.bogus"):
        load_config(None, {"optim.bogus": 1})
    with pytest.raises(SystemExit) as exc:
        gmner_main(["train", "--help"])
    assert exc.value.code == 0


def test_vision_tower_trains_at_its_own_rate(tiny, images, tmp_path):
    from gmner.train.loop import make_optimizer, prepare_model

    cfg = _cfg(
        tiny,
        images,
        tmp_path,
        **{"lora.enabled": False, "lora.train_vision": True, "optim.vision_lr_scale": 0.05},
    )
    model, _ = prepare_model(cfg, torch.device("cpu"))
    opt, _ = make_optimizer(model, cfg, total_steps=10)
    main, vision = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("visual" in names[id(p)] for p in vision["params"])
    assert not any("visual" in names[id(p)] for p in main["params"])
    assert len(main["params"]) + len(vision["params"]) == len(list(model.parameters()))
    assert vision["initial_lr"] == pytest.approx(0.05 * main["initial_lr"])
    assert main["initial_lr"] == cfg.optim.lr
    # a frozen tower leaves one group
    frozen = _cfg(tiny, images, tmp_path, **{"lora.enabled": False})
    model, _ = prepare_model(frozen, torch.device("cpu"))
    assert len(make_optimizer(model, frozen, total_steps=10)[0].param_groups) == 1
    with pytest.raises(ValueError, match="optim.vision_lr_scale"):
        load_config(None, {"optim.vision_lr_scale": 0})


def test_compact_prompt_reaches_examples_and_generation_prompts(tiny, images, tmp_path):
    """``data.prompt`` picks the instruction's wording for training examples and for the
    prompts that evaluation generates from; a bad value names the flag."""
    from gmner.train.dataset import prompt_example

    full = _cfg(tiny, images, tmp_path)
    compact = _cfg(tiny, images, tmp_path, **{"data.prompt": "compact"})
    _, processor = load_model_and_processor(tiny, min_pixels=56 * 56, max_pixels=224 * 224)
    row = _grounded_row(load_rows(full)["train"])
    lengths = {}
    for cfg in (full, compact):
        example = encode_example(processor, row, example_settings(cfg), epoch=None, index=0)
        prompt = prompt_example(processor, row, cfg.data.use_cot, cfg.data.prompt)
        n = int((example["labels"] == IGNORE_INDEX).sum())
        # the training example's prompt is exactly the generation prompt
        assert torch.equal(example["input_ids"][:n], prompt["input_ids"])
        text = processor.tokenizer.decode(prompt["input_ids"])
        assert f"Text: {row['text']}" in text
        lengths[cfg.data.prompt] = n
        assert ("Perform grounded multimodal" in text) == (cfg.data.prompt == "full")
    assert lengths["compact"] < lengths["full"]
    with pytest.raises(ValueError, match="data.prompt"):
        load_config(None, {"data.prompt": "terse"})


def test_metrics_log_tokens_per_step(tiny, images, tmp_path):
    cfg = _cfg(tiny, images, tmp_path, **{"optim.max_steps": 2})
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # every step runs grad_accum batches of batch_size examples, each longer than its image
    assert all(r["tokens"] > 4 * 16 for r in steps)
    assert all(r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_time_s"]) for r in steps)
    assert all("peak_gpu_gib" not in r for r in steps)  # CPU run


def test_real_scale_summary_and_its_cpu_refusal(tmp_path, monkeypatch):
    real_scale = pytest.importorskip("gmner.bench.train_at_scale")

    rows = [
        {"step_time_s": 4.0, "tokens": 100, "peak_gpu_gib": 3.0, "loss": 2.0},
        {"step_time_s": 1.0, "tokens": 300, "peak_gpu_gib": 5.0, "loss": 1.5},
        {"step_time_s": 3.0, "tokens": 300, "peak_gpu_gib": 4.0, "loss": 1.0},
    ]
    summary = real_scale._summary(rows, warmup=1)
    assert summary["tokens_per_s"] == pytest.approx(600 / 4.0)  # step 1 left out
    assert summary["step_time_s_median"] == 2.0 and summary["timed_steps"] == 2
    assert summary["peak_gpu_gib"] == 5.0 and summary["first_step_s"] == 4.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        real_scale.main(["--work", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing built or written


def test_a_run_stopped_after_its_last_step_still_evaluates_on_resume(tiny, images, tmp_path):
    """Stopped right after the last step's checkpoint (save_every), before the epoch's end:
    the resumed run evaluates dev and scores test as the uninterrupted run does, and logs each
    row once."""
    over = {
        "output.save_every": 1,
        "eval.enabled": True,
        "eval.max_new_tokens": 4,
        "data.test_split": "dev",
        "data.limit": 4,
    }
    full = train(_cfg(tiny, images, tmp_path / "a", **over))
    cfg = _cfg(tiny, images, tmp_path / "b", **over)
    train(cfg, stop_after_steps=full.step)
    resumed = train(cfg, resume=True)
    assert resumed.epoch == full.epoch == 1 and resumed.step == full.step

    def keys(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [
            (r.get("step"), tuple(sorted(k for k in r if not k.endswith(("_s", "per_s")))))
            for r in rows
        ]

    assert keys(tmp_path / "b") == keys(tmp_path / "a")
    assert (tmp_path / "b" / "test_scores.json").is_file()


def test_real_scale_profile_records_a_trace_and_its_top_ops(tiny, images, tmp_path):
    """The GPU benchmark's ``--profile`` path, on the CPU: steps after the first recorded."""
    real_scale = pytest.importorskip("gmner.bench.train_at_scale")
    cfg = _cfg(tiny, images, tmp_path / "run", **{"optim.max_steps": 2, "data.limit": 8})
    table = real_scale.profiled_train(cfg, tmp_path / "prof", skip=1, active=1, top=5)
    trace = json.loads((tmp_path / "prof" / "trace.json").read_text())
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
    assert "aten::" in table and table == (tmp_path / "prof" / "top_ops.txt").read_text()[:-1]
    assert len([r for r in table.splitlines() if "aten::" in r]) <= 5


def test_a_run_shorter_than_an_epoch_leaves_a_checkpoint_and_no_false_best(
    tiny, images, tmp_path, caplog
):
    """--optim.max_steps below an epoch: the last step is checkpointed (resumable and
    exportable), and the command says there is no best/ instead of 'F1 -1 at step -1'."""
    run = tmp_path / "run"
    argv = [
        "train", "--model", str(tiny), "--data", str(FIXTURE), "--images", str(images),
        "--out", str(run), "--no-cot", "--optim.batch_size", "1", "--optim.grad_accum", "1",
        "--optim.max_steps", "2", "--data.limit", "6", "--eval.enabled", "false",
        "--model.min_pixels", str(SMALL_PIXELS["model.min_pixels"]),
        "--model.max_pixels", str(SMALL_PIXELS["model.max_pixels"]),
    ]  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert gmner_main(argv) == 0
    assert (run / "latest").read_text().strip() == "step-000002"
    assert (run / "checkpoints" / "step-000002" / "adapter_config.json").is_file()
    assert "no dev evaluation ran, so there is no best/ checkpoint" in caplog.text
    assert "-1.0000" not in caplog.text and not (run / "best").exists()


def test_training_without_a_cot_file_warns_that_think_blocks_are_empty(
    tiny, images, tmp_path, caplog
):
    from gmner.train.loop import load_rows

    load_rows(_cfg(tiny, images, tmp_path, **{"data.use_cot": True, "data.limit": 2}))
    assert "no --cot file: the prompt asks for reasoning" in caplog.text
    caplog.clear()
    load_rows(_cfg(tiny, images, tmp_path, **{"data.limit": 2}))  # --no-cot: nothing to say
    assert "no --cot file" not in caplog.text
