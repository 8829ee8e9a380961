"""The tiny Qwen2.5-VL factory and the one model loader (gmner.train.tiny_model / modeling)."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gmner.runtime.cli import main  # noqa: E402
from gmner.train.modeling import (  # noqa: E402
    GmnerQwenProcessor,
    ModelDirError,
    load_model_and_processor,
    load_processor,
    resolve_dtype,
)
from gmner.train.tiny_model import (  # noqa: E402
    CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    REASONING_TOKENS,
    build_tiny_model,
    preset_config,
)
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from gmner_rt.errors import InputError  # noqa: E402

ROUND_TRIP_TEXTS = [
    "Hello world",
    "<think>Messi is in the photo.</think><answer>Lionel Messi|PER|[12,34,56,78]</answer>",
    "Fox &amp ; Fin Financial Group|ORG|[[0,0,10,10],[20,20,30,30]]; Paris|LOC|None",
    "  leading and trailing spaces  \n\ttabs\r\nand CRLF  ",
    "café São Paulo Zürich Москва 東京 서울 😀🎉 ❤️ 🔥🔥 new words: zyzzyva qwxv",
    "RT @user: #hashtag http://t.co/xYz?a=1&b=2 ~`^{}\\",
    "",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_model_and_processor(tiny_dir)


@pytest.fixture(scope="module")
def tokenizer(loaded):
    return loaded[1].tokenizer


def image_messages(text: str = "Find the entities.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def image_inputs(processor, size=(100, 80)):
    prompt = processor.apply_chat_template(
        image_messages(), tokenize=False, add_generation_prompt=True
    )
    image = Image.new("RGB", size, (200, 30, 90))
    return processor(text=[prompt], images=[image], return_tensors="pt")


def test_saved_directory_has_the_files_of_a_checkpoint(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "processor_config.json",
    } <= names


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips_text_exactly(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_reasoning_tags_are_single_tokens_kept_by_skip_special(tokenizer):
    for tag in REASONING_TOKENS:
        assert len(tokenizer.encode(tag, add_special_tokens=False)) == 1
    ids = tokenizer.encode("<|im_start|><think>x</think><|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>x</think>"


def test_demo_tokenizer_has_whole_tokens_for_the_demo_task(tokenizer):
    """The demo preset's vocabulary holds the synthetic task's words (names, glyph and cell
    words) and the instruction's, so its sequences are far shorter than the test tokenizer's."""
    from gmner.train.synth import NAMES
    from gmner.train.tiny_model import build_tokenizer

    from gmner_rt.prompt import instruction

    demo = build_tokenizer("demo")
    for name, (_, glyph) in NAMES.items():
        for word in (*name.split(), glyph.colour, glyph.shape):
            assert len(demo.encode(" " + word, add_special_tokens=False)) == 1, word
    for word in (" northwest", " southeast", " nowhere", "Glyphs"):
        assert len(demo.encode(word, add_special_tokens=False)) == 1, word
    prompt = instruction("Zentro meets Lake Ormond today", ("PER", "LOC", "ORG", "OTHER"))
    short = len(demo.encode(prompt, add_special_tokens=False))
    assert short < 0.65 * len(tokenizer.encode(prompt, add_special_tokens=False))
    assert demo.decode(demo.encode(prompt, add_special_tokens=False)) == prompt


def test_special_tokens_are_single_consecutive_ids(tokenizer):
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in QWEN_SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    flat = [i[0] for i in ids]
    assert flat == list(range(flat[0], flat[0] + len(flat)))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_config_token_ids_agree_with_tokenizer(loaded):
    model, processor = loaded
    tok, cfg = processor.tokenizer, model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.text_config.eos_token_id == tok.eos_token_id
    assert cfg.text_config.pad_token_id == tok.pad_token_id
    assert len(tok) <= cfg.text_config.vocab_size < len(tok) + 64
    assert model.get_input_embeddings().weight.shape[0] == cfg.text_config.vocab_size


def test_tiny_dims(loaded):
    text, vision = loaded[0].config.text_config, loaded[0].config.vision_config
    assert (
        text.hidden_size,
        text.num_hidden_layers,
        text.num_attention_heads,
        text.num_key_value_heads,
        text.intermediate_size,
    ) == (128, 2, 4, 2, 256)
    assert list(text.rope_parameters["mrope_section"]) == [4, 6, 6]
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (2, 64, 128)
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)


def test_chat_template_renders_system_image_and_generation_prompt(loaded):
    text = loaded[1].apply_chat_template(
        image_messages("hi"), tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_processor_expands_image_pad_to_merged_patch_count(loaded):
    model, processor = loaded
    inputs = image_inputs(processor, size=(100, 80))
    assert {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_grid_thw",
        "mm_token_type_ids",
    } <= set(inputs)
    grid = inputs["image_grid_thw"][0]
    assert grid.tolist() == [1, 6, 8]  # smart_resize(80, 100) = 84 x 112 pixels
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == int(grid.prod()) // 4
    assert inputs["pixel_values"].shape == (int(grid.prod()), 3 * 2 * 14 * 14)
    assert int(inputs["mm_token_type_ids"].sum()) == n_image_tokens


def test_apply_chat_template_tokenizes_with_image(loaded):
    processor = loaded[1]
    image = Image.new("RGB", (64, 64), (0, 0, 255))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}],
        }
    ]
    out = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    grid = out["image_grid_thw"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((out["input_ids"] == image_id).sum()) == int(grid.prod()) // 4


def test_forward_with_image_gives_finite_logits(loaded):
    model, processor = loaded
    inputs = image_inputs(processor)
    with torch.no_grad():
        logits = model(**inputs).logits
    seq = inputs["input_ids"].shape[1]
    assert logits.shape == (1, seq, model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_greedy_generate_is_deterministic(loaded):
    model, processor = loaded
    inputs = image_inputs(processor)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        first = model.generate(**inputs, **kwargs)
        second = model.generate(**inputs, **kwargs)
    prompt_len = inputs["input_ids"].shape[1]
    assert first.shape == (1, prompt_len + 6)
    assert torch.equal(first, second)


def test_same_seed_same_weights_other_seed_other_weights(tiny_dir, tmp_path):
    again = load_file(build_tiny_model(tmp_path / "again", seed=0) / "model.safetensors")
    other = load_file(build_tiny_model(tmp_path / "other", seed=1) / "model.safetensors")
    first = load_file(tiny_dir / "model.safetensors")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])


def test_biases_and_norm_weights_are_random(tiny_dir):
    weights = load_file(tiny_dir / "model.safetensors")
    biases = [k for k in weights if k.endswith("bias")]
    norms = [k for k in weights if "norm" in k or "ln_q" in k]
    assert any("q_proj.bias" in k for k in biases) and any("visual" in k for k in biases)
    # Saved under the checkpoint names of real Qwen2.5-VL files (model.layers.*, visual.*).
    assert "model.norm.weight" in norms and "visual.merger.ln_q.weight" in norms
    assert all(weights[k].abs().min() > 0 for k in biases)
    assert all(not torch.allclose(weights[k], torch.ones_like(weights[k])) for k in norms)


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json", "model.safetensors"])
def test_incomplete_directory_names_the_missing_file(tiny_dir, tmp_path, missing):
    broken = shutil.copytree(tiny_dir, tmp_path / "broken")
    (broken / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")) as err:
        load_model_and_processor(broken)
    assert isinstance(err.value, ModelDirError)


def test_missing_image_processor_config_is_named(tiny_dir, tmp_path):
    broken = shutil.copytree(tiny_dir, tmp_path / "broken")
    (broken / "preprocessor_config.json").unlink()
    (broken / "processor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        load_processor(broken)


def test_loads_a_real_checkpoint_layout_with_pixel_overrides(tiny_dir, tmp_path):
    """Qwen's own files: preprocessor_config.json with min/max_pixels, chat_template.json."""
    real = shutil.copytree(tiny_dir, tmp_path / "real")
    (real / "processor_config.json").unlink()
    (real / "chat_template.jinja").unlink()
    (real / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (real / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "min_pixels": 3136,
                "max_pixels": 12845056,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor",
            }
        )
    )
    processor = load_processor(real)
    assert processor.image_processor.size.longest_edge == 12845056
    assert "<|vision_start|><|image_pad|>" in processor.apply_chat_template(
        image_messages(), tokenize=False
    )
    small = load_processor(real, min_pixels=28 * 28, max_pixels=4 * 28 * 28)
    grid = image_inputs(small, size=(640, 480))["image_grid_thw"][0]
    assert int(grid.prod()) // 4 <= 4


