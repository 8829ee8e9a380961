"""``gmner train --recipe reference``: the reference's train_lora.sh, setting by setting."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from gmner.train.cli import add_arguments
from gmner.train.config import RECIPES, config_from_args, load_config

#: Every flag of the reference's scripts/train_lora.sh (and the train.py defaults it relies
#: on), with the value it sets and where that lands in gmner's configuration tree.
TRAIN_LORA_SH = {
    "--epochs 10": ("optim", "epochs", 10),
    "--batch_size 2": ("optim", "batch_size", 2),
    "--grad_accum_steps 8": ("optim", "grad_accum", 8),
    "--lr 5e-4": ("optim", "lr", 5e-4),
    "--weight_decay 0.1": ("optim", "weight_decay", 0.1),
    "--warmup_ratio 0.03": ("optim", "warmup_ratio", 0.03),
    "--max_length 2048": ("optim", "max_length", 2048),
    "--max_grad_norm 1.0 (default)": ("optim", "max_grad_norm", 1.0),
    "--seed 42 (default)": ("optim", "seed", 42),
    "--grad_ckpt": ("model", "gradient_checkpointing", "on"),
    "--min_pixels 256*28*28 (default)": ("model", "min_pixels", 256 * 28 * 28),
    "--max_pixels 1024*28*28 (default)": ("model", "max_pixels", 1024 * 28 * 28),
    "--lora_r 32": ("lora", "r", 32),
    "--lora_alpha 64": ("lora", "alpha", 64),
    "--lora_dropout 0.05": ("lora", "dropout", 0.05),
    "--lora_target_modules (default)": (
        "lora",
        "target_modules",
        r"^(model\.language_model.*\.(v_proj|q_proj|k_proj|down_proj|o_proj|up_proj|gate_proj))$",
    ),
    "--dev_batch_size 2": ("eval", "batch_size", 2),
    "--eval_max_new_tokens 512": ("eval", "max_new_tokens", 512),
    "--train_bbox_jitter": ("grbp", "enabled", True),
    "--jitter_beta 0.1": ("grbp", "beta", 0.1),
    "--jitter_gamma 0.1": ("grbp", "gamma", 0.1),
    "--jitter_iou_min 0.6 (default)": ("grbp", "tau", 0.6),
    "--jitter_tries 5 (default)": ("grbp", "tries", 5),
    "--jitter_dist gauss (default)": ("grbp", "distribution", "reference"),
    "--jitter_gauss_trunc_k 2.0 (default)": ("grbp", "truncation", 2.0),
    "--jitter_min_area 1024 (default)": ("grbp", "small_box_area", 1024),
    "--jitter_small_box_scale 0.5 (default)": ("grbp", "small_box_damping", 0.5),
    "--jitter_scale_min 0.2 (default)": ("grbp", "scale_min", 0.2),
    "--jitter_scale_max 5.0 (default)": ("grbp", "scale_max", 5.0),
    "--system_prompt (default)": ("data", "prompt", "reference"),
    "best epoch by dev/gmner/f1 of its evaluator": ("eval", "protocol", "e2e"),
}


def test_reference_recipe_sets_every_setting_of_train_lora_sh():
    assert "reference" in RECIPES
    cfg = load_config(recipe="reference")
    for flag, (section, name, value) in TRAIN_LORA_SH.items():
        assert getattr(getattr(cfg, section), name) == value, flag
    assert cfg.lora.enabled and cfg.data.use_cot


def _args(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_recipe_then_config_then_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("optim:\n  lr: 4.0e-5\ngrbp:\n  beta: 0.03\n", encoding="utf-8")
    args = _args(["--recipe", "reference", "--config", str(yaml_file), "--grbp.gamma", "0.03"])
    cfg = config_from_args(args, args.config, args.recipe)
    assert (cfg.optim.lr, cfg.grbp.beta, cfg.grbp.gamma) == (4e-5, 0.03, 0.03)
    assert cfg.grbp.tries == 5 and cfg.optim.grad_accum == 8  # the rest from the recipe
    assert config_from_args(_args([])).grbp.distribution == "gauss"  # no recipe: defaults


def test_unknown_recipe_is_refused():
    with pytest.raises(SystemExit):
        _args(["--recipe", "paper"])
    with pytest.raises(ValueError, match="--recipe: expected one of reference"):
        load_config(recipe="paper")


def test_print_config_shows_the_recipe_resolved(capsys):
    import yaml
    from gmner.runtime.cli import main as gmner_main

    assert (
        gmner_main(["train", "--recipe", "reference", "--print-config", "--optim.lr", "4e-5"]) == 0
    )
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["grbp"]["beta"] == 0.1 and tree["grbp"]["distribution"] == "reference"
    assert tree["optim"]["lr"] == 4e-5 and tree["data"]["prompt"] == "reference"


def test_the_demo_trains_on_a_fixed_thread_count_and_gives_the_callers_back(monkeypatch, tmp_path):
    """Same seed, same model needs the same thread count (the order of partial sums)."""
    torch = pytest.importorskip("torch")
    from gmner.train import demo_recipe, loop

    seen = []

    def fake_train(cfg):
        seen.append((torch.get_num_threads(), cfg.output.dir))
        run = Path(cfg.output.dir)
        (run / "checkpoints" / "step-000001").mkdir(parents=True)
        (run / "latest").write_text("step-000001")

    before = torch.get_num_threads()
    monkeypatch.setattr(loop, "train", fake_train)
    torch.set_num_threads(1 if demo_recipe.DEMO_THREADS != 1 else 2)
    try:
        other = torch.get_num_threads()
        last = demo_recipe.train_demo(tmp_path / "m", tmp_path / "d", tmp_path / "run")
        assert seen == [(demo_recipe.DEMO_THREADS, str(tmp_path / "run"))]
        assert last == tmp_path / "run" / "checkpoints" / "step-000001"
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(before)
