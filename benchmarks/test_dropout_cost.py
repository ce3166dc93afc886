"""A smoke run of dropout_cost.py (the program must not rot): one small case, each column timed."""
import pytest

from dropout_cost import main
from spinal_ops import available_backends


def test_dropout_cost_prints_a_row(capsys):
    if not available_backends()["cpu"]:
        pytest.skip(f"cpu backend: {available_backends()['cpu'].reason}")
    main(["--preset", "20,8,3,4", "--batch", "8", "--min-run-time", "0.01", "--dropout", "0.3"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 20,8,3,4 | 8 |")]
    assert len(rows) == 1 and rows[0].count("|") == 9, rows
