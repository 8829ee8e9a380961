"""The ``gmner`` console command: help, ``data stats``, ``eval --pred`` and the import boundary.

None of these tests imports torch in the test process; ``tiny-model --help`` (whose module
imports torch) runs in a subprocess.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from gmner.runtime import cli

from gmner_rt.data import load_split, split_stats
from gmner_rt.records import format_answer

REPO = Path(__file__).resolve().parents[2]


def _errors(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def _run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


# ---------------------------------------------------------------------------------------------
# Help, version, unknown commands
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "usage", "mentions"),
    [
        ([], "usage: gmner", ["data", "eval", "train", "tiny-model", "cot"]),
        (["data"], "usage: gmner data", ["stats", "sft"]),
        (["data", "stats"], "usage: gmner data stats", ["--json", "dir"]),
        (
            ["data", "sft"],
            "usage: gmner data sft",
            ["--images", "--out", "--cot", "--min-pixels", "--max-pixels", "--skip-missing-images"],
        ),
        (["eval"], "usage: gmner eval", ["--data", "--pred", "--protocol", "--json"]),
        (["train"], "usage: gmner train", ["--model", "--data", "--out"]),
        (["cot"], "usage: gmner cot", ["--images"]),
    ],
    ids=["gmner", "data", "data-stats", "data-sft", "eval", "train", "cot"],
)
def test_help_exits_0_and_prints_usage(argv, usage, mentions, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(usage)
    for word in mentions:
        assert word in out


@pytest.mark.slow
def test_tiny_model_help_exits_0_and_prints_usage():
    pytest.importorskip("torch")
    # gmner.train.tiny_model imports torch at module level: keep it out of the test process.
    proc = _run_py(
        """
        import sys
        from gmner.runtime.cli import main
        try:
            main(["tiny-model", "--help"])
        except SystemExit as exc:
            sys.exit(exc.code)
        sys.exit(99)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: gmner tiny-model")


def test_version(capsys):
    from gmner_rt import __version__

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"gmner {__version__}"


