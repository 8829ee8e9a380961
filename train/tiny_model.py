"""``gmner tiny-model``: write a random-weight Qwen2.5-VL checkpoint with a local tokenizer.

The directory it writes is loaded by :func:`gmner.train.modeling.load_model_and_processor`
like a real Qwen2.5-VL checkpoint: config and seeded random weights (safetensors), a byte-level
BPE tokenizer trained here on a few KB of embedded text (Qwen's pre-tokenizer regex and
special tokens, plus ``<think>``/``<answer>`` tags), a Qwen2-VL chat template, and the image
processor config. Biases and norm weights are random too, so an exporter that drops zero
biases or unit norms fails parity tests. Nothing is downloaded. The weights mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from gmner_rt.errors import InputError

from .modeling import GmnerQwenProcessor

log = logging.getLogger(__name__)

__all__ = [
    "CHAT_TEMPLATE",
    "PRESETS",
    "QWEN_SPECIAL_TOKENS",
    "REASONING_TOKENS",
    "Preset",
    "add_arguments",
    "build_tiny_model",
    "build_tokenizer",
    "preset_config",
    "run",
]

#: Qwen2.5-VL's special tokens, in Qwen's id order (151643 ... 151656 in the real vocabulary).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: Added as ordinary (not special) tokens, so they survive ``skip_special_tokens`` decoding.
REASONING_TOKENS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")

#: Qwen2-VL's chat template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: The tokenizer's training text: tweets, instructions and GMNER records.
CORPUS = """\
RT @NBA: LeBron James scores 40 points as the Lakers beat the Celtics 112-104 in Boston tonight!
Just landed in New York City with @TaylorSwift fans, so excited for the show #Eras2023
Happy birthday to Queen Elizabeth II, 96 years young today. God save the Queen!
Apple unveils the new iPhone 15 at its Cupertino event; Tim Cook says it is the best one yet.
Manchester United vs. Liverpool at Old Trafford: 2-2 after 90 minutes, what a game!!!
Watching Barack Obama and Michelle Obama speak at the Democratic convention in Philadelphia.
Fox &amp; Friends host interviews Elon Musk about Tesla, SpaceX and Twitter (now X).
The Eiffel Tower in Paris lights up in blue, white and red tonight <3 http://t.co/a1B2c3
Breaking: 3.5 magnitude earthquake near Los Angeles, California; no damage reported so far.
Can't wait for Coachella 2024 in Indio!! Who else is going? Drop a comment below :)
Kevin Durant &amp; Stephen Curry lead the Golden State Warriors past the Spurs, 118-97.
Microsoft and Google announce new AI models at the conference in San Francisco.
Our trip to the Grand Canyon with my dog Max was amazing... 10/10 would hike again.
Don't miss Game of Thrones on HBO this Sunday at 9pm ET / 6pm PT! #GoT #WinterIsComing
Lionel Messi joins Inter Miami; fans in Florida go wild at the DRV PNK Stadium.
Instruction: extract every named entity of type PER, LOC, ORG or OTHER from the tweet and
give the box of each entity that appears in the image, in the resized image's pixels.
Text: "Angela Merkel meets Emmanuel Macron in Berlin to talk about the European Union."
Reply with <think> your reasoning </think> then <answer> the records </answer>.
<think>The image shows two people at a podium. The woman on the left is Angela Merkel and
the man on the right is Emmanuel Macron; Berlin and the European Union are not visible.</think>
<answer>Angela Merkel|PER|[12,34,256,480]; Emmanuel Macron|PER|[270,30,511,470];
Berlin|LOC|None; European Union|ORG|None</answer>
<answer>None</answer>
<answer>Fox &amp; Fin Financial Group|ORG|[[0,0,100,50],[120,8,300,64]]</answer>
Numbers: 0 1 2 3 4 5 6 7 8 9 10 28 56 112 224 448 896 1024 2048 3136 12845056 151936.
Symbols: ( ) [ ] { } < > | ; : , . ! ? ' " @ # $ % ^ & * - _ + = / \\ ~ `
Unicode: café naïve résumé São Paulo Zürich München Ελλάδα Москва 東京 北京 서울 😀 🎉 ❤️ 🔥
"""


@dataclass(frozen=True)
class Preset:
    """Dimensions of a random Qwen2.5-VL model.

    Attributes:
        hidden_size: text hidden size (also the vision merger's output size).
        num_layers: text decoder layers.
        num_heads: text attention heads.
        num_kv_heads: text key/value heads (grouped-query attention).
        intermediate_size: text MLP size.
        mrope_section: M-RoPE split of head_dim / 2 into (temporal, height, width).
        vocab_size: embedding rows; 0 means the tokenizer size rounded up to a multiple of 64.
        tie_word_embeddings: share the embedding and the output projection.
        rope_theta: rotary base.
        max_position_embeddings: longest sequence the config declares.
        vision_depth: vision transformer blocks.
        vision_hidden_size: vision hidden size.
        vision_heads: vision attention heads.
        vision_intermediate_size: vision MLP size.
        fullatt_block_indexes: vision blocks with full (not windowed) attention.
        window_size: vision attention window in pixels (Qwen2.5-VL: 112).
        min_pixels: the image processor's smallest resized image, in pixels.
        max_pixels: the image processor's largest resized image, in pixels.
        dtype: dtype the weights are built and saved in ("float32" or "bfloat16").
        bpe_vocab_size: merges + bytes of the locally trained BPE vocabulary.
        corpus_extra: text added to :data:`CORPUS` (weighted, see :func:`_train_bpe`) when
            training the BPE, so a model for one task has whole-word tokens for that task's
            words, as a real Qwen vocabulary has for common words.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    mrope_section: tuple[int, int, int]
    vocab_size: int = 0
    tie_word_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_heads: int = 2
    vision_intermediate_size: int = 128
    fullatt_block_indexes: tuple[int, ...] = (1,)
    window_size: int = 112
    min_pixels: int = 56 * 56
    max_pixels: int = 64 * 28 * 28
    dtype: str = "float32"
    bpe_vocab_size: int = 1024
    corpus_extra: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _demo_corpus() -> str:
    """The demo task's text for the demo tokenizer: its instruction and synthetic words."""
    from gmner_rt.data import LABELS
    from gmner_rt.prompt import PROMPT_STYLES, instruction

    from .synth import corpus_text

    styles = "\n".join(instruction("", LABELS, style=s) for s in PROMPT_STYLES)
    return styles + "\n" + corpus_text()


#: ``tiny`` for tests (about 0.5 M parameters); ``bench-small`` has Qwen2.5-0.5B's text dims.
PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=256,
        mrope_section=(4, 6, 6),
    ),
    # The embedded demo model (gmner demo --retrain): tiny's widths, twice its depth; the
    # synthetic task needs several steps in a row (copy the name, find its glyph, read the
    # glyph's place, write digits), which two layers learn too slowly on a CPU. Tied
    # embeddings: a copied name comes out as the token it was read from (untied, names of
    # one type were swapped and repeated, and the demo scored 67 instead of 77 GMNER F1).
    "demo": Preset(
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=384,
        mrope_section=(4, 6, 6),
        tie_word_embeddings=True,
        vision_depth=2,
        vision_hidden_size=96,
        vision_heads=3,
        vision_intermediate_size=192,
        # 168 x 168: 6 x 6 image tokens, so each cell of the demo data's 3 x 3 grid is
        # 2 x 2 tokens
        max_pixels=168 * 168,
        bpe_vocab_size=2048,
        corpus_extra=_demo_corpus(),
    ),
    "bench-small": Preset(
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        mrope_section=(8, 12, 12),
        vocab_size=151936,
        tie_word_embeddings=True,
        vision_depth=4,
        vision_hidden_size=256,
        vision_heads=4,
        vision_intermediate_size=1024,
        fullatt_block_indexes=(1, 3),
        max_pixels=1280 * 28 * 28,
    ),
    # Qwen2.5-VL-3B's real dimensions (its config.json), random weights in bf16 as the real
    # checkpoint ships: for real-scale export and memory checks, not for tests.
    "qwen2.5-vl-3b": Preset(
        hidden_size=2048,
        num_layers=36,
        num_heads=16,
        num_kv_heads=2,
        intermediate_size=11008,
        mrope_section=(16, 24, 24),
        vocab_size=151936,
        tie_word_embeddings=True,
        vision_depth=32,
        vision_hidden_size=1280,
        vision_heads=16,
        vision_intermediate_size=3420,
        fullatt_block_indexes=(7, 15, 23, 31),
        max_pixels=1280 * 28 * 28,
        dtype="bfloat16",
    ),
}


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InputError(f"--preset: unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


#: How many times ``corpus_extra`` is repeated in the BPE's training text, so its words are
#: merged into whole tokens before the general corpus's rarer pairs.
_EXTRA_WEIGHT = 50


def _train_bpe(
    vocab_size: int = 1024, extra: str = ""
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges trained on :data:`CORPUS` and ``extra``
    (deterministic)."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = CORPUS.splitlines() + extra.splitlines() * _EXTRA_WEIGHT
    bpe.train_from_iterator(lines, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def build_tokenizer(preset: str = "tiny") -> Qwen2Tokenizer:
    """A Qwen2 tokenizer with a locally trained vocabulary and Qwen's special tokens.

    Ids: the BPE vocabulary (``preset``'s size and extra corpus), then
    :data:`QWEN_SPECIAL_TOKENS` in order, then :data:`REASONING_TOKENS`. Like Qwen's, it
    NFC-normalizes: text in NFC round-trips exactly.
    """
    chosen = _preset(preset)
    vocab, merges = _train_bpe(chosen.bpe_vocab_size, chosen.corpus_extra)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        errors="replace",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tokenizer.add_tokens(list(REASONING_TOKENS))
    tokenizer.eos_token = "<|im_end|>"
    expected = list(range(len(vocab), len(vocab) + len(QWEN_SPECIAL_TOKENS)))
    actual = tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    if actual != expected:
        raise RuntimeError(f"special token ids {actual} are not the expected {expected}")
    return tokenizer


def _round_up(value: int, multiple: int = 64) -> int:
    return -(-value // multiple) * multiple


def preset_config(name: str, tokenizer: Qwen2Tokenizer | None = None) -> Qwen2_5_VLConfig:
    """The model config of preset ``name``, with token ids taken from ``tokenizer``.

    ``tokenizer`` defaults to :func:`build_tokenizer`'s.
    """
    preset = _preset(name)
    tok = tokenizer if tokenizer is not None else build_tokenizer(name)
    ids = dict(
        zip(QWEN_SPECIAL_TOKENS, tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)), strict=True)
    )
    if 2 * sum(preset.mrope_section) != preset.head_dim:
        raise ValueError(
            f"preset {name}: mrope_section {preset.mrope_section} must sum to "
            f"head_dim / 2 = {preset.head_dim // 2}"
        )
    vocab_size = max(preset.vocab_size, _round_up(len(tok)))
    text = {
        "vocab_size": vocab_size,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_hidden_layers": preset.num_layers,
        "num_attention_heads": preset.num_heads,
        "num_key_value_heads": preset.num_kv_heads,
        "max_position_embeddings": preset.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "max_window_layers": preset.num_layers,
        "use_sliding_window": False,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": preset.rope_theta,
            "mrope_section": list(preset.mrope_section),
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": preset.tie_word_embeddings,
    }
    vision = {
        "depth": preset.vision_depth,
        "hidden_size": preset.vision_hidden_size,
        "intermediate_size": preset.vision_intermediate_size,
        "num_heads": preset.vision_heads,
        "out_hidden_size": preset.hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": preset.window_size,
        "tokens_per_second": 2,
        "fullatt_block_indexes": list(preset.fullatt_block_indexes),
        "in_channels": 3,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=preset.tie_word_embeddings,
    )


def randomize_biases_and_norms(model: torch.nn.Module, seed: int) -> None:
    """Give every bias N(0, 0.02) and every norm weight 1 + N(0, 0.1), from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    norm_weights = {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if "norm" in type(module).__name__.lower()
    }
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
            elif name in norm_weights:
                param.copy_(1.0 + torch.randn(param.shape, generator=gen) * 0.1)


def build_model(
    config: Qwen2_5_VLConfig, seed: int, dtype: torch.dtype = torch.float32
) -> Qwen2_5_VLForConditionalGeneration:
    """A model with seeded random weights (the global torch RNG is left untouched).

    The weights are created directly in ``dtype`` (a 3B model in fp32 would need 15 GB).
    """
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            model = Qwen2_5_VLForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(default)
    randomize_biases_and_norms(model, seed + 1)
    return model.eval()


def build_processor(preset: Preset, tokenizer: Qwen2Tokenizer) -> GmnerQwenProcessor:
    """The processor: PIL image processor (patch 14, merge 2, temporal 2, CLIP mean/std)."""
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=preset.min_pixels,
        max_pixels=preset.max_pixels,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    return GmnerQwenProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)


def _generation_config(config: Qwen2_5_VLConfig) -> GenerationConfig:
    text = config.text_config
    return GenerationConfig(
        bos_token_id=text.bos_token_id,
        pad_token_id=text.pad_token_id,
        eos_token_id=[text.eos_token_id, text.bos_token_id],
        do_sample=False,
    )


def build_tiny_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight Qwen2.5-VL directory to ``out_dir``; return its path.

    The same ``preset`` and ``seed`` give identical weights and files.
    """
    chosen = _preset(preset)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"--out: {out} is not empty; choose a new directory")
    started = time.perf_counter()
    tokenizer = build_tokenizer(preset)
    config = preset_config(preset, tokenizer)
    model = build_model(config, seed, dtype=getattr(torch, chosen.dtype))
    model.generation_config = _generation_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor = build_processor(chosen, tokenizer)
    processor.save_pretrained(out)
    # Real Qwen2.5-VL checkpoints carry the image processor in preprocessor_config.json too.
    processor.image_processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "wrote %s preset (%.1f M parameters, %d-token tokenizer, seed %d) to %s in %.1f s",
        preset,
        n_params / 1e6,
        len(tokenizer),
        seed,
        out,
        time.perf_counter() - started,
    )
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="new output directory")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="tiny: for tests (default); bench-small: Qwen2.5-0.5B text dims, about 2 GB; "
        "qwen2.5-vl-3b: the real 3B dimensions in bf16, about 7.5 GB",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")


def run(args: argparse.Namespace) -> int:
    build_tiny_model(args.out, preset=args.preset, seed=args.seed)
    return 0
