"""`model.use_te`: auto uses Transformer Engine when it imports and logs why not once; true fails loudly;
the config key is checked at start-up."""

from __future__ import annotations

import logging

import pytest


def test_use_te_auto_logs_why_once_and_true_fails_loudly(monkeypatch, caplog):
    """model.use_te: auto -> local spec with the import error logged once; true -> RuntimeError naming it."""
    from opsd_megatron.mcore.models import builder

    monkeypatch.setattr(builder, "_TE_STATUS", ["ImportError: No module named 'transformer_engine'"])
    with caplog.at_level(logging.WARNING, logger=builder.__name__):
        assert builder.resolve_use_te("auto") is False
        assert builder.resolve_use_te(None) is False
    assert caplog.text.count("No module named 'transformer_engine'") == 1
    with pytest.raises(RuntimeError, match="model.use_te=true.*No module named 'transformer_engine'"):
        builder.resolve_use_te(True)
    assert builder.resolve_use_te("false") is False
    with pytest.raises(ValueError, match="model.use_te"):
        builder.resolve_use_te("maybe")


def test_use_te_config_key_is_checked():
    from opsd_megatron.config import ConfigError, config_from_dict

    base = {"model": {"path": "x"}, "data": {"path": "y"}}
    assert config_from_dict({**base, "model": {"path": "x", "use_te": False}}).model.use_te is False
    with pytest.raises(ConfigError, match="model.use_te"):
        config_from_dict({**base, "model": {"path": "x", "use_te": "maybe"}})
