"""The command line's conventions (#27): verbosity flags anywhere, ``python -m gmner``, path
lists, configuration flags with their docs and choices, error messages with their hints,
progress reports."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from gmner.runtime import cli

from gmner_rt import progress
from gmner_rt.cli_flags import add_path_list

REPO = Path(__file__).resolve().parents[2]


def test_verbosity_flags_work_anywhere_on_the_line(tmp_path, caplog, capsys):
    missing = str(tmp_path / "nothing.jpg")
    for argv in (
        ["-v", "extract", "--image", missing, "--text", "x"],
        ["extract", "-v", "--image", missing, "--text", "x"],
        ["extract", "--image", missing, "--text", "x", "--verbose"],
        ["extract", "--image", missing, "--text", "x", "-q"],
    ):
        assert cli.main(argv) == 2, argv  # parsed; the missing image is the error
    stats = ["data", "stats", str(Path(__file__).parents[1] / "fixtures" / "twitter-gmner-v2")]
    assert cli.main([*stats, "-q"]) == 0  # an action of a command takes them too
    with pytest.raises(SystemExit) as exc:
        cli.main(["extract", "-v", "-q", "--image", missing, "--text", "x"])
    assert exc.value.code == 2
    assert "exclude each other" in capsys.readouterr().err


def test_python_dash_m_gmner():
    out = subprocess.run(
        [sys.executable, "-m", "gmner", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("gmner ")
    helped = subprocess.run(
        [sys.executable, "-m", "gmner", "extract", "--help"], capture_output=True, text=True
    )
    assert helped.returncode == 0 and "--bundle" in helped.stdout


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_path_list(parser, "--images", help="image folders")
    return parser.parse_args(argv).images


def test_path_lists_take_repeats_and_commas_and_keep_everything():
    assert _parse(["--images", "a", "--images", "b,c", "--images", "d"]) == [
        Path(p) for p in "abcd"
    ]
    assert _parse([]) == []
    with pytest.raises(SystemExit):
        _parse(["--images", "a,,b"])


@pytest.mark.parametrize("command", ["train", "eval", "cot"])
def test_every_command_with_images_follows_the_one_convention(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert "repeat the flag or separate with commas" in " ".join(capsys.readouterr().out.split())


def test_data_sft_images_follow_it_too(capsys):
    with pytest.raises(SystemExit):
        cli.main(["data", "sft", "--help"])
    assert "repeat the flag or separate with commas" in " ".join(capsys.readouterr().out.split())


def test_train_help_shows_each_fields_doc_and_choices(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--optim.scheduler {cosine,constant} cosine or constant (after warmup)." in out
    assert "--grbp.distribution {gauss,uniform,reference}" in out
    assert "--eval.protocol {hindex,e2e}" in out
    assert "--lora.r INT LoRA rank. (default: 32)" in out
    assert "--recipe {reference}" in out


def test_bad_config_values_are_named_errors_without_traceback(tmp_path, caplog, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--optim.scheduler", "linear"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'linear' (choose from 'cosine', 'constant')" in err
    assert len(err.splitlines()) <= 3  # the short usage, not sixty flags
    assert cli.main(["train", "--optim.lr", "-1"]) == 2
    assert "--optim.lr must be > 0, got -1.0" in caplog.text
    bad = tmp_path / "run.yaml"
    bad.write_text("optim:\n  lr: fast\n", encoding="utf-8")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert f"{bad}: optim.lr: expected float, got 'fast'" in caplog.text
    bad.write_text("optim:\n  scheduler: linear\n", encoding="utf-8")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert f"{bad}: --optim.scheduler must be one of cosine, constant, got 'linear'" in caplog.text
    bad.write_text("optim:\n  epochs: 2.7\n", encoding="utf-8")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert f"{bad}: optim.epochs: expected int, got 2.7" in caplog.text
    bad.write_text("optim: [unclosed\n", encoding="utf-8")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert f"{bad}: not valid YAML" in caplog.text


def test_export_help_does_not_make_an_action_look_required(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: gmner export --model DIR [--adapter DIR] --out DIR")
    assert "optional: without one, gmner export writes a bundle" in out
    with pytest.raises(SystemExit):
        cli.main(["export", "merge", "--help"])
    assert capsys.readouterr().out.startswith("usage: gmner export merge [-h] --model MODEL")


def test_image_mistakes_are_named_before_any_bundle_loads(tmp_path, caplog, monkeypatch):
    import gmner.runtime.extract as extract

    def no_load(*a, **k):  # the bundle must not even be opened
        raise AssertionError("bundle loaded before the image was checked")

    monkeypatch.setattr(extract, "load_extractor", no_load)
    assert cli.main(["extract", "--image", str(tmp_path), "--text", "x"]) == 2
    assert f"{tmp_path}: is a folder, not an image file" in caplog.text
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("not a picture", encoding="utf-8")
    assert cli.main(["extract", "--image", str(text_file), "--text", "x"]) == 2
    assert f"{text_file}: not a readable image" in caplog.text
    assert cli.main(["extract", "--image", str(tmp_path / "gone.jpg"), "--text", "x"]) == 2
    assert "gone.jpg: image not found" in caplog.text


def test_a_checkpoint_given_as_bundle_points_at_gmner_export(tmp_path, caplog):
    from PIL import Image

    ckpt = tmp_path / "run" / "best"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_config.json").write_text("{}", encoding="utf-8")
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48)).save(image)
    assert cli.main(["extract", "--bundle", str(ckpt), "--image", str(image), "--text", "x"]) == 2
    assert "is a training checkpoint or run" in caplog.text
    assert f"gmner export --model BASE_MODEL_DIR --adapter {ckpt} --out BUNDLE_DIR" in caplog.text


def test_an_unknown_split_lists_the_splits_there(v2_subset, tmp_path, caplog):
    pred = tmp_path / "p.jsonl"
    pred.write_text("", encoding="utf-8")
    assert (
        cli.main(["eval", "--data", str(v2_subset), "--split", "valid", "--pred", str(pred)]) == 2
    )
    assert "no 'valid' split" in caplog.text and "splits here: train, dev" in caplog.text


def test_progress_logs_at_an_interval_off_a_terminal_and_nothing_when_quiet(caplog, monkeypatch):
    clock = iter(range(0, 1000, 7))  # each reading 7 s after the last
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    progress.configure(interval_s=20)
    try:
        with caplog.at_level(logging.INFO, logger="gmner.progress"):
            for _ in progress.track(range(10), desc="eval dev", unit="tweet"):
                pass
        lines = [r.getMessage() for r in caplog.records if r.name == "gmner.progress"]
        assert 2 <= len(lines) <= 5, lines  # a line per ~20 s of a ~70 s loop, and the end
        assert lines[0].startswith("eval dev: ") and "tweet" in lines[0] and "left" in lines[0]
        assert lines[-1].startswith("eval dev: 10/10 (100 %)") and lines[-1].endswith("(done)")
        caplog.clear()
        progress.configure(enabled=False)
        for _ in progress.track(range(10), desc="quiet"):
            pass
        assert not [r for r in caplog.records if r.name == "gmner.progress"]
    finally:
        progress.configure(enabled=True, interval_s=30)


def test_an_answer_cut_by_the_token_budget_is_announced(caplog):
    """A budget the reasoning uses up forces the answer closed early: the command says so,
    and the timings flag it; with room to spare, nothing is said."""
    import gmner_rt

    image = Path(__file__).parents[2] / "examples" / "demo" / "3000028.png"
    text = "Quillsoft , Port Alder"
    short = gmner_rt.load().extract(image, text, max_new_tokens=60)
    full = gmner_rt.load().extract(image, text)
    assert short.timings["budget_limited"] == 1 and full.timings["budget_limited"] == 0
    assert len(short.records) < len(full.records)
    assert cli.main(["extract", "--image", str(image), "--text", text]) == 0
    assert "budget" not in caplog.text
    assert (
        cli.main(["extract", "--image", str(image), "--text", text, "--max-new-tokens", "60"]) == 0
    )
    assert "generation stopped at the budget of 60 new tokens" in caplog.text
