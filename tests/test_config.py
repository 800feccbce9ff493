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
    assert s.check_layers == [1, 8, 16] and s.check_ratios == [0.2, 0.15, 0.1]


def test_check_layers_follow_the_selection_signal_unless_set():
    from engine.request import BlendParams
    from engine.resolve import resolve_blend

    s = Settings()
    assert s.selection_signal == "attended"
    # attended and stored: choose before any layer, then again at layer 8 of 30 (the funnel schedule)
    assert resolve_blend(BlendParams(), s, 30, 0.15)[1].check_layers == (0, 8)
    assert resolve_blend(BlendParams(selection_signal="stored"), s, 30, 0.15)[1].check_layers == (0, 8)
    assert resolve_blend(BlendParams(), Settings(check_ratios=[0.2]), 30, 0.15)[1].check_layers == (0,)
    assert resolve_blend(BlendParams(), Settings(selection_signal="value"), 30, 0.15)[1].check_layers == (1,)
    assert resolve_blend(BlendParams(), Settings(selection_signal="value", check_layers=[2]), 30, 0.15)[1].check_layers == (2,)
    # per request: another signal brings its own layer; explicit layers win
    assert resolve_blend(BlendParams(selection_signal="sensitivity"), s, 30, 0.15)[1].check_layers == (1,)
    assert resolve_blend(BlendParams(selection_signal="sensitivity", check_layers=[3]), s, 30, 0.15)[1].check_layers == (3,)
    server = Settings(check_layers=[2, 5], check_ratios=[0.3, 0.2])  # the server's layers and ratios go with its signal
    assert resolve_blend(BlendParams(), server, 30, 0.15)[1].ratios == (0.3, 0.2)
    other = resolve_blend(BlendParams(selection_signal="value"), server, 30, 0.15)[1]
    assert (other.check_layers, other.ratios) == ((1,), (0.15,))


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
    {"max_itl_slowdown": 1.0},   # no time left for a prefill beside a decode
    {"max_itl_slowdown": -2.0},
])
def test_invalid_values_are_rejected(bad):
    with pytest.raises(ValidationError):
        Settings(**bad)


def test_unknown_yaml_key_is_an_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("recompute_raito: 0.3\n")
    with pytest.raises(ValueError, match="recompute_raito"):
        load_settings(parse(["--config", str(cfg)]))


def test_state_dir_places_everything_a_server_writes(tmp_path, monkeypatch):
    """One setting places the registry, the document records and the disk KV tier; kv_disk_path
    alone moves only the KV."""
    from kvstore import build_documents, build_registry

    monkeypatch.setenv("CACHEBLEND_STATE_DIR", str(tmp_path / "state"))
    s = load_settings(parse(["--data-dir", str(tmp_path / "data")]))
    assert s.resolved_kv_disk_path == tmp_path / "state" / "kv"
    registry = build_registry(s)
    registry.add("a" * 64, "some text", [1, 2, 3])
    registry.close()
    assert list((tmp_path / "state" / "chunks").rglob("*")) and not (tmp_path / "data").exists()
    assert build_documents(s).root == tmp_path / "state" / "documents"

    monkeypatch.delenv("CACHEBLEND_STATE_DIR")
    only_kv = Settings(data_dir=tmp_path / "data", kv_disk_path=tmp_path / "fast")
    assert only_kv.resolved_kv_disk_path == tmp_path / "fast" and only_kv.resolved_state_dir == tmp_path / "data"
