"""Every benchmark script still runs: each one's --smoke mode (a tiny model and a few samples, the same code paths as
a measurement) exits 0 and prints every row of its table. The numbers mean nothing at this size; benchmarks/README.md
has the measured ones."""
import os
import sys

import pytest
from helpers import ROOT, run_cli

BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)  # throughput's table of modes


def smoke(script, tmp_path, timeout=600):
    result = run_cli([sys.executable, os.path.join(BENCHMARKS, script), "--smoke", "--workdir", str(tmp_path)],
                     timeout=timeout)
    assert result.returncode == 0, f"{script} --smoke: exit {result.returncode}\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    assert "failed" not in result.stdout
    return result.stdout


@pytest.mark.e2e
def test_throughput_runs_every_mode_and_the_loss_alone(tmp_path):
    import throughput

    printed = smoke("throughput.py", tmp_path)
    for mode, name in throughput.MODES.items():
        assert f"({mode}) {name}" in printed
    assert "chunked   peak memory added" in printed and "standard  peak memory added" in printed


@pytest.mark.e2e
@pytest.mark.distributed
def test_long_context_runs_with_and_without_sequence_parallelism(tmp_path):
    rows = [line.split() for line in smoke("long_context.py", tmp_path).splitlines()]
    assert [row[:2] for row in rows if row[:1] == ["256"]] == [["256", "1"], ["256", "2"]]


@pytest.mark.e2e
def test_preprocess_measures_speed_the_cache_and_memory_per_rank(tmp_path):
    printed = smoke("preprocess.py", tmp_path)
    assert "warm start (cache hit" in printed and "built by ['rank 0']" in printed


@pytest.mark.e2e
def test_cache_layout_reads_both_layouts(tmp_path):
    assert "reading every sample: numpy" in smoke("cache_layout.py", tmp_path)


@pytest.mark.e2e
def test_profile_step_splits_a_step_and_times_the_loss_both_ways(tmp_path):
    printed = smoke("profile_step.py", tmp_path)
    assert "loss matmuls" in printed and "optimizer" in printed
    assert "with two passes of exp (before 2026-12-04)" in printed