@pytest.mark.parametrize("argv", [["no-such-command"], [], ["data"], ["data", "nope"]])
def test_unknown_or_missing_subcommand_exits_nonzero(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code not in (0, None)
    assert "usage: gmner" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# gmner data stats
# ---------------------------------------------------------------------------------------------

#: fixtures/README.md: tweets, entities, groundable, boxes, XML objects per split.
README_COUNTS = {"train": (40, 86, 39, 56, 50), "dev": (30, 58, 22, 37, 34)}
TOTAL_KEYS = ("tweets", "entities", "groundable", "boxes", "xml_objects")


@pytest.fixture(scope="module")
def expected_stats(v2_subset) -> dict:
    return {s: split_stats(load_split(v2_subset, s)) for s in ("train", "dev")}


def _parse_table(text: str) -> dict:
    """The stats table back into split_stats' shape."""
    lines = text.strip().splitlines()
    assert lines[0].split() == ["split", "tweets", "entities", "groundable", "boxes", "xml", "obj"]
    stats: dict = {}
    current = None
    for line in lines[1:]:
        fields = line.split()
        if line.startswith("  "):
            etype, *numbers = fields
            assert len(numbers) == 3, line
            current["by_type"][etype] = dict(
                zip(("entities", "groundable", "boxes"), map(int, numbers), strict=True)
            )
        else:
            split, *numbers = fields
            assert len(numbers) == 5, line
            current = stats[split] = dict(zip(TOTAL_KEYS, map(int, numbers), strict=True))
            current["by_type"] = {}
    return stats


def test_data_stats_table_equals_split_stats(v2_subset, expected_stats, capsys):
    assert cli.main(["data", "stats", str(v2_subset)]) == 0
    table = _parse_table(capsys.readouterr().out)
    assert list(table) == ["train", "dev"]
    assert table == expected_stats
    for split, counts in README_COUNTS.items():
        assert tuple(table[split][k] for k in TOTAL_KEYS) == counts


def test_data_stats_json_equals_split_stats(v2_subset, expected_stats, capsys):
    assert cli.main(["-v", "data", "stats", str(v2_subset), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats == expected_stats
    assert {t: c["entities"] for t, c in stats["dev"]["by_type"].items()} == {
        "LOC": 10,
        "ORG": 17,
        "OTHER": 11,
        "PER": 20,
    }
    for split, counts in README_COUNTS.items():
        assert tuple(stats[split][k] for k in TOTAL_KEYS) == counts


def test_data_stats_missing_folder_returns_2_naming_it(tmp_path, caplog, capsys):
    missing = tmp_path / "no-such-data"
    assert cli.main(["data", "stats", str(missing)]) == 2
    assert str(missing) in _errors(caplog)
    assert capsys.readouterr().out == ""


def test_data_stats_folder_without_splits_returns_2_naming_it(tmp_path, caplog):
    (tmp_path / "xml").mkdir()
    assert cli.main(["data", "stats", str(tmp_path), "--json"]) == 2
    assert str(tmp_path) in _errors(caplog)


# ---------------------------------------------------------------------------------------------
# Import boundary
# ---------------------------------------------------------------------------------------------

HEAVY = ("torch", "transformers", "peft", "accelerate", "gmner.train", "gmner.export")
_LOADED = f"""
import json, sys
heavy = {HEAVY!r}
print(json.dumps(sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".")
                                                      for h in heavy))))
"""


def _heavy_modules_after(code: str) -> list[str]:
    proc = _run_py(textwrap.dedent(code) + _LOADED)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_runtime_library_imports_nothing_heavy():
    loaded = _heavy_modules_after(
        """
        import gmner_rt, gmner_rt.metrics, gmner_rt.data, gmner_rt.records, gmner_rt.geometry
        import gmner_rt.answers, gmner_rt.predictions, gmner_rt.prompt, gmner_rt.images
        """
    )
    assert loaded == []


def test_cli_and_eval_help_import_no_torch():
    loaded = _heavy_modules_after(
        """
        import gmner.runtime.cli
        try:
            gmner.runtime.cli.main(["eval", "--help"])
        except SystemExit as exc:
            assert exc.code == 0
        """
    )
    assert loaded == []


def test_eval_pred_and_data_commands_import_no_torch(tmp_path, v2_subset):
    pred = tmp_path / "pred.jsonl"
    _write_pred(pred, _gold_outputs(v2_subset, "dev"))
    loaded = _heavy_modules_after(
        f"""
        import gmner.runtime.cli as cli
        assert cli.main(["eval", "--data", {str(v2_subset)!r}, "--split", "dev",
                         "--pred", {str(pred)!r}]) == 0
        assert cli.main(["data", "stats", {str(v2_subset)!r}]) == 0
        try:
            cli.main(["data", "sft", "--help"])
        except SystemExit as exc:
            assert exc.code == 0
        """
    )
    # `gmner data` lives in gmner.train (a light package); torch and the rest stay out.
    assert [m for m in loaded if not m.startswith("gmner.train")] == []
    assert set(loaded) <= {"gmner.train", "gmner.train.data_cli", "gmner.train.sft"}


_FORBIDDEN_ROOTS = ("torch", "transformers", "peft", "accelerate", "train", "export")
_IMPORT_RE = re.compile(
    r"^[ \t]*(?:from[ \t]+(?P<src>[\w.]+)[ \t]+import[ \t]+(?P<names>[^#\n]+)"
    r"|import[ \t]+(?P<mods>[^#\n]+))",
    re.M,
)


def _forbidden_imports(source: str) -> list[str]:
    bad = []
    for m in _IMPORT_RE.finditer(source):
        if m["src"] is not None:
            modules = [m["src"]]
            if m["src"] == "gmner":  # from gmner import train
                names = m["names"].replace("(", " ").replace(")", " ").replace(",", " ")
                modules += [f"gmner.{n}" for n in names.split() if n != "as"]
        else:
            modules = [part.split()[0] for part in m["mods"].split(",") if part.strip()]
        for module in modules:
            root = module.removeprefix("gmner.").split(".")[0]
            if module.startswith("gmner.") or not module.startswith("gmner"):
                if root in _FORBIDDEN_ROOTS:
                    bad.append(m.group(0).strip())
    return bad


def test_forbidden_import_regex_catches_what_it_should():
    for line in (
        "import torch",
        "import numpy, torch.nn as nn",
        "    from transformers import AutoModel",
        "from peft import LoraConfig",
        "import accelerate",
        "from gmner.train.sft import write_sft",
        "from gmner.export import bundle",
        "from gmner import train",
        "import gmner.export",
        "from train import sft",
        "from export.onnx import x",
    ):
        assert _forbidden_imports(line), line
    for line in ("import numpy", "from PIL import Image", "from .records import parse_output"):
        assert not _forbidden_imports(line), line


def test_no_runtime_source_file_imports_training_or_export_code():
    files = sorted((REPO / "gmner_rt").rglob("*.py"))
    assert len(files) >= 9
    seen_any_import = False
    offenders = {}
    for path in files:
        source = path.read_text(encoding="utf-8")
        seen_any_import |= bool(_IMPORT_RE.search(source))
        if bad := _forbidden_imports(source):
            offenders[str(path.relative_to(REPO))] = bad
    assert seen_any_import
    assert offenders == {}


# ---------------------------------------------------------------------------------------------
# gmner eval --pred
# ---------------------------------------------------------------------------------------------


def _gold_outputs(data: Path, split: str) -> dict[str, str]:
    return {t.img_id: format_answer(t.records()) for t in load_split(data, split)}


def _write_pred(path: Path, outputs: dict[str, str]) -> Path:
    path.write_text(
        "".join(json.dumps({"img_id": i, "output": o}) + "\n" for i, o in outputs.items()),
        encoding="utf-8",
    )
    return path


def _eval(data: Path, pred: Path, *extra: str) -> int:
    return cli.main(["eval", "--data", str(data), "--split", "dev", "--pred", str(pred), *extra])


@pytest.fixture(scope="module")
def dev_tweets(v2_subset):
    return load_split(v2_subset, "dev")


def test_eval_gold_predictions_score_1(v2_subset, dev_tweets, tmp_path, capsys):
    pred = _write_pred(tmp_path / "pred.jsonl", _gold_outputs(v2_subset, "dev"))
    scores = tmp_path / "scores.json"
    assert _eval(v2_subset, pred, "--json", str(scores)) == 0
    out = capsys.readouterr().out
    assert re.search(r"^GMNER\s+100\.00\s+100\.00\s+100\.00\s+58\s+58\s+58$", out, re.M)
    report = json.loads(scores.read_text(encoding="utf-8"))
    n_gold = sum(len(t.entities) for t in dev_tweets)
    assert n_gold == 58
    for task in ("gmner", "mner", "eeg"):
        c = report[task]
        assert set(c) == {"precision", "recall", "f1", "correct", "predicted", "gold"}
        assert c["f1"] == c["precision"] == c["recall"] == 1.0
        assert c["correct"] == c["predicted"] == c["gold"] == n_gold
    assert report["malformed"] == 0
    assert report["missing"] == 0
    assert report["tweets"] == 30
    assert report["protocol"] == "hindex"
    by_type = report["by_type"]
    assert set(by_type) == {"PER", "LOC", "ORG", "OTHER"}
    assert {t: v["gmner"]["gold"] for t, v in by_type.items()} == {
        "PER": 20,
        "LOC": 10,
        "ORG": 17,
        "OTHER": 11,
    }
    for tasks in by_type.values():
        assert tasks["gmner"]["f1"] == tasks["mner"]["f1"] == 1.0


def test_eval_dropped_tweets_lower_recall_only(v2_subset, dev_tweets, tmp_path):
    outputs = _gold_outputs(v2_subset, "dev")
    dropped = [t for t in dev_tweets if t.entities][:5]
    for t in dropped:
        del outputs[t.img_id]
    pred = _write_pred(tmp_path / "pred.jsonl", outputs)
    scores = tmp_path / "scores.json"
    assert _eval(v2_subset, pred, "--json", str(scores)) == 0
    report = json.loads(scores.read_text(encoding="utf-8"))
    n_dropped = sum(len(t.entities) for t in dropped)
    assert report["missing"] == 5
    assert report["tweets"] == 30
    for task in ("gmner", "mner", "eeg"):
        c = report[task]
        assert c["precision"] == 1.0
        assert c["recall"] < 1.0
        assert c["gold"] == 58
        assert c["correct"] == c["predicted"] == 58 - n_dropped
        assert c["recall"] == pytest.approx((58 - n_dropped) / 58)


def test_eval_unparseable_segment_counts_as_malformed_and_wrong(v2_subset, dev_tweets, tmp_path):
    outputs = _gold_outputs(v2_subset, "dev")
    tweet = next(t for t in dev_tweets if t.entities)
    outputs[tweet.img_id] = "<answer>just some words</answer>"
    scores = tmp_path / "scores.json"
    assert _eval(v2_subset, _write_pred(tmp_path / "p.jsonl", outputs), "--json", str(scores)) == 0
    report = json.loads(scores.read_text(encoding="utf-8"))
    assert report["malformed"] == 1
    assert report["gmner"]["predicted"] == 58 - len(tweet.entities) + 1
    assert report["gmner"]["correct"] == 58 - len(tweet.entities)


def test_eval_e2e_protocol_on_gold_scores_1(v2_subset, tmp_path, caplog):
    """e2e scores the raw model-space text: a file without it is refused with a hint; a
    perfect model's text (gold in model pixels, written as gmner writes predictions) scores
    1 under both protocols."""
    from gmner_rt.geometry import ImageGeometry
    from gmner_rt.predictions import ModelText, write_predictions

    plain = _write_pred(tmp_path / "plain.jsonl", _gold_outputs(v2_subset, "dev"))
    assert _eval(v2_subset, plain, "--protocol", "e2e") == 2
    assert "--protocol e2e scores the text as the model generated it" in caplog.text
    assert "--protocol hindex" in caplog.text
    outputs, texts = {}, {}
    for t in load_split(v2_subset, "dev"):
        size = t.image_size or (640, 480)
        geo = ImageGeometry.for_image(*size, min_pixels=56 * 56, max_pixels=448 * 448)
        raw = format_answer([r.map_boxes(geo.to_model) for r in t.records()])
        outputs[t.img_id], texts[t.img_id] = (
            format_answer(t.records()),
            ModelText(raw, size, geo.model_size),
        )
    pred = tmp_path / "pred.jsonl"
    write_predictions(pred, outputs, model_texts=texts)
    for protocol in ("e2e", "hindex"):
        scores = tmp_path / f"{protocol}.json"
        assert _eval(v2_subset, pred, "--protocol", protocol, "--json", str(scores)) == 0
        report = json.loads(scores.read_text(encoding="utf-8"))
        assert report["protocol"] == protocol and report["dropped"] == 0
        for task in ("gmner", "mner", "eeg"):
            assert report[task]["f1"] == 1.0
            assert report[task]["gold"] == 58


def test_eval_unknown_image_id_is_an_error_naming_id_and_file(v2_subset, tmp_path, caplog):
    outputs = _gold_outputs(v2_subset, "dev")
    outputs["not_a_dev_tweet"] = "<answer>None</answer>"
    pred = _write_pred(tmp_path / "pred.jsonl", outputs)
    assert _eval(v2_subset, pred) == 2
    error = _errors(caplog)
    assert "not_a_dev_tweet" in error
    assert str(pred) in error


def test_eval_train_predictions_on_dev_are_unknown_ids(v2_subset, tmp_path, caplog):
    pred = _write_pred(tmp_path / "pred.jsonl", _gold_outputs(v2_subset, "train"))
    assert _eval(v2_subset, pred) == 2
    assert "40 image id(s)" in _errors(caplog)


def _lines_with(tmp_path: Path, v2_subset: Path, index: int, line: str) -> Path:
    rows = [
        json.dumps({"img_id": i, "output": o}) for i, o in _gold_outputs(v2_subset, "dev").items()
    ]
    rows.insert(index, line)
    pred = tmp_path / "pred.jsonl"
    pred.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return pred


def test_eval_bad_json_line_is_an_error_naming_file_and_line(v2_subset, tmp_path, caplog):
    pred = _lines_with(tmp_path, v2_subset, 3, '{"img_id": "x", "output": ')
    assert _eval(v2_subset, pred) == 2
    assert f"{pred}:4" in _errors(caplog)
    assert "not JSON" in _errors(caplog)


def test_eval_duplicate_id_is_an_error(v2_subset, dev_tweets, tmp_path, caplog):
    dup = dev_tweets[0].img_id
    pred = _lines_with(tmp_path, v2_subset, 10, json.dumps({"img_id": dup, "output": "None"}))
    assert _eval(v2_subset, pred) == 2
    error = _errors(caplog)
    assert f"{pred}:11" in error
    assert repr(dup) in error
    assert "twice" in error


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"img_id": "1768609"}, "output"),
        ({"img_id": "1768609", "output": None}, "output"),
        ({"img_id": "1768609", "output": ["a"]}, "output"),
        ({"output": "<answer>None</answer>"}, "img_id"),
        ({"img_id": "", "output": "None"}, "img_id"),
        ({"img_id": 1768609, "output": "None"}, "img_id"),
    ],
)
def test_eval_bad_field_is_an_error_naming_the_field(v2_subset, tmp_path, caplog, row, field):
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps(row) + "\n", encoding="utf-8")
    assert _eval(v2_subset, pred) == 2
    error = _errors(caplog)
    assert f"{pred}:1" in error
    assert f"field {field}" in error


