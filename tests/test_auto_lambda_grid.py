"""benchmarks/auto_lambda_grid.py on run directories written by hand (no model): runs are
sorted into cells of (target task, T, N) by their config, auto's share of plain ES's held-out gain and its
KL cut are the ratios of the runs' own numbers, and the best rung is the largest KL cut among
the rungs that keep at least 90% of the gain."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import auto_lambda_grid  # noqa: E402

N_EXAMPLES = 42  # a multiple of 3: the per-example spread (i % 3 − 1) has mean 0


def write_run(root: Path, name: str, gain: float, kl: float, **config: Any) -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    cfg = {"model": "embedded", "task": "conciseness", "sigma": 0.002, "learning_rate": 0.005, "seed": 0,
           "max_train_samples": 8, "max_new_tokens": 24, "awd": "none", **config}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    base = [-80.0 + (i % 7) for i in range(N_EXAMPLES)]
    rows = [{"iteration": it, "task": cfg["task"], "n": N_EXAMPLES, "limit": None, "max_new_tokens": 24,
             "accuracy": 0.0, "correct": [0] * N_EXAMPLES, "task_version": "2",
             "rewards": [b + (gain + (i % 3 - 1) if it else 0.0) for i, b in enumerate(base)]}
            for it in (0, cfg["max_steps"])]
    (run / "eval" / "forgetting.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "metrics.jsonl").write_text("")
    kl_rows = [{"iteration": it, "task": t, "kl_exact_token": kl * (1 + 0.1 * j) if it else 0.0}
               for it in (0, cfg["max_steps"]) for j, t in enumerate(("hellaswag", "piqa"))]
    (run / "kl.json").write_text(json.dumps(kl_rows))
    return run


def test_cells_compare_auto_with_plain_es_and_the_ladder(tmp_path: Path) -> None:
    cell = {"max_steps": 10, "population_size": 4}
    write_run(tmp_path, "es", 10.0, 0.2, **cell)
    write_run(tmp_path, "auto", 9.5, 0.08, **cell, awd="l2", awd_lambda="auto", awd_lambda_chosen=20.0)
    write_run(tmp_path, "c0.3", 10.5, 0.15, **cell, awd="l2", awd_lambda=6)
    write_run(tmp_path, "c3", 8.0, 0.02, **cell, awd="l2", awd_lambda=60)      # 80%: too little gain kept
    write_run(tmp_path, "seed1", 3.0, 0.5, **cell, seed=1)                      # another seed: not in the cell
    write_run(tmp_path, "other", 5.0, 0.1, max_steps=40, population_size=4)     # a cell without auto: skipped
    (result,) = auto_lambda_grid.cells([tmp_path])
    assert result["cell"] == {"max_steps": 10, "population_size": 4, "task": "conciseness", "seed": 0}
    assert result["auto_lambda"] == 20.0
    assert result["auto_share"] == pytest.approx(0.95)
    assert result["auto_kl_cut"] == pytest.approx(0.2 / 0.08)
    assert result["auto_goal_met"] is True
    assert (result["best_run"], result["best_kl_cut"]) == ("auto", pytest.approx(2.5))
    assert [r["run"] for r in result["rungs"]] == ["es", "c0.3", "auto", "c3"]
    assert "| conciseness | 10, 4 | c3 | 60 |" in auto_lambda_grid.markdown([result])


def test_a_cell_whose_runs_differ_in_another_setting_is_refused(tmp_path: Path) -> None:
    write_run(tmp_path, "es", 10.0, 0.2, max_steps=10, population_size=4)
    write_run(tmp_path, "auto", 9.0, 0.1, max_steps=10, population_size=4, awd="l2", awd_lambda="auto", sigma=0.001)
    with pytest.raises(ValueError, match="another setting"):
        auto_lambda_grid.cells([tmp_path])


def test_earlier_cells_keep_their_rungs_and_a_new_run_joins_its_cell(tmp_path: Path) -> None:
    cell = {"max_steps": 10, "population_size": 4}
    first, second = tmp_path / "first", tmp_path / "second"
    write_run(first, "es", 10.0, 0.2, **cell)
    write_run(first, "auto", 5.0, 0.08, **cell, awd="l2", awd_lambda="auto", awd_lambda_chosen=20.0)
    earlier = json.loads(json.dumps(auto_lambda_grid.cells([first])))   # as read back from --json
    assert earlier[0]["best_run"] is None, "auto keeps 50%: no rung keeps 90%"
    write_run(second, "c0.5", 9.2, 0.09, **cell, awd="l2", awd_lambda=10)                   # joins the old cell
    write_run(second, "t40-es", 12.0, 0.3, max_steps=40, population_size=4)                # a new cell
    write_run(second, "t40-auto", 11.0, 0.1, max_steps=40, population_size=4, awd="l2", awd_lambda="auto",
              awd_lambda_chosen=5.0)
    old, new = auto_lambda_grid.cells([second], earlier)
    assert [r["run"] for r in old["rungs"]] == ["es", "c0.5", "auto"] and old["es_gain"] == pytest.approx(10.0)
    assert (old["best_run"], old["best_share"], old["best_kl_cut"]) == ("c0.5", pytest.approx(0.92), pytest.approx(0.2 / 0.09))
    assert old["auto_share"] == pytest.approx(0.5) and old["auto_goal_met"] is False
    assert new["cell"]["max_steps"] == 40 and new["auto_share"] == pytest.approx(11 / 12) and new["auto_goal_met"]
    assert auto_lambda_grid.cells([], earlier) == earlier, "nothing new: the earlier result unchanged"


def test_a_new_plain_es_run_replaces_the_earlier_one_and_another_task_is_another_cell(tmp_path: Path) -> None:
    cell = {"max_steps": 10, "population_size": 4}
    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    write_run(first, "es-old", 10.0, 0.2, **cell)
    write_run(first, "auto", 9.5, 0.08, **cell, awd="l2", awd_lambda="auto", awd_lambda_chosen=20.0)
    earlier = json.loads(json.dumps(auto_lambda_grid.cells([first])))
    write_run(second, "es-new", 20.0, 0.2, **cell)  # plain ES measured again under another name
    (result,) = auto_lambda_grid.cells([second], earlier)
    assert [r["run"] for r in result["rungs"]] == ["es-new", "auto"], "one plain-ES rung: the new one"
    assert result["auto_share"] == pytest.approx(9.5 / 20) and result["best_run"] is None
    # The same (T, N) on another target task: a cell of its own, after the earlier task's cells.
    write_run(third, "listing-es", 2.0, 0.4, **cell, task="listing")
    write_run(third, "listing-auto", 1.9, 0.1, **cell, task="listing", awd="l2", awd_lambda="auto",
              awd_lambda_chosen=20.0)
    write_run(third, "listing-c3", 1.0, 0.02, **cell, task="listing", awd="l2", awd_lambda=60)
    old, listing = auto_lambda_grid.cells([third], earlier)
    assert old == earlier[0], "the conciseness cell is untouched by runs on another task"
    assert listing["cell"] == {"max_steps": 10, "population_size": 4, "task": "listing", "seed": 0}
    assert [r["run"] for r in listing["rungs"]] == ["listing-es", "listing-auto", "listing-c3"]
    assert listing["auto_share"] == pytest.approx(0.95) and listing["auto_kl_cut"] == pytest.approx(4.0)
    assert listing["best_run"] == "listing-auto", "c3 keeps 50%"
    assert "| listing | 10, 4 | 20 | 95% | 4.00× | yes |" in auto_lambda_grid.markdown([old, listing])


def test_under_proportional_gain_no_l2_step_keeps_90_percent_with_2x_less_kl() -> None:
    """The figure's model curve: where the share kept reaches 90% (c = s·T ≈ 0.2) the KL cut is
    about 1.2×, and the curve never enters the goal's corner, at any horizon of the grid."""
    cs = [0.01 * 1.1**k for k in range(80)]
    for T in (10, 20, 40):
        curve = auto_lambda_grid.model_curve(T, cs)
        assert all(share < auto_lambda_grid.KEEP for cut, share in curve if cut >= 2.0)
        assert max(cut for cut, share in curve if share >= auto_lambda_grid.KEEP) == pytest.approx(1.22, abs=0.03)
        assert curve[0][1] > curve[-1][1] and curve[0][0] < curve[-1][0], "a stronger pull keeps less, cuts more"


