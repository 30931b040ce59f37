"""The evaluation benchmark scripts still run (tiny sizes, no timing)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_eval_benchmark_tables(capsys):
    ev = _load("eval")
    # 400 points in full, then 1,000 points timed on a 100-query sample.
    ev.bench_metrics([400, 1000], [0.5], full_max_n=500, query_sample=100)
    ev.bench_scann([3000], nq=20)
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| 0.5 |")]
    assert [r.split("|")[2:4] for r in rows] == [
        [" 400 ", " 400 "],
        [" 1,000 ", " 100 "],
    ]
    # well-separated classes: perfect retrieval on the sample as well
    assert all(r.rstrip(" |").endswith("1.0000") for r in rows)
    assert "| 3,000 |" in out


def test_full_run_script(capsys):
    _load("eval_full_1m").main(["--n", "600"])
    out = capsys.readouterr().out
    row = [r for r in out.splitlines() if r.startswith("| 600 |")]
    assert len(row) == 1 and "1.0000" in row[0]
