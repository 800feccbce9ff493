"""Model resolution: embedded model, local dirs, and a fast, clear failure for hub IDs."""

import time

import pytest

from engine.loader import ModelNotFound, resolve_model_dir


def test_hub_id_fails_fast_naming_the_local_path_alternative(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFound, match="local path"):
        resolve_model_dir("meta-llama/Llama-3.1-8B-Instruct", tmp_path)
    assert time.perf_counter() - t0 < 1.0  # no network attempt, no hang


def test_directory_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="safetensors"):
        resolve_model_dir(str(tmp_path), tmp_path)


def test_embedded_resolves_to_a_safetensors_copy(settings):
    path = resolve_model_dir("embedded", settings.data_dir)
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
