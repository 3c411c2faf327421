"""The GPU suite's CPU-safe parts: its arguments, its per-part bookkeeping and its JSON file."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_suite  # noqa: E402


def test_arguments_default_to_every_part_and_refuse_an_unknown_one(capsys):
    args = gpu_suite.parse([])
    assert args.parts == list(gpu_suite.PARTS) and set(gpu_suite.PART_FUNCTIONS) == set(gpu_suite.PARTS)
    assert gpu_suite.parse(["--parts", "sync, step"]).parts == ["sync", "step"]
    with pytest.raises(SystemExit):
        gpu_suite.parse(["--parts", "step,warp"])
    assert "unknown part(s) warp" in capsys.readouterr().err


def test_each_part_records_its_result_error_or_skip_and_the_file_is_whole_json(tmp_path):
    # the suite's clock, read at its start, then before, at the start and at the end of each part:
    # step takes 2 s, clustering 3 s, and 9 s have passed when train would start
    ticks = iter([0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 5.0, 9.0])

    def broken(_):
        raise RuntimeError("no faiss GPU")

    args = gpu_suite.parse(["--parts", "step,clustering,train", "--budget-s", "8"])
    parts = {"step": lambda a: {"rows": [{"ms": 1.5}], "pairs": a.pairs}, "clustering": broken,
             "train": lambda a: pytest.fail("started after the budget")}
    got = gpu_suite.run_parts(args, parts, clock=lambda: next(ticks))
    assert got["step"] == {"rows": [{"ms": 1.5}], "pairs": 16, "seconds": 2.0}
    assert got["clustering"]["error"] == "RuntimeError: no faiss GPU" and got["clustering"]["seconds"] == 3.0
    assert "no faiss GPU" in got["clustering"]["traceback"]
    assert got["train"] == {"skipped": "the suite's budget of 8 s was spent"}

    out = tmp_path / "deep" / "suite.json"
    gpu_suite.write_json(out, {"parts": got, "machine": "m"})
    assert json.loads(out.read_text()) == {"parts": got, "machine": "m"}
    assert [p.name for p in out.parent.iterdir()] == ["suite.json"]  # no temporary file left


def test_the_script_writes_the_file_naming_a_failed_part_and_exits_1(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_suite.PART_FUNCTIONS, "sync", lambda a: {"host_syncs": 0, "by_line": {}})
    out = tmp_path / "s.json"
    code = gpu_suite.main(["--parts", "sync,clustering", "--out", str(out), "--points", "1000"])
    result = json.loads(out.read_text())
    assert result["parts"]["sync"]["host_syncs"] == 0 and "cores visible" in result["machine"]
    # faiss-cpu sees no GPU: the round runs on the CPU and says so; nothing fails
    assert result["parts"]["clustering"]["faiss_gpus"] == 0 and result["parts"]["clustering"]["round_s"] > 0
    assert code == 0
    monkeypatch.setitem(gpu_suite.PART_FUNCTIONS, "sync", lambda a: 1 / 0)
    assert gpu_suite.main(["--parts", "sync", "--out", str(out)]) == 1
    assert json.loads(out.read_text())["parts"]["sync"]["error"].startswith("ZeroDivisionError")
