"""opsd-convert's command line (the conversions themselves run over gloo in test_conversion.py)."""

from __future__ import annotations

import pytest

from opsd_megatron.cli import convert as cli


def test_help_mentions_torchrun_and_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "torchrun" in out
    for sub in ("hf-to-megatron", "megatron-to-hf", "verify"):
        assert sub in out
    with pytest.raises(SystemExit):
        cli.main(["verify", "--help"])
    out = capsys.readouterr().out
    assert "--tp" in out and "--pp" in out and "torchrun" in out


def test_missing_required_argument_exits():
    with pytest.raises(SystemExit) as e:
        cli.main(["hf-to-megatron", "--hf", "x"])
    assert e.value.code == 2
