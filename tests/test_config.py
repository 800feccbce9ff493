"""One schema, four sources: defaults < YAML < CACHEBLEND_* env < CLI flags."""

import argparse

import pytest
from pydantic import ValidationError

from config import Settings, add_settings_flags, load_settings


def parse(argv):
    p = argparse.ArgumentParser()
    add_settings_flags(p)
    return p.parse_args(argv)


def test_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("recompute_ratio: 0.3\nmax_num_seqs: 4\nmode: full_reuse\n")
    monkeypatch.setenv("CACHEBLEND_MAX_NUM_SEQS", "6")
    monkeypatch.setenv("CACHEBLEND_MODE", "prefix_cache")
    s = load_settings(parse(["--config", str(cfg), "--mode", "cacheblend"]))
    assert s.recompute_ratio == 0.3          # YAML over default
    assert s.max_num_seqs == 6               # env over YAML
    assert s.mode == "cacheblend"            # flag over env


def test_lists_from_env_and_flags(monkeypatch):
    monkeypatch.setenv("CACHEBLEND_CHECK_LAYERS", "1,8,16")
    s = load_settings(parse(["--check-ratios", "[0.2, 0.15, 0.1]"]))
    assert s.check_layers == [1, 8, 16] and s.layer_ratios == [0.2, 0.15, 0.1]


def test_bool_flags():
    assert load_settings(parse(["--controller-enabled"])).controller_enabled is True
    assert load_settings(parse(["--no-controller-enabled"])).controller_enabled is False


@pytest.mark.parametrize("bad", [
    {"recompute_ratio": 1.5},
    {"check_layers": [8, 1]},
    {"check_layers": [1, 8], "check_ratios": [0.1, 0.2]},
    {"check_layers": [1], "check_ratios": [0.1, 0.2]},
    {"mode": "turbo"},
    {"selection_signal": "query"},
])
def test_invalid_values_are_rejected(bad):
    with pytest.raises(ValidationError):
        Settings(**bad)


def test_unknown_yaml_key_is_an_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("recompute_raito: 0.3\n")
    with pytest.raises(ValueError, match="recompute_raito"):
        load_settings(parse(["--config", str(cfg)]))
