"""Reading a finished job back from the store: the search's cost, the front table, its hypervolume, the plot."""
from __future__ import annotations

import pytest

from conftest import promotion_store

from orchestrator.report import describe_config, front_summary, markdown, plot_front, search_stats

TRIALS = [
    {"trial_id": "t_big", "metric": 89.5, "size_bytes": 5_000_000, "latency_ms_b1": 2.5,
     "config": {"student": {"layers": 4}, "quant": {"mode": "dynamic", "embedding_bits": 4}}},
    {"trial_id": "t_small", "metric": 87.0, "size_bytes": 1_000_000, "latency_ms_b1": 1.0,
     "config": {"student": {"layers": 2, "layer_choice": "top"}, "prune": {"kind": "structured", "sparsity": 0.45},
                "lowrank": {"ratio": 0.5}, "quant": {"mode": "int4", "group_size": 32},
                "distill": {"temperature": 2.04, "alpha": 0.9, "hidden_weight": 1.0}, "train": {"lr": 0.00012}}},
    {"trial_id": "t_worse", "metric": 80.0, "size_bytes": 6_000_000, "latency_ms_b1": 3.0, "on_front": False,
     "status": "stopped_early"},
    {"trial_id": "t_err", "status": "error", "on_front": False},
]


@pytest.fixture
def store(tmp_path):
    s = promotion_store(f"sqlite:///{tmp_path / 'r.db'}", "job-r", [t for t in TRIALS if t.get("status") != "error"])
    s.trial_started("job-r", "t_err", {})
    s.trial_failed("job-r", "t_err", "boom", None)
    for tid, steps in (("t_big", (50, 100)), ("t_small", (50, 100, 150)), ("t_worse", (50,))):
        for step in steps:
            s.trial_reported("job-r", tid, step, {"metric": 80.0})
    s.set_remeasured_latency("job-r", "t_small", 0.8)
    return s


def test_search_stats_count_outcomes_and_steps_from_the_store(store):
    stats = search_stats(store, "job-r")
    assert (stats["trials"], stats["completed"], stats["stopped_early"], stats["failed"]) == (4, 2, 1, 1)
    assert stats["training_steps"] == 100 + 150 + 50
    assert stats["status"] == "finished"


def test_describe_config_names_each_technique_briefly():
    assert describe_config(TRIALS[1]["config"]) == \
        "2L top · heads+FFN 45% · low-rank 0.5 · int4 · T 2.0 · hidden 1 · lr 1.2e-04"
    assert describe_config(TRIALS[0]["config"]) == "4L · int8 dyn, emb 4-bit"
    assert describe_config({"prune": {"kind": "none"}, "quant": {"mode": "none"}}) == "teacher copy"


def test_markdown_lists_the_front_with_ratios_against_the_teacher(store):
    md = markdown(store, "job-r", promoted="t_small")
    rows = [line for line in md.splitlines() if line.startswith("| t_")]
    assert [r.split(" | ")[0] for r in rows] == ["| t_small", "| t_big"]  # by size; off-front trials left out
    small = rows[0].split(" | ")
    # teacher: 90.0 points, 10 MB, 5 ms; t_small's latency is the re-measured 0.8 ms
    # a job from before task.selection chose on dev: no selection column value
    assert small[2:9] == ["87.00", "3.00", "–", "1.00", "10.00", "0.80", "6.25"] and small[9] == "**yes** |"
    hv = front_summary(store, "job-r")["hypervolume"]
    assert hv > 0 and f"**{hv:.4f}**" in md
    assert "4 trials: 2 ran to the end, 1 stopped early by ASHA, 1 failed" in md


def test_plot_marks_baselines(store, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its points back
    out = plot_front(store, "job-r", tmp_path / "front.png",
                     marks=[{"label": "PTQ", "metric": 88.0, "size_bytes": 6e6, "latency_ms_b1": 2.0}])
    [fig] = figures
    try:
        size_ax, latency_ax = fig.axes

        def points(ax):
            return {c.get_label(): sorted(map(tuple, c.get_offsets().tolist())) for c in ax.collections}

        # x: MB on the size panel, ms on the latency panel (t_small's re-measured 0.8 ms); y: the metric
        assert points(size_ax) == {"trials": [(6.0, 80.0)], "Pareto front": [(1.0, 87.0), (5.0, 89.5)],
                                   "teacher": [(10.0, 90.0)], "PTQ": [(6.0, 88.0)]}
        assert points(latency_ax) == {"trials": [(3.0, 80.0)], "Pareto front": [(0.8, 87.0), (2.5, 89.5)],
                                      "teacher": [(5.0, 90.0)], "PTQ": [(2.0, 88.0)]}
        [legend] = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == ["trials", "Pareto front", "teacher", "PTQ"]
    finally:
        close(fig)
    assert Image.open(out).format == "PNG"
