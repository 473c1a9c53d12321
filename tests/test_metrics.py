"""SPEC section 3 on hand-built matrices, and the metrics CLI."""

import json
import subprocess
import sys

import pytest

from badit_exp import metrics as M

# rows = after stage i, columns = task j
A = [[50.0, 10.0, 20.0],
     [40.0, 60.0, 30.0],
     [30.0, 45.0, 70.0]]
SINGLE = {"a": 55.0, "b": 50.0, "c": 80.0}


def test_hand_computed():
    assert M.rouge(A) == pytest.approx((30 + 45 + 70) / 3)
    # sequential forward: ((50-55) + (60-50) + (70-80)) / 3
    assert M.forward(A, [55, 50, 80]) == pytest.approx(-5 / 3)
    # mixed forward uses the last row: ((30-55) + (45-50) + (70-80)) / 3
    assert M.forward(A, [55, 50, 80], "mixed") == pytest.approx(-40 / 3)
    # forget: max over rows 1..T-1 (ALL of them): task a max(50,40)=50 -> 20; task b
    # max(10,60)=60 -> 15; divisor T-1 = 2
    assert M.forget_rate(A) == pytest.approx((20 + 15) / 2)
    # backward: ((30-50) + (45-60) + 0) / 3
    assert M.backward(A) == pytest.approx(-35 / 3)
    assert M.forget_rate_textbook(A) == pytest.approx(((50 - 30) + (60 - 45)) / 2)
    assert M.backward_textbook(A) == pytest.approx(-35 / 2)


def test_forget_rate_max_runs_over_rows_before_training():
    # task b scores 80 BEFORE it is trained (row 1), 60 after; the SPEC maximum sees the 80
    B = [[50.0, 80.0, 0.0], [40.0, 60.0, 0.0], [40.0, 60.0, 0.0]]
    assert M.forget_rate(B) == pytest.approx(((50 - 40) + (80 - 60)) / 2)
    assert M.forget_rate_textbook(B) == pytest.approx(((50 - 40) + (60 - 60)) / 2)


def test_compute_metrics_forward_missing_is_null():
    out = M.compute_metrics(A, ["a", "b", "c"], "sequential", None)
    assert out["forward"] is None and "single" in out["forward_missing_reason"]
    for k in ("rouge", "forget_rate", "backward", "forget_rate_textbook", "backward_textbook"):
        assert out[k] is not None
    out = M.compute_metrics(A, ["a", "b", "c"], "sequential", SINGLE)
    assert out["forward"] == pytest.approx(-5 / 3)
    out = M.compute_metrics([A[-1]], ["a", "b", "c"], "mixed", SINGLE)
    assert set(out) == {"rouge", "forward"} and out["forward"] == pytest.approx(-40 / 3)


def test_csv_roundtrip(tmp_path):
    p = tmp_path / "scores.csv"
    p.write_text(M.format_matrix_csv(["a", "b", "c"], ["a", "b", "c"], A))
    stages, tasks, B = M.read_matrix_csv(p)
    assert stages == tasks == ["a", "b", "c"] and B == A
    p.write_text("stage,a,b\na,1\n")
    with pytest.raises(ValueError, match="row 2"):
        M.read_matrix_csv(p)


def test_cli(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("stage,x 1,y,z\nx 1,50,10,20\ny,40,60,30\nz,30,45,70\n")
    s = tmp_path / "single.json"
    s.write_text(json.dumps({"x 1": 55, "y": 50, "z": 80}))
    out = subprocess.run([sys.executable, "-m", "badit_exp.metrics", "--matrix", str(p),
                          "--single", str(s)], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    assert res["mode"] == "sequential" and res["tasks"] == ["x 1", "y", "z"]
    assert res["forget_rate"] == pytest.approx(17.5) and res["forward"] == pytest.approx(-5 / 3)
    assert res["backward"] == pytest.approx(-35 / 3)
    c = tmp_path / "single.csv"
    c.write_text("task,score\nx 1,55\ny,50\nz,80\n")
    out = subprocess.run([sys.executable, "-m", "badit_exp.metrics", "--matrix", str(p),
                          "--single", str(c)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["forward"] == pytest.approx(-5 / 3)
    out = subprocess.run([sys.executable, "-m", "badit_exp.metrics", "--matrix", str(p)],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["forward"] is None