def test_the_figure_draws_every_cell(tmp_path: Path) -> None:
    cell = {"max_steps": 10, "population_size": 4}
    write_run(tmp_path, "es", 10.0, 0.2, **cell)
    write_run(tmp_path, "auto", 9.5, 0.08, **cell, awd="l2", awd_lambda="auto", awd_lambda_chosen=20.0)
    result = auto_lambda_grid.cells([tmp_path])
    png = auto_lambda_grid.figure(result, tmp_path / "fig" / "grid.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_over_seeds_pairs_each_seed_with_its_own_plain_es_run(tmp_path: Path) -> None:
    """Shares and cuts are against the same seed's plain ES; the interval over seeds is the
    t-interval of the per-seed values; a fixed λ at auto's horizon (s·T = 1) counts as auto."""
    from scipy import stats

    cell = {"max_steps": 10, "population_size": 4}
    for seed, (es_gain, es_kl, auto_gain, auto_kl) in enumerate([(10.0, 0.2, 9.5, 0.08), (8.0, 0.3, 4.0, 0.1),
                                                                  (12.0, 0.25, 12.0, 0.1)]):
        write_run(tmp_path, f"es-s{seed}", es_gain, es_kl, **cell, seed=seed)
        auto = {"awd_lambda": "auto", "awd_lambda_chosen": 20.0} if seed != 1 else {"awd_lambda": 20.0}
        write_run(tmp_path, f"auto-s{seed}", auto_gain, auto_kl, **cell, seed=seed, awd="l2", **auto)
    write_run(tmp_path, "c3-s0", 5.0, 0.02, **cell, awd="l2", awd_lambda=60)            # one seed: no row
    write_run(tmp_path, "t40-es", 5.0, 0.1, max_steps=40, population_size=4)             # one seed: no cell
    write_run(tmp_path, "t40-auto", 5.0, 0.1, max_steps=40, population_size=4, awd="l2", awd_lambda="auto",
              awd_lambda_chosen=5.0)
    (result,) = auto_lambda_grid.over_seeds([tmp_path])
    assert result["cell"] == {"task": "conciseness", "max_steps": 10, "population_size": 4}
    assert [a["arm"] for a in result["arms"]] == ["es", "auto"], "c3 has one seed"
    auto = result["arms"][1]
    shares, cuts = [0.95, 0.5, 1.0], [2.5, 3.0, 2.5]
    assert auto["seeds"] == [0, 1, 2] and [r["run"] for r in auto["per_seed"]] == ["auto-s0", "auto-s1", "auto-s2"]
    assert [r["share"] for r in auto["per_seed"]] == pytest.approx(shares)
    assert [r["kl_cut"] for r in auto["per_seed"]] == pytest.approx(cuts)
    assert [r["goal_met"] for r in auto["per_seed"]] == [True, False, True] and auto["seeds_meeting_goal"] == 2
    mean = sum(shares) / 3
    half = stats.t.ppf(0.975, 2) * stats.tstd(shares) / 3**0.5
    assert (auto["share"]["mean"], auto["share"]["lo"], auto["share"]["hi"]) == pytest.approx((mean, mean - half, mean + half))
    assert auto["pooled_share"] == pytest.approx(25.5 / 30) and auto["pooled_kl_cut"] == pytest.approx(0.25 / (0.28 / 3))
    assert auto["pooled_goal_met"] is False, "85% pooled"
    table = auto_lambda_grid.seeds_markdown([result])
    assert "| conciseness | 10, 4 | auto | 20 | 0, 1, 2 | 95%, 50%, 100% | 2.50×, 3.00×, 2.50× |" in table
    assert "2 of 3 |" in table
    png = auto_lambda_grid.seeds_figure([result], tmp_path / "seeds.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_over_seeds_refuses_a_cell_whose_seeds_differ_in_another_setting(tmp_path: Path) -> None:
    cell = {"max_steps": 10, "population_size": 4}
    write_run(tmp_path, "es-s0", 10.0, 0.2, **cell)
    write_run(tmp_path, "es-s1", 10.0, 0.2, **cell, seed=1, sigma=0.001)
    with pytest.raises(ValueError, match="another setting"):
        auto_lambda_grid.over_seeds([tmp_path])
