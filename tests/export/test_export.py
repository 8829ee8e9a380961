"""Export: merge, the three ONNX graphs, parity against PyTorch, and the bundle they make.

The fixtures (conftest.py) give the tiny model a LoRA adapter trained for a few steps at a high
learning rate, so the merged weights differ from the base; every export runs the parity check.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gmner.export.build import BundleOptions, export_bundle  # noqa: E402
from gmner.export.merge import MergeError, load_merged, merge  # noqa: E402
from gmner.export.onnx_export import ExportSettings  # noqa: E402
from gmner.export.parity import ParityError, check_parity  # noqa: E402
from gmner.runtime.cli import main as gmner_main  # noqa: E402
from gmner.train.tiny_model import PRESETS, build_tiny_model  # noqa: E402

from gmner_rt.backends.onnxruntime import KvLayout, OrtGraphs  # noqa: E402
from gmner_rt.bundle import load_bundle  # noqa: E402
from gmner_rt.data import LABELS  # noqa: E402
from gmner_rt.prompt import instruction  # noqa: E402


def _lora_b_norm(adapter: Path) -> float:
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    return sum(float(v.norm()) for k, v in weights.items() if "lora_B" in k)


def test_fp32_bundle_passes_parity_with_identical_greedy_tokens(tiny_bundle, adapter):
    assert _lora_b_norm(adapter) > 0.01  # the adapter is not a no-op
    manifest = load_bundle(tiny_bundle).manifest
    parity = manifest.parity
    assert parity["passed"] and parity["dtype"] == "float32"
    assert parity["merge"]["kind"] == "lora"
    assert len(parity["greedy"]) == 5  # three batch-1 probes, one batch-2 probe (2 rows)
    assert all(g["agreed"] == g["length"] == 32 for g in parity["greedy"])
    errors = parity["max_relative_error"]
    assert set(errors) == {"vision", "embedding", "decoder"}
    assert {"logits@prefill", "logits@step", "present_key@prefill", "present_value@step"} <= set(
        errors["decoder"]
    )
    assert max(max(v.values()) for v in errors.values()) < 1e-4


def test_bundle_files_and_manifest(tiny_bundle, tiny):
    names = sorted(p.name for p in tiny_bundle.iterdir())
    assert names == [
        "README.md",
        "decoder.onnx",
        "embedding.onnx",
        "manifest.json",
        "tokenizer.json",
        "vision.onnx",
    ]
    m = load_bundle(tiny_bundle).manifest
    config = json.loads((tiny / "config.json").read_text())
    assert m.model.text.vocab_size == config["text_config"]["vocab_size"]
    assert m.tokens.image_pad_id == config["image_token_id"]
    assert m.image_processor["max_pixels"] == 224 * 224  # the adapter's training bounds
    assert m.format_version == 2
    assert m.graphs["decoder"].output("logits").shape == (
        "batch",
        "num_logits",
        m.model.text.vocab_size,
    )
    assert m.graphs["decoder"].input("logits_index").shape == ("num_logits",)
    assert m.parity["max_relative_error"]["decoder"]["logits@verify"] < 1e-4
    assert m.prompt.chat_template.startswith("<|im_start|>system\n{system}<|im_end|>")
    assert m.labels == ("PER", "LOC", "ORG", "OTHER")
    assert m.exporter["torch"] and m.exporter["onnxruntime"]


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_manifest_records_no_path_of_the_exporting_machine(tiny_bundle, tiny, adapter):
    raw = json.loads((tiny_bundle / "manifest.json").read_text(encoding="utf-8"))
    for text in _strings(raw):
        assert not text.startswith(("/", "~")) and ":\\" not in text, text
        for folder in (str(tiny), str(adapter), str(tiny.parent), "/tmp"):
            assert folder not in text, (folder, text)
    assert raw["model"]["source_model"] == tiny.name
    assert raw["model"]["adapter"] == f"{adapter.parent.name}/{adapter.name}"
    sources = raw["provenance"]["sources"]
    assert len(sources["base_config"]) == 64 and "adapter/adapter_model.safetensors" in sources
    assert raw["provenance"]["prompt_style"] == "full"


def test_the_shipped_bundle_records_no_path_and_has_a_card():
    from gmner_rt.extractor import DEFAULT_BUNDLE

    raw = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text(encoding="utf-8"))
    assert not [t for t in _strings(raw) if t.startswith(("/", "~"))]
    card = (DEFAULT_BUNDLE / "README.md").read_text(encoding="utf-8")
    assert "Prompt style `compact`" in card and "Labels: PER, LOC, ORG, OTHER." in card


def test_bundle_carries_a_model_card(tiny_bundle):
    card = (tiny_bundle / "README.md").read_text(encoding="utf-8")
    manifest = load_bundle(tiny_bundle).manifest
    assert card.startswith(f"# {manifest.model.name}: a gmner bundle")
    for expected in (
        "Labels: PER, LOC, ORG, OTHER.",
        "Precision: float32.",
        "Prompt style `full`",
        manifest.prompt.system,
        "## Parity",
        "passed",
        "Greedy tokens identical to PyTorch's",
        "LoRA merge checked",
        "## Intended use",
        "## Limits",
        "Training settings",
        "lr 0.005",
    ):
        assert expected in card, expected
    assert "/tmp" not in card
    assert "README.md" not in manifest.files  # documentation, not a file the runtime checks


def test_graph_io_are_dynamic(tiny_bundle):
    import onnx

    decoder = onnx.load(str(tiny_bundle / "decoder.onnx"), load_external_data=False)
    shapes = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(decoder.graph.input) + list(decoder.graph.output)
    }
    assert shapes["inputs_embeds"][:2] == ["batch", "sequence"]
    assert shapes["past_key_0"][2] == "past_sequence"
    assert shapes["present_value_1"][2] == "total_sequence"
    assert shapes["position_ids"] == [3, "batch", "sequence"]
    vision = onnx.load(str(tiny_bundle / "vision.onnx"), load_external_data=False)
    assert [d.dim_param for d in vision.graph.input[0].type.tensor_type.shape.dim][0] == (
        "num_patches"
    )


def test_fp16_export_keeps_last_vision_mlp_fp32_and_passes(tiny, adapter, tmp_path):
    out = export_bundle(
        BundleOptions(
            model=tiny,
            adapter=adapter,
            out=tmp_path / "fp16",
            settings=ExportSettings(dtype="float16"),
        )
    )
    m = load_bundle(out).manifest
    assert m.model.dtype == "float16" and m.kv_cache.dtype == "float16"
    assert m.parity["fp32_vision_mlps"] == [1]  # tiny has 2 vision blocks
    assert m.parity["passed"] and m.parity["tolerance"] == pytest.approx(2e-2)
    assert m.graphs["decoder"].input("inputs_embeds").dtype == "float16"
    assert m.graphs["vision"].input("pixel_values").dtype == "float32"


def test_parity_names_the_graph_and_tensor_that_differ(tiny_bundle, tiny, adapter):
    model, processor, _ = load_merged(tiny, adapter)
    m = load_bundle(tiny_bundle).manifest
    graphs = OrtGraphs(
        {n: tiny_bundle / f"{n}.onnx" for n in ("vision", "embedding", "decoder")},
        KvLayout(
            m.kv_cache.num_layers, m.kv_cache.num_kv_heads, m.kv_cache.head_dim, np.dtype("float32")
        ),
    )
    with torch.no_grad():
        model.model.language_model.layers[0].mlp.down_proj.weight.mul_(1.5)
    with pytest.raises(ParityError) as caught:
        check_parity(
            model, processor, graphs, "float32", eos_ids=m.tokens.eos_ids, pad_id=m.tokens.pad_id
        )
    message = str(caught.value)
    assert "decoder.onnx logits on batch0[224x160]:prefill" in message
    assert "vision.onnx" not in message  # only the changed graph is named
    assert "present_key_1" in message and "relative" in message
    assert "present_key_0" not in message  # layer 0 attention comes before the change


def test_tied_embeddings_and_external_data(tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny-tied", replace(PRESETS["tiny"], tie_word_embeddings=True))
    model_dir = build_tiny_model(tmp_path / "tied", preset="tiny-tied")
    out = export_bundle(
        BundleOptions(
            model=model_dir,
            adapter=None,
            out=tmp_path / "bundle",
            settings=ExportSettings(max_inline_bytes=1),  # force external data on every graph
        )
    )
    m = load_bundle(out).manifest
    assert m.model.text.tie_word_embeddings
    for name in ("vision", "embedding", "decoder"):
        assert m.graphs[name].data_file == f"{name}.onnx.data"
        assert (out / f"{name}.onnx.data").stat().st_size > 10_000
        assert (out / f"{name}.onnx").stat().st_size < 200_000
    assert m.parity["passed"] and m.parity["merge"]["kind"] == "base"


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_parity(tiny, tmp_path):
    out = export_bundle(
        BundleOptions(
            model=tiny,
            adapter=None,
            out=tmp_path / "dynamo",
            settings=ExportSettings(exporter="dynamo"),
        )
    )
    m = load_bundle(out).manifest
    assert m.parity["passed"]
    assert all(g["agreed"] == 32 for g in m.parity["greedy"])


def test_merge_writes_a_model_dir_and_is_idempotent(tiny, adapter, tmp_path):
    out = merge(tiny, adapter, tmp_path / "merged")
    info = json.loads((out / "merge_info.json").read_text())
    assert info["kind"] == "lora" and info["max_abs_logit_diff"] < 1e-4
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert merge(tiny, adapter, out) == out  # same inputs: nothing to do
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # The merged directory exports without an adapter and its graphs match the merged model.
    merged_model, _, report = load_merged(out)
    ref_model, _, _ = load_merged(tiny, adapter)
    assert report.kind == "base"
    for (name, a), (_, b) in zip(
        merged_model.state_dict().items(), ref_model.state_dict().items(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name


def test_merge_errors_name_the_missing_file(tiny, adapter, tmp_path):
    broken = tmp_path / "adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with pytest.raises(MergeError, match=r"adapter\S* .*missing adapter weights"):
        merge(tiny, broken, tmp_path / "out")
    with pytest.raises(MergeError, match="missing adapter_config.json"):
        merge(tiny, tmp_path, tmp_path / "out2")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        merge(tiny, adapter, tmp_path / "taken")


def test_cli_export_and_its_errors(tiny, tmp_path, caplog):
    out = tmp_path / "b"
    code = gmner_main(
        [
            "export",
            "--model",
            str(tiny),
            "--out",
            str(out),
            "--no-verify",
            "--max-image-tokens",
            "16",
            "--prompt",
            "compact",
        ]
    )
    assert code == 0
    m = load_bundle(out).manifest
    assert m.prompt.instruction_think == instruction("{text}", LABELS, style="compact")
    assert m.prompt.instruction_answer_only == instruction(
        "{text}", LABELS, think=False, style="compact"
    )
    assert m.parity["merge"]["kind"] == "base" and "checks" not in m.parity  # not verified
    assert m.image_processor["max_pixels"] == 16 * 28 * 28
    assert m.model.vision.max_image_tokens == 16
    assert gmner_main(["export", "--model", str(tiny), "--out", str(out)]) == 2
    assert "exists and is not an empty directory" in caplog.text
    assert (
        gmner_main(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    )
    assert "nope does not exist" in caplog.text
    assert gmner_main(["export", "--out", str(tmp_path / "d")]) == 2
    assert "--model" in caplog.text
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob("*.tmp-*"))


def test_bundle_prompt_follows_the_training_config(adapter, tmp_path):
    """Without --prompt the bundle is written in the style (and system prompt) the
    checkpoint was trained with: its config.yaml, or the run folder's two levels up; an
    adapter with no config at all needs --prompt; a bad value names the file."""
    from gmner.export.build import resolve_prompt, trained_prompt
    from gmner.train.config import load_config, save_config

    from gmner_rt.prompt import STYLES

    assert trained_prompt(None) == ("full", "")
    assert trained_prompt(adapter) == ("full", "")  # the fixture trained with the default
    ckpt = tmp_path / "run" / "checkpoints" / "step-000003"
    ckpt.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no gmner training config.*--prompt"):
        trained_prompt(ckpt)  # no config anywhere
    assert trained_prompt(ckpt, "reference") == ("reference", "")
    save_config(
        load_config(None, {"data.prompt": "compact", "data.system_prompt": "Be brief."}),
        tmp_path / "run" / "config.yaml",
    )
    assert trained_prompt(ckpt) == ("compact", "Be brief.")
    options = BundleOptions(model=tmp_path, adapter=ckpt, out=tmp_path / "b")
    assert resolve_prompt(options) == ("compact", "Be brief.")
    assert resolve_prompt(replace(options, prompt="full")) == ("full", "Be brief.")
    assert resolve_prompt(replace(options, prompt="reference", system_prompt="")) == (
        "reference",
        STYLES["reference"].system,
    )
    (ckpt / "config.yaml").write_text("data:\n  prompt: terse\n")
    with pytest.raises(ValueError, match=r"config.yaml: --data.prompt must be one of .*'terse'"):
        trained_prompt(ckpt)
    with pytest.raises(ValueError, match="prompt: expected one of"):
        BundleOptions(model=tmp_path, adapter=None, out=tmp_path / "c", prompt="terse")


def test_provider_parity_holds_a_provider_to_the_exports_check(tiny, adapter, tiny_bundle):
    """What the GPU check runs on CUDA (scripts/gpu_check.sh), here on the CPU provider: the
    export's own probes, tensors and greedy tokens against the PyTorch model."""
    from gmner.export.provider_parity import provider_parity

    report = provider_parity(tiny, tiny_bundle, "cpu", adapter=adapter)
    assert report["passed"] and report["failures"] == []
    assert report["provider"] == "cpu" and report["bundle_dtype"] == "float32"
    assert report["checks"] > 10 and set(report["max_relative_error"]) >= {"decoder", "vision"}
    assert report["providers"]["decoder"] == ["CPUExecutionProvider"]


def test_provider_parity_reports_a_mismatch_without_raising(tiny, tiny_bundle):
    """Against the base model without the adapter, the merged bundle's logits differ."""
    from gmner.export.provider_parity import provider_parity

    report = provider_parity(tiny, tiny_bundle, "cpu")
    assert not report["passed"] and any("decoder" in f for f in report["failures"])