def test_eval_non_object_line_is_an_error(v2_subset, tmp_path, caplog):
    pred = tmp_path / "pred.jsonl"
    pred.write_text('["1768609", "None"]\n', encoding="utf-8")
    assert _eval(v2_subset, pred) == 2
    assert f"{pred}:1: expected an object" in _errors(caplog)


def test_eval_blank_lines_are_skipped(v2_subset, tmp_path):
    rows = [
        json.dumps({"img_id": i, "output": o}) for i, o in _gold_outputs(v2_subset, "dev").items()
    ]
    pred = tmp_path / "pred.jsonl"
    pred.write_text("\n\n".join(rows) + "\n\n", encoding="utf-8")
    scores = tmp_path / "s.json"
    assert _eval(v2_subset, pred, "--json", str(scores)) == 0
    assert json.loads(scores.read_text(encoding="utf-8"))["gmner"]["f1"] == 1.0


def test_eval_missing_predictions_file_is_an_error_naming_it(v2_subset, tmp_path, caplog):
    pred = tmp_path / "nope.jsonl"
    assert _eval(v2_subset, pred) == 2
    assert str(pred) in _errors(caplog)


def test_eval_missing_data_folder_is_an_error_naming_it(v2_subset, tmp_path, caplog):
    pred = _write_pred(tmp_path / "pred.jsonl", _gold_outputs(v2_subset, "dev"))
    missing = tmp_path / "no-data"
    assert _eval(missing, pred) == 2
    assert str(missing) in _errors(caplog)


def test_eval_without_pred_or_model_is_an_error(v2_subset, caplog):
    assert cli.main(["eval", "--data", str(v2_subset), "--split", "dev"]) == 2
    assert "--pred" in _errors(caplog)


def test_eval_unknown_protocol_is_rejected_by_the_parser(v2_subset, tmp_path):
    pred = _write_pred(tmp_path / "pred.jsonl", _gold_outputs(v2_subset, "dev"))
    with pytest.raises(SystemExit) as exc:
        _eval(v2_subset, pred, "--protocol", "nope")
    assert exc.value.code == 2


def test_eval_json_into_a_missing_folder_is_an_error(v2_subset, tmp_path, caplog):
    pred = _write_pred(tmp_path / "pred.jsonl", _gold_outputs(v2_subset, "dev"))
    scores = tmp_path / "no-such-dir" / "scores.json"
    assert _eval(v2_subset, pred, "--json", str(scores)) == 2
    assert str(scores) in _errors(caplog)
