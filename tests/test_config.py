"""Config: presets load, overrides apply with types checked, mistakes name the key."""

import dataclasses

import pytest
import yaml

from t2f.config import Config, ConfigError, load_config, save_config


def test_paper_presets_hold_the_paper_settings():
    mm = load_config("mmcelebahq")
    assert (mm.loss.kl_weight, mm.loss.trl_weight) == (1.0, 5.0)
    assert (mm.optim.name, mm.optim.lr, mm.optim.momentum, mm.data.batch_size) == ("sgd", 1e-4, 0.9, 12)
    text = load_config("celebatext")
    assert text.data.batch_size == 6 and text.generator.resolution == 1024  # inherits from its base


def test_dotted_overrides_parse_values_by_type():
    cfg = load_config("mmcelebahq", ["optim.lr=3e-4", "train.steps=200", "data.resampled=false", "optim.betas=[0.5, 0.99]"])
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 200 and cfg.data.resampled is False
    assert cfg.optim.betas == (0.5, 0.99)


def test_unknown_key_names_it_and_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'.*valid keys: name, lr, momentum"):
        load_config("mmcelebahq", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="unknown key 'optimizer'"):
        load_config("mmcelebahq", ["optimizer.lr=1"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match=r"train.steps: expected int, got 'many'"):
        load_config("mmcelebahq", ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"data.resampled: expected bool"):
        load_config("mmcelebahq", ["data.resampled=3"])


def test_environment_variables_fill_paths(monkeypatch):
    monkeypatch.setenv("T2F_SHARDS", "/scratch/mm")
    assert load_config("mmcelebahq").data.shards == "/scratch/mm"
    monkeypatch.delenv("T2F_SHARDS")
    assert load_config("mmcelebahq").data.shards == "shards/mmcelebahq"


def test_user_yaml_with_base_and_saved_config_round_trips(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: celebatext\noptim:\n  name: adamw\n  lr: 0.001\n")
    cfg = load_config(str(mine), ["train.seed=7"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.data.batch_size, cfg.train.seed) == ("adamw", 1e-3, 6, 7)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(str(tmp_path / "run" / "config.yaml")) == cfg
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["betas"] == [0.9, 0.999]


def test_missing_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="presets: .*mmcelebahq"):
        load_config("mmceleba")


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().optim.lr = 1.0