def test_pixel_bounds_are_validated(tiny_dir):
    with pytest.raises(ValueError, match="min_pixels"):
        load_processor(tiny_dir, min_pixels=10_000, max_pixels=5_000)


def test_processor_save_and_load_round_trip(loaded, tmp_path):
    processor = loaded[1]
    processor.save_pretrained(tmp_path)
    again = GmnerQwenProcessor.from_pretrained(tmp_path)
    assert again.chat_template == processor.chat_template
    assert again.image_processor.size == processor.image_processor.size
    first, second = image_inputs(processor), image_inputs(again)
    assert torch.equal(first["input_ids"], second["input_ids"])
    assert torch.equal(first["pixel_values"], second["pixel_values"])


def test_load_in_bfloat16(tiny_dir):
    model, _ = load_model_and_processor(tiny_dir, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype(None) == torch.float32
    assert resolve_dtype("float16") == torch.float16
    assert resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8")


def test_bench_small_config_has_qwen_0_5b_text_dims():
    cfg = preset_config("bench-small")
    text, vision = cfg.text_config, cfg.vision_config
    assert (
        text.hidden_size,
        text.num_hidden_layers,
        text.num_attention_heads,
        text.num_key_value_heads,
        text.intermediate_size,
        text.vocab_size,
    ) == (896, 24, 14, 2, 4864, 151936)
    assert cfg.tie_word_embeddings
    assert list(text.rope_parameters["mrope_section"]) == [8, 12, 12]
    assert text.rope_parameters["rope_theta"] == 1e6
    assert vision.out_hidden_size == 896 and vision.depth == 4


def test_unknown_preset_and_non_empty_out_are_refused(tiny_dir):
    with pytest.raises(InputError, match="--preset"):
        preset_config("huge")
    with pytest.raises(InputError, match="--out"):
        build_tiny_model(tiny_dir)


def test_cli_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny-model", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--out" in out and "--preset" in out and "--seed" in out


def test_cli_writes_a_loadable_directory(tmp_path):
    out = tmp_path / "cli"
    assert main(["tiny-model", "--out", str(out), "--seed", "3"]) == 0
    processor = load_processor(out)
    assert processor.tokenizer.convert_tokens_to_ids("<think>") is not None
    assert main(["tiny-model", "--out", str(out)]) == 2  # not empty: refused, no traceback


def test_prompt_styles():
    from gmner_rt.prompt import PROMPT_STYLES, instruction

    labels = ("PER", "LOC", "ORG", "OTHER")
    texts = {
        (style, think): instruction("Zentro meets {x}", labels, think=think, style=style)
        for style in PROMPT_STYLES
        for think in (True, False)
    }
    ours = {k: v for k, v in texts.items() if k[0] != "reference"}
    assert len(set(ours.values())) == 4  # every style and mode words it differently
    for text in ours.values():
        assert text.endswith("\nText: Zentro meets {x}") and "PER, LOC, ORG, OTHER" in text
    assert len(texts["compact", True]) < len(texts["full", True]) / 5
    # the reference asks for reasoning in its system prompt, whatever the mode
    assert texts["reference", True] == texts["reference", False]
    assert texts["reference", True].endswith("\n\nText: Zentro meets {x}")
    with pytest.raises(ValueError, match="prompt style"):
        instruction("x", labels, style="short")
