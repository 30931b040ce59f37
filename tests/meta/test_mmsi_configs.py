"""The MMSI-in-its-regime configs: a fine-tune of the MS run, its control
rows and the matching "MS continued" control agree on start, steps and lr."""

import os

from tfdml.training import build as build_lib
from tfdml.training import config as config_lib

CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs"
)


def _load(name):
    cfg = config_lib.load(os.path.join(CONFIGS, name))
    build_lib.validate_objects(cfg)
    return cfg


def test_finetune_rows_share_start_steps_and_lr():
    control = _load("ms_finetune_cjk.yaml")
    modes = {}
    for name in (
        "mmsi_ms_finetune_cjk.yaml",
        "mmsi_ms_finetune_ones_cjk.yaml",
        "mmsi_ms_finetune_random_cjk.yaml",
    ):
        cfg = _load(name)
        for section, key in (
            ("train", "init_from"),
            ("train", "epochs"),
            ("train", "steps_per_epoch"),
            ("optimizer", "learning_rate"),
            ("optimizer", "schedule"),
            ("data", "classes_per_batch"),
            ("data", "samples_per_class"),
        ):
            assert cfg[section][key] == control[section][key], (name, key)
        modes[name] = cfg["meta"].get("weights_mode", "meta")
    assert control["train"]["init_from"] == "runs/ms_cjk"
    assert control["optimizer"]["learning_rate"] <= 1e-5
    assert sorted(modes.values()) == ["meta", "ones", "random_sparse"]
