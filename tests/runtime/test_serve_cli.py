"""``gmner serve``'s command line, without starting a server: its help, flags checked (and
named) before the bundle loads, and what to install when the [serve] extra is missing."""

from __future__ import annotations

import pytest
from gmner.runtime import cli


def test_serve_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--bundle",
        "--host",
        "--port",
        "--max-batch",
        "--max-wait-ms",
        "--max-queue",
        "--max-image-bytes",
        "--max-text-chars",
        "--drain-timeout",
        "--provider",
    ):
        assert flag in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-wait-ms", "-5"], "--max-wait-ms: expected a number of ms in [0, 60000], got -5"),
        (["--port", "70000"], "--port: expected an integer in [0, 65535], got 70000"),
        (["--host", " "], "--host: expected an address"),
        (["--drain-timeout", "0"], "--drain-timeout: expected seconds in (0, 86400], got 0.0"),
    ],
)
def test_bad_serve_flags_are_named_before_any_load(argv, message, caplog, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the bundle was loaded")

    monkeypatch.setattr("gmner.runtime.extract.load_extractor", no_load)
    assert cli.main(["serve", *argv]) == 2
    assert message in caplog.text


@pytest.mark.parametrize(
    "module, extra", [("starlette", "[serve]"), ("uvicorn", "[serve]"), ("ray", "[ray]")]
)
def test_a_missing_extra_is_named(module, extra):
    message = cli.missing_message("serve", module)
    assert f"gmner{extra}" in message and f"pip install '.{extra}'" in message


def test_a_taken_port_is_named_before_the_bundle_loads(caplog, monkeypatch):
    import socket

    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    import gmner.runtime.serve as serve

    def no_load(*args, **kwargs):
        raise AssertionError("the bundle loaded before the port was checked")

    monkeypatch.setattr(serve, "load_extractor", no_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 2
    assert f"--port {port}: cannot listen there" in caplog.text
