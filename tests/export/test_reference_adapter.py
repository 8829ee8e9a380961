"""An adapter trained by the E2E-GMNER reference code: a plain PEFT LoRA directory (no gmner
training config), exported with ``--prompt reference``, prompted token for token as the
reference's collator prompts it.

The reference's layout is rebuilt here from its code (Finch-coder/E2E-GMNER:
``data/collator.py`` builds a system turn with its default system prompt, then a user turn of
an image followed by the instruction of ``scripts/gmner_to_sft_data.py`` with the tweet
appended, the whole user text stripped; LoRA r 32, alpha 64, dropout 0.05 on the language
model's projections by the regex of ``cli/train.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

import torch  # noqa: E402
from gmner.runtime.cli import main as gmner_main  # noqa: E402
from PIL import Image  # noqa: E402

import gmner_rt  # noqa: E402
from gmner_rt.bundle import load_bundle  # noqa: E402
from gmner_rt.prompt import STYLES  # noqa: E402

#: The reference's texts, written out again here (not imported from gmner), so that a change
#: to gmner's copy is caught.
REFERENCE_SYSTEM = (
    "You are an information extraction assistant for grounded multimodal named entity "
    "recognition. Given the image and text, first think briefly and then answer in a strict "
    "XML-like format. The final output must contain exactly one <think>...</think> block "
    "followed by exactly one <answer>...</answer> block. Inside <answer>, output only "
    "structured entity triples in the format mention|type|[x1,y1,x2,y2], separated by '; '. "
    "If there is no entity, output <answer>None</answer>. Do not add any extra explanation "
    "outside the tags."
)
REFERENCE_INSTRUCTION = (
    "Perform grounded MNER by extracting entities from the text.\n"
    "For each entity, output `entity|type|[x1,y1,x2,y2]` if it is visible in the image; "
    "otherwise output `entity|type|None`.\n"
    "Separate multiple results with `;`, or output `None` if no entity is found.\n\n"
    "Use both textual evidence and visual evidence when available.\n\n"
    "Text: "
)
REFERENCE_TARGETS = (
    r"^(model\.language_model.*\.(v_proj|q_proj|k_proj|down_proj|o_proj|up_proj|gate_proj))$"
)
TEXTS = ["Zentro meets Lake Ormond today", "RT @nba : LeBron James in Miami {x} | y ;"]


def _reference_ids(processor, text: str, image) -> list[int]:
    """The prompt ids of the reference's collator (generation prompt, no target)."""
    messages = [
        {"role": "system", "content": REFERENCE_SYSTEM},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": (REFERENCE_INSTRUCTION + text).strip()},
            ],
        },
    ]
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[rendered], images=[image], return_tensors="pt")["input_ids"][0].tolist()


@pytest.fixture(scope="module")
def reference_adapter(tiny, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter with the reference's settings and non-zero B weights, saved as
    the reference saves it (``save_pretrained``: no config.yaml, no processor)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=32,
        lora_alpha=64,
        lora_dropout=0.05,
        bias="none",
        target_modules=REFERENCE_TARGETS,
    )
    from gmner.train.modeling import library_deprecations_filtered

    with library_deprecations_filtered():
        model = get_peft_model(model, lora)
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "lora_" not in n]
    assert adapted and not [n for n in adapted if "visual" in n], adapted
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp("reference") / "adapter"
    model.save_pretrained(out)
    assert (out / "adapter_config.json").is_file() and not (out / "config.yaml").exists()
    return out


def test_reference_style_texts_are_the_references():
    style = STYLES["reference"]
    assert style.system == REFERENCE_SYSTEM
    assert style.instruction("a tweet", ("PER",), think=True) == REFERENCE_INSTRUCTION + "a tweet"
    assert style.instruction("a tweet", ("PER",), think=False) == REFERENCE_INSTRUCTION + "a tweet"


def test_training_prompt_in_reference_style_is_the_references(tiny):
    """gmner's training prompt (style reference) equals the reference collator's, token for
    token, on the processor of the tiny model."""
    from gmner.export.merge import load_merged
    from gmner.train.dataset import encode_prompt

    _, processor, _ = load_merged(tiny, None)
    for i, text in enumerate(TEXTS):
        image = Image.new("RGB", (200 + 30 * i, 150), (10 * i, 90, 150))
        ours = encode_prompt(processor, {"text": text}, image, True, "reference")
        assert ours["input_ids"][0].tolist() == _reference_ids(processor, text, image), text


def test_plain_peft_adapter_export_needs_prompt_then_matches_reference(
    tiny, reference_adapter, tmp_path, caplog
):
    from gmner.export.merge import load_merged

    out = tmp_path / "bundle"
    base = ["export", "--model", str(tiny), "--adapter", str(reference_adapter), "--out", str(out)]
    assert gmner_main(base) == 2
    assert "no gmner training config" in caplog.text and "--prompt reference" in caplog.text
    assert not out.exists()

    assert gmner_main([*base, "--prompt", "reference"]) == 0  # parity checked on the way
    manifest = load_bundle(out).manifest
    assert manifest.prompt.system == REFERENCE_SYSTEM
    assert manifest.prompt.instruction_think == REFERENCE_INSTRUCTION + "{text}"
    assert manifest.parity["merge"]["kind"] == "lora"

    _, processor, _ = load_merged(tiny, reference_adapter)
    extractor = gmner_rt.load(out)
    for i, text in enumerate(TEXTS):
        image = Image.new("RGB", (224, 160 + 20 * i), (40, 90, 150))
        expected = _reference_ids(processor, text, image)
        grid = tuple(
            int(v) for v in processor(text=["<|image_pad|>"], images=[image])["image_grid_thw"][0]
        )
        assert extractor.prompt_ids(text, grid, think=True) == expected, text
    result = extractor.extract(Image.new("RGB", (224, 160)), TEXTS[0], max_new_tokens=16)
    assert result.image_size == (224, 160)
