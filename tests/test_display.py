"""The CLI's tables fit an 80-column terminal without cutting a header, and say what stage a job is in."""
import pytest
from rich.console import Console

from orchestrator.cli import _stage_line, _trial_columns, _trial_table
from orchestrator.display import Column, fit_table

TRIAL = {"trial_id": "3f9a2c1d", "status": "terminated", "metric": 91.23, "metric_drop": 0.41,
         "size_bytes": 11_200_000, "latency_ms_b1": 3.21, "latency_ms_b32": 41.7, "params": 5_400_321,
         "attempts": 1, "on_front": True}


def _render(table, width: int) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(table)
    return console.export_text().splitlines()


def test_trial_table_fits_80_columns_with_whole_headers():
    lines = _render(_trial_table([TRIAL] * 3, "job-1: all trials", width=80), 80)
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert "…" not in text  # nothing truncated, headers included
    for kept in ("3f9a2c1d", "91.23", "11.20 MB", "3.21"):
        assert kept in text  # the columns that matter most survive


def test_wide_terminal_keeps_every_column():
    text = "\n".join(_render(_trial_table([TRIAL], "t", width=200), 200))
    for column in _trial_columns():
        assert column.header in text


def test_least_important_columns_go_first():
    columns = [Column("a", "alpha", priority=9), Column("b", "beta_beta_beta", priority=0),
               Column("c", "gamma", priority=5)]
    rows = [{"a": "x" * 20, "b": "y" * 20, "c": "z" * 20}]
    text = "\n".join(_render(fit_table(None, columns, rows, width=52), 52))
    assert "alpha" in text and "gamma" in text and "beta" not in text


def test_stage_line_reports_progress():
    assert _stage_line({"stage": None}) == ""
    assert _stage_line({"stage": "teacher", "progress": {"done": 50, "total": 200, "unit": "steps"}}) == \
        "stage: teacher (50/200 steps, 25%)"
    assert _stage_line({"stage": "teacher", "progress": {"what": "fine-tuning", "done": 5, "total": 20,
                                                         "unit": "steps"}}) == \
        "stage: teacher, fine-tuning (5/20 steps, 25%)"
    job = {"stage": "search", "progress": {"done": 0, "total": 8, "unit": "trials"},
           "trial_counts": {"terminated": 2, "stopped_early": 1, "running": 1}}
    assert _stage_line(job) == "stage: search (3/8 trials, 38%)"


_TUNE_RUN = """
import sys
from orchestrator.display import quiet_third_parties
quiet_third_parties(verbose=sys.argv[1] == "verbose")
from common.raylink import connect
connect(None, num_cpus=1)
from ray import tune
def f(config):
    tune.report({"step": 1, "metric": 1.0})
tune.Tuner(f, param_space={"x": tune.choice([1, 2])}, tune_config=tune.TuneConfig(num_samples=2),
           run_config=tune.RunConfig(storage_path=sys.argv[2], verbose=0)).fit()
print("finished")
"""


@pytest.mark.slow
def test_third_party_banners_only_with_verbose(tmp_path):
    import os
    import subprocess
    import sys

    def run(mode):
        out = subprocess.run([sys.executable, "-c", _TUNE_RUN, mode, str(tmp_path / mode)], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        assert "finished" in out.stdout, out.stderr[-2000:]
        return out.stdout + out.stderr

    quiet, loud = run("quiet"), run("verbose")
    for noise in ("Configuration for experiment", "tensorboard", "Token authentication"):
        assert noise not in quiet
    assert "tensorboard" in loud.lower() and "Configuration for experiment" in loud
