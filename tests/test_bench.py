"""The benchmark protocol (benchmarks/quality.py): split, configs read from
configs/*.yaml, table, end to end, the committed results re-rendered."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import yaml

from tfdml.training.build import Data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_quality():
    path = os.path.join(ROOT, "benchmarks", "quality.py")
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load_quality()


def _argv(tmp_path):
    """The tiny synthetic protocol every test here runs."""
    return [
        "--dataset",
        "synthetic",
        "--classes-per-batch",
        "4",
        "--samples-per-class",
        "2",
        "--image-size",
        "16",
        "--steps",
        "4",
        "--epochs",
        "2",
        "--val-classes",
        "0.25",
        "--out",
        str(tmp_path / "results"),
        "--runs-dir",
        str(tmp_path / "runs"),
    ]


def _args(tmp_path, *extra):
    return bench.parse_args([*_argv(tmp_path), *extra])


def test_protocol_split_disjoint_and_val_from_training_half():
    labels = np.repeat(np.arange(400), 3)
    for seed in range(5):
        s = bench.protocol_splits(labels, seed)
        train, val, test = (
            set(s[k].tolist()) for k in ("train", "val", "test")
        )
        assert not train & val and not train & test and not val & test
        assert train | val | test == set(range(400))
        # Test = the second half of the class ids, whatever the seed.
        assert test == set(range(200, 400))
        # Validation only from the training half, never from test.
        assert val and max(val) < 200
        assert len(val) == 20


def test_protocol_split_seeds_reproducible_and_distinct():
    labels = np.repeat(np.arange(100), 2)
    a = bench.protocol_splits(labels, 3)
    b = bench.protocol_splits(labels, 3)
    c = bench.protocol_splits(labels, 4)
    for k in ("train", "val", "test"):
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(a["test"], c["test"])
    assert not np.array_equal(a["val"], c["val"])


def test_training_uses_the_protocol_split(tmp_path):
    args = _args(tmp_path)
    for seed in (0, 1):
        cfg = bench.make_config(args, "contrastive", seed, str(tmp_path))
        assert cfg["train"]["seed"] == seed
        data = Data(cfg)
        ours = bench.protocol_splits(data.source.labels, seed, 0.25)
        for k in ("train", "val", "test"):
            np.testing.assert_array_equal(data.splits[k], ours[k])


def test_every_method_config_shares_backbone_budget_optimizer(tmp_path):
    args = _args(tmp_path)
    seen = set()
    for method in bench.METHODS:
        cfg = bench.make_config(args, method, 0, str(tmp_path))
        m, t, o = cfg["model"], cfg["train"], cfg["optimizer"]
        if cfg["train"]["init_from"]:  # warm-start rows: own lr
            assert o["learning_rate"] == 1e-5
            continue
        seen.add(
            (
                m["backbone"],
                m["image_size"],
                t["epochs"] * t["steps_per_epoch"],
                o["name"],
                o["learning_rate"],
                cfg["data"]["classes_per_batch"],
                cfg["data"]["samples_per_class"],
            )
        )
        assert cfg["loss"]["name"]
    assert seen == {("small_cnn", 16, 4, "adam", 1e-3, 4, 2)}
    assert bench.make_config(args, "osm_caa_ce", 0, "x")["model"][
        "classification_head"
    ]
    # CAA reads the head's probabilities; only the CE row trains the head
    assert (
        bench.make_config(args, "osm_caa", 0, "x")["train"][
            "classification_loss_weight"
        ]
        == 0.0
    )
    assert (
        bench.make_config(args, "osm_caa_ce", 0, "x")["train"][
            "classification_loss_weight"
        ]
        == 1.0
    )
    assert bench.make_config(args, "osm", 0, "x")["loss"]["use_caa"] is False
    assert bench.make_config(args, "xbm_contrastive", 0, "x")["memory"]["size"]


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="bogus"):
        bench.parse_methods("contrastive,bogus")
    with pytest.raises(ValueError, match="mnist_photos"):
        bench.parse_dataset("mnist_photos")
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "2", "--epochs", "3"])


def test_summary_table_and_verdicts():
    raw = {
        "contrastive": [
            {"seed": s, "metrics": dict.fromkeys(bench.METRICS, v)}
            for s, v in enumerate([0.2, 0.4])
        ],
        "osm": [
            {"seed": s, "metrics": dict.fromkeys(bench.METRICS, v)}
            for s, v in enumerate([0.35, 0.45])
        ],
        "iaa_contrastive": [
            {"seed": 0, "metrics": dict.fromkeys(bench.METRICS, 0.9)},
            {"seed": 1, "error": "RuntimeError: boom"},
        ],
    }
    summary = bench.summarize(raw)
    mean, std = summary["contrastive"]["map@r"]
    # sample std (ddof 1)
    assert mean == pytest.approx(0.3) and std == pytest.approx(0.1 * 2**0.5)
    table = bench.markdown_table(summary)
    assert "| contrastive | 2 | 30.0 ± 14.1 |" in table
    assert "| IAA + contrastive | 1 | 90.0 ± 0.0 |" in table
    text = "\n".join(bench.comparisons(summary))
    # 2 std of the difference: 2 * hypot(14.1, 7.1) = 31.6
    assert (
        "OSM alone (no CAA, no CE head) (40.0 ± 7.1) vs its base "
        "contrastive (30.0 ± "
        "14.1): no clear gain (within 2 std), MAP@R +10.0 (2 std = 31.6)."
    ) in text
    # one seed on a side: no verdict, whatever the gap
    assert "IAA + contrastive (90.0 ± 0.0) vs its base" in text
    assert "no verdict (needs >= 2 seeds on both sides)" in text
    raw["iaa_contrastive"][1] = {
        "seed": 1,
        "metrics": dict.fromkeys(bench.METRICS, 0.9),
    }
    text = "\n".join(bench.comparisons(bench.summarize(raw)))
    assert "GAIN (> 2 std), MAP@R +60.0 (2 std = 28.3)" in text


def test_raw_pixel_row_matches_numpy_nearest_neighbour(tmp_path):
    cfg = bench.make_config(_args(tmp_path), "raw_pixels", 0, str(tmp_path))
    metrics, n = bench.raw_pixel_metrics(cfg)
    x, y = Data(cfg).arrays("test")
    assert n == len(y) == len(x)
    f = x.reshape(len(x), -1).astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    p1 = np.mean(y[np.argmax(sim, axis=1)] == y)
    assert metrics["precision@1"] == pytest.approx(p1, abs=1e-6)
    assert 0.0 < metrics["nmi"] <= 1.0


@pytest.mark.slow
def test_end_to_end_writes_table_plot_json(tmp_path):
    rc = bench.main(
        _argv(tmp_path)
        + ["--methods", "raw_pixels,contrastive", "--seeds", "1"]
        + ["--name", "t"]
    )
    assert rc == 0
    base = tmp_path / "results" / "quality_t"
    doc = json.loads(open(f"{base}.json", encoding="utf-8").read())
    assert set(doc["runs"]) == {"raw_pixels", "contrastive"}
    run = doc["runs"]["contrastive"][0]
    assert run["seed"] == 0 and run["best_epoch"] is not None
    assert set(run["metrics"]) == set(bench.METRICS)
    assert all(0.0 <= v <= 1.0 for v in run["metrics"].values())
    md = open(f"{base}.md", encoding="utf-8").read()
    assert "typefaces" in md and "| contrastive |" in md
    assert "| raw pixels (no training) |" in md
    assert "--methods raw_pixels,contrastive" in md
    assert os.path.getsize(f"{base}.png") > 1000
    assert os.path.isdir(tmp_path / "runs" / "contrastive_s0")
    # --render re-writes the table from the JSON without training.
    os.remove(f"{base}.md")
    out = str(tmp_path / "results")
    rc = bench.main(
        ["--dataset", "synthetic", "--out", out, "--name", "t"]
        + ["--render", f"{base}.json"]
    )
    assert rc == 0
    assert open(f"{base}.md", encoding="utf-8").read() == md


def test_xbm_warmup_row_delays_the_memory_by_half_the_budget(tmp_path):
    args = _args(tmp_path)
    cfg = bench.make_config(args, "xbm_contrastive_warmup", 0, "x")
    total = cfg["train"]["epochs"] * cfg["train"]["steps_per_epoch"]
    assert cfg["memory"]["start_after"] == round(total / 2)
    assert "start_after_fraction" not in cfg["memory"]
    same = bench.make_config(args, "contrastive_xbm_margins", 0, "x")
    assert same["loss"] == cfg["loss"]
    assert not same.get("memory", {}).get("size")
    # the table compares the delayed memory with the same loss, no memory
    assert bench.METHODS["xbm_contrastive_warmup"][1] == (
        "contrastive_xbm_margins"
    )


@pytest.mark.slow
def test_warm_start_row_fine_tunes_the_source_row(tmp_path):
    """MMSI's rows start from the MS row of the same seed (trained first
    when missing), at lr 1e-5, with the same budget."""
    import keras

    args = _args(tmp_path)
    cfg = bench.make_config(args, "mmsi_ms_finetune", 1, "x")
    src = bench.source_run_dir(args, "ms", 1)
    assert cfg["train"]["init_from"] == src
    assert cfg["optimizer"]["learning_rate"] == 1e-5
    assert cfg["meta"]["method"] == "mmsi"
    ones = bench.make_config(args, "mmsi_ms_finetune_ones", 1, "x")
    assert ones["meta"]["weights_mode"] == "ones"
    metrics, _ = bench.run_one(args, "ms_finetune", 0)
    assert 0.0 <= metrics["map@r"] <= 1.0
    src = bench.source_run_dir(args, "ms", 0)
    assert os.path.exists(os.path.join(src, "best_encoder.keras"))
    # the fine-tuned run started from the source weights: its history
    # exists and its first validation is not that of a random encoder
    ms = keras.saving.load_model(
        os.path.join(src, "best_encoder.keras"), compile=False
    )
    assert ms.count_params() > 0


def _method_part(raw):
    """The method settings of a raw config, as the benchmark reads them."""
    out = {k: raw[k] for k in bench.METHOD_SECTIONS if raw.get(k)}
    for section, keys in bench.METHOD_KEYS.items():
        part = {k: raw[section][k] for k in keys if k in raw.get(section, {})}
        if part:
            out[section] = part
    return out


def test_rows_read_their_settings_from_the_configs():
    """No copy of the hyper-parameters: a row without overrides has exactly
    its config's method settings; a row with overrides differs from its
    config only in the overridden keys."""
    checked = 0
    for row, (_, base, name, overrides) in bench.ROWS.items():
        assert base is None or base in bench.ROWS, row
        sections = dict(bench.METHODS[row][2] or {})
        warm = sections.pop("warm_start", None)
        if name is None:
            assert sections == (overrides or {}), row
            continue
        with open(os.path.join(ROOT, "configs", f"{name}.yaml")) as f:
            raw = yaml.safe_load(f)
        want = _method_part(raw)
        for section, values in (overrides or {}).items():
            if values is None:
                want.pop(section, None)
            else:
                want[section] = {**want.get(section, {}), **values}
        assert sections == want, row
        if raw["train"].get("init_from"):
            assert warm["learning_rate"] == raw["optimizer"]["learning_rate"]
            assert bench.ROWS[warm["from"]][2] == os.path.basename(
                raw["train"]["init_from"]
            )
        else:
            assert warm is None, row
        checked += 1
    assert checked >= 20


def test_a_changed_config_changes_the_row(tmp_path):
    """The settings come from the config files (here a copy with another
    MS alpha), not from a table inside the benchmark."""
    configs = tmp_path / "configs"
    shutil.copytree(os.path.join(ROOT, "configs"), configs)
    raw = yaml.safe_load((configs / "ms_cjk.yaml").read_text())
    raw["loss"]["alpha"] = 7.0
    (configs / "ms_cjk.yaml").write_text(yaml.safe_dump(raw))
    table = bench.method_table(str(configs))
    assert table["ms"][2]["loss"]["alpha"] == 7.0
    assert bench.METHODS["ms"][2]["loss"]["alpha"] == 2.0


def test_committed_results_render_unchanged(tmp_path):
    """The results format stays: the committed JSON (written by the old
    ``python -m tfdml.bench``) re-renders to the committed Markdown."""
    results = os.path.join(ROOT, "benchmarks", "results")
    name = "cjk_glyphs_small_300steps"
    src = os.path.join(results, f"quality_{name}.json")
    rc = bench.main(["--out", str(tmp_path), "--name", name, "--render", src])
    assert rc == 0
    want = open(os.path.join(results, f"quality_{name}.md")).read()
    assert (tmp_path / f"quality_{name}.md").read_text() == want
    assert json.loads((tmp_path / f"quality_{name}.json").read_text()) == (
        json.loads(open(src).read())
    )


def test_recorded_command_lines_old_and_new():
    flags = ["--dataset", "synthetic", "--steps", "4", "--epochs", "2"]
    for prefix in ("python -m tfdml.bench", bench.COMMAND):
        assert bench._recorded_argv(f"{prefix} " + " ".join(flags)) == flags


def test_tfdml_bench_says_where_it_went(capsys):
    from tfdml import bench as moved

    with pytest.warns(DeprecationWarning, match="benchmarks/quality.py"):
        assert moved.main([]) == 2
    assert "benchmarks/quality.py" in capsys.readouterr().err
