"""The transformer-engine refusal of mhc-pretrain-gpt (check_launch_environment); the launch row of
the refusal table runs it through the real entry point where transformer-engine is absent."""

import types

import pytest

from mhc_megatron.training import launch_environment


def _args(impl):
    return types.SimpleNamespace(transformer_impl=impl, mhc_lr_step_decay=None, lr_decay_style="linear")


def test_transformer_engine_asked_for_and_absent_is_refused(monkeypatch):
    monkeypatch.setattr(launch_environment, "transformer_engine_installed", lambda: False)
    with pytest.raises(ValueError, match=r"^--transformer-impl transformer_engine: transformer-engine is not "
                                         r"installed .*pip install -e \.\[gpu\].*--transformer-impl local"):
        launch_environment.check_launch_environment(_args("transformer_engine"))


def test_transformer_engine_present_or_local_passes(monkeypatch):
    monkeypatch.setattr(launch_environment, "transformer_engine_installed", lambda: True)
    launch_environment.check_launch_environment(_args("transformer_engine"))
    monkeypatch.setattr(launch_environment, "transformer_engine_installed", lambda: False)
    launch_environment.check_launch_environment(_args("local"))  # megatron-core's torch layers need nothing


def test_detection_follows_the_import_system(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "transformer_engine" else None)
    assert launch_environment.transformer_engine_installed()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not launch_environment.transformer_engine_installed()
