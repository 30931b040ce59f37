"""tools/make_configs.py: configs/*.yaml are generated from one table.

The tool regenerates the configs it owns into a temporary folder; every
file must equal the committed one byte for byte and load with the config
schema. Hand-written configs (smoke, demo, any file the table does not name)
are not the tool's.
"""

import importlib.util
import os

import pytest

from tfdml.training import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def _tool():
    path = os.path.join(ROOT, "tools", "make_configs.py")
    spec = importlib.util.spec_from_file_location("make_configs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tool = _tool()


def test_regenerated_configs_equal_the_committed_ones(tmp_path):
    names = tool.write(str(tmp_path))
    assert len(names) >= 51
    assert sorted(os.listdir(tmp_path)) == names
    for name in names:
        want = open(os.path.join(CONFIGS, name), encoding="utf-8").read()
        got = (tmp_path / name).read_text(encoding="utf-8")
        assert got == want, f"configs/{name}: run python tools/make_configs.py"
    assert tool.main(["--check", "--out", CONFIGS]) == 0


@pytest.mark.parametrize("name", sorted(tool.owned()))
def test_generated_configs_load(name, tmp_path):
    method, dataset = tool.owned()[name]
    path = tmp_path / name
    path.write_text(tool.render(method, dataset), encoding="utf-8")
    cfg = config_lib.load(str(path))
    assert cfg["loss"]["name"] == tool.METHODS[method]["loss"]["name"]
    assert cfg["data"]["classes_per_batch"] > 0


def test_hand_written_configs_are_left_alone(tmp_path):
    owned = tool.owned()
    for name in ("smoke.yaml", "demo_cjk.yaml"):
        assert name not in owned
    extra = tmp_path / "configs"
    tool.write(str(extra))
    (extra / "mine_cjk.yaml").write_text("# hand-written\n")
    assert tool.main(["--out", str(extra)]) == 0
    assert (extra / "mine_cjk.yaml").read_text() == "# hand-written\n"
    # every committed config is either the tool's or hand-written on purpose
    others = sorted(set(os.listdir(CONFIGS)) - set(owned))
    assert "smoke.yaml" in others and "demo_cjk.yaml" in others


def test_check_reports_a_changed_setting(tmp_path, capsys):
    tool.write(str(tmp_path))
    path = tmp_path / "ms_cjk.yaml"
    path.write_text(path.read_text().replace("alpha: 2.0", "alpha: 3.0"))
    assert tool.main(["--check", "--out", str(tmp_path)]) == 1
    assert "ms_cjk.yaml" in capsys.readouterr().out
    os.remove(tmp_path / "gpw_sop.yaml")
    assert tool.main(["--check", "--out", str(tmp_path)]) == 1
    assert "gpw_sop.yaml (missing)" in capsys.readouterr().out


def test_per_dataset_values_reach_their_files():
    assert tool.build("iaa_ms", "sop")[1]["augment"]["lam"] == 0.6
    assert tool.build("iaa_ms", "cub")[1]["augment"]["lam"] == 0.8
    comments, cfg = tool.build("xbm_contrastive", "sop")
    assert cfg["memory"]["size"] == 55000
    assert comments[2] == (
        "# Usage: python train.py --config configs/xbm_contrastive_sop.yaml"
    )
