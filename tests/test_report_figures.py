"""`esft report` figures on run directories written by hand (no model needed): every
figure is written, readable (one legend outside the panels, integer iteration ticks,
labels inside the canvas), and the drift overlay is Eq. 2 for each run's own α, N, d."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from esft.report import figures
from esft.report.runs import build_report, load_run

FIGURES = ("forgetting_curves.png", "task_curves.png", "lambda.png", "drift.png", "kl_heatmap.png", "kl_budget.png")
D = 10_000  # trainable weights of the synthetic runs


def write_run(root: Path, name: str, config: dict[str, Any], evals: list[dict[str, Any]],
              metrics: list[dict[str, Any]], kl: list[dict[str, Any]] | None = None) -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "eval" / "forgetting.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if kl is not None:
        (run / "kl.json").write_text(json.dumps(kl))
    return run


def evals(tasks: dict[str, float], drift: float, its: tuple[int, ...] = (0, 5, 10), n: int = 20) -> list[dict[str, Any]]:
    """Rows whose accuracy moves by `drift` per task over the run, with per-example results."""
    rows = []
    for k in its:
        for t, p in tasks.items():
            hits = round(n * min(1.0, max(0.0, p + drift * k / its[-1] * (1 if t == "countdown" else -1))))
            rows.append({"iteration": k, "task": t, "accuracy": hits / n, "n": n, "limit": n, "max_new_tokens": 64,
                         "correct": [1] * hits + [0] * (n - hits)})
    return rows


def metrics(cfg: dict[str, Any], T: int = 10, kl: bool = False) -> list[dict[str, Any]]:
    s = 0.0 if cfg.get("awd", "none") == "none" else cfg["learning_rate"] * cfg["awd_lambda"]
    out, x = [], 0.0
    for t in range(1, T + 1):
        x = (1 - s) ** 2 * (x + cfg["learning_rate"] ** 2 * D / cfg["population_size"])
        m = {"iteration": t, "reward/mean": 0.1 + 0.05 * t, "drift/norm": 1.1 * math.sqrt(x), "params/trainable": D}
        if s:
            m["awd/step"] = s
        if kl and t == 1:
            m["kl/probe"] = 0.0012
        if kl and t % 2 == 0:
            m |= {"kl/measured": 0.001 * t, "kl/budget": 0.006}
        out.append(m)
    return out


def es(**kw: Any) -> dict[str, Any]:
    return {"model": "embedded", "task": "countdown", "population_size": 30, "learning_rate": 5e-3, "awd": "none",
            "output_dir": "runs/x", **kw}


TASKS = {"countdown": 0.1, "piqa": 0.6, "hellaswag": 0.4}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[list[Any], dict[str, Any], list[Any], Path]:
    """A small sweep loaded as the report sees it: no AWD, L2 at two λ, L1 (another N),
    and GRPO without target evaluations (its target panel falls back to the reward)."""
    from esft.report.evals import choose_settings
    from esft.report.tables import comparison

    root = tmp_path_factory.mktemp("report")
    kl = [{"iteration": 10, "task": t, "kl_exact_token": 0.01 * (i + 1)} for i, t in enumerate(TASKS)]
    cfgs = {"es": es(), "l2_1": es(awd="l2", awd_lambda=1.0, output_dir="runs/l2_1"),
            "l2_10": es(awd="l2", awd_lambda=10.0, output_dir="runs/l2_10"),
            "l1": es(awd="l1", awd_lambda=0.01, population_size=20)}
    dirs = [write_run(root, name, cfg, evals(TASKS, 0.3 / (1 + i)), metrics(cfg, kl=name == "l2_10"), kl)
            for i, (name, cfg) in enumerate(cfgs.items())]
    grpo = {"trainer": "grpo", "task": "countdown", "model": "embedded", "beta": 0.005}
    dirs.append(write_run(root, "grpo", grpo, evals({"piqa": 0.6, "hellaswag": 0.4}, 0.2),
                          [{"iteration": t, "reward/mean": 0.05 * t} for t in range(1, 11)], kl))
    runs = [load_run(d) for d in dirs]
    settings = choose_settings([r.evals for r in runs])
    return runs, settings, comparison(runs, settings), root


def inspect(fig) -> dict[str, Any]:
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    legends = [leg.get_window_extent(renderer) for leg in fig.legends]
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    texts = [t for ax in panels for t in (ax.title, ax.xaxis.label, ax.yaxis.label, *_drawn_ticks(ax))
             if t.get_text() and t.get_visible()]
    outside = [t.get_text() for t in texts if not _inside(t.get_window_extent(renderer), canvas)]
    return {
        "figure_legends": len(fig.legends),
        "panel_legends": sum(ax.get_legend() is not None for ax in fig.axes),
        "legend_over_panel": any(leg.overlaps(ax.get_window_extent(renderer)) for leg in legends for ax in panels),
        "iteration_ticks": [float(x) for ax in panels if ax.get_xlabel() == "iteration" for x in ax.get_xticks()],
        "text_outside_canvas": outside,
        "dots": [len(c.get_offsets()) for ax in fig.axes for c in ax.collections if c.get_offsets().ndim == 2],
    }


def recording_save(seen: dict[str, Any]):
    """A stand-in for figures._save that saves (which lays the figure out), then records what
    `inspect` sees of it."""
    def save(fig, path: Path) -> Path:
        fig.savefig(path)
        seen.update(inspect(fig))
        figures.plt.close(fig)
        return path
    return save


def _drawn_ticks(ax) -> list[Any]:
    """Tick labels inside the view limits: matplotlib lays out but does not draw the others."""
    (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
    xs = [t.label1 for t in ax.xaxis.get_major_ticks() if x0 <= t.get_loc() <= x1]
    ys = [t.label1 for t in ax.yaxis.get_major_ticks() if y0 <= t.get_loc() <= y1]
    ys += [t.label2 for t in ax.yaxis.get_major_ticks() if y0 <= t.get_loc() <= y1 and t.label2.get_visible()]
    return xs + ys


def _inside(box, canvas, slack: float = 1.0) -> bool:
    return (box.x0 >= canvas.x0 - slack and box.y0 >= canvas.y0 - slack
            and box.x1 <= canvas.x1 + slack and box.y1 <= canvas.y1 + slack)


@pytest.mark.parametrize("name", FIGURES)
def test_each_figure_is_written_and_readable(sweep, name, tmp_path, monkeypatch) -> None:
    runs, settings, rows, _ = sweep
    seen: dict[str, Any] = {}
    monkeypatch.setattr(figures, "_save", recording_save(seen))
    caption, plot = figures.PLOTS[name]
    assert plot(runs, settings, rows, tmp_path / name) == tmp_path / name
    assert (tmp_path / name).stat().st_size > 10_000, f"{name} is nearly empty"
    assert seen["text_outside_canvas"] == [], f"{name}: labels cut off at the canvas edge"
    if name != "kl_heatmap.png":
        assert (seen["figure_legends"], seen["panel_legends"]) == (1, 0), f"{name}: one legend for the figure"
        assert not seen["legend_over_panel"], f"{name}: the legend covers a panel"
    assert all(x == int(x) for x in seen["iteration_ticks"]), f"{name}: fractional iteration ticks"


def test_report_md_shows_every_figure_with_its_caption(sweep, monkeypatch) -> None:
    _, _, _, root = sweep

    def stub(name: str) -> Any:
        return lambda runs, settings, rows, path: path  # drawing is tested above

    monkeypatch.setattr(figures, "PLOTS", {n: (c, stub(n)) for n, (c, _) in figures.PLOTS.items()})
    dirs = sorted(p for p in root.iterdir() if (p / "config.yaml").exists())
    md = build_report(dirs, root / "out").read_text()
    for name, (caption, _) in figures.PLOTS.items():
        assert f"![{caption}]({name})" in md, f"report.md does not show {name}"
    assert set(figures.PLOTS) == set(FIGURES) | {"seeds.png"}


def test_seeds_figure_puts_every_seed_inside_the_canvas(tmp_path, monkeypatch) -> None:
    """Two settings at three seeds each: one dot per seed per panel, labels inside the canvas
    and no legend (the x labels name the settings)."""
    from esft.report.evals import choose_settings
    from esft.report.tables import comparison

    cfgs = {f"{name}-s{seed}": cfg | {"seed": seed, "output_dir": f"runs/{name}-s{seed}"}
            for name, cfg in {"es": es(), "l2": es(awd="l2", awd_lambda=10.0)}.items() for seed in (0, 1, 2)}
    dirs = [write_run(tmp_path, name, cfg, evals(TASKS, 0.1 + 0.05 * i), metrics(cfg),
                      [{"iteration": 10, "task": t, "kl_exact_token": 0.01 * (i + 1)} for t in TASKS])
            for i, (name, cfg) in enumerate(cfgs.items())]
    runs = [load_run(d) for d in dirs]
    rows = comparison(runs, choose_settings([r.evals for r in runs]))
    seen: dict[str, Any] = {}
    monkeypatch.setattr(figures, "_save", recording_save(seen))
    assert figures.plot_seeds(rows, tmp_path / "seeds.png") == tmp_path / "seeds.png"
    assert seen["text_outside_canvas"] == [] and seen["panel_legends"] == 0
    assert sorted(n for n in seen["dots"] if n == 3) == [3, 3, 3, 3], seen["dots"]


def test_figures_without_data_are_skipped(tmp_path) -> None:
    run = write_run(tmp_path, "bare", es(), [], [])
    md = build_report([run], tmp_path / "out").read_text()
    assert "![" not in md and not list((tmp_path / "out").glob("*.png"))


def test_drift_overlay_is_eq2_for_each_runs_own_alpha_N_and_d(tmp_path) -> None:
    a = es(learning_rate=2e-3, population_size=8)
    b = es(learning_rate=1e-3, population_size=16)
    l2 = es(learning_rate=1e-3, population_size=16, awd="l2", awd_lambda=20.0)
    runs = [load_run(write_run(tmp_path, n, c, [], metrics(c, T=6))) for n, c in (("a", a), ("b", b), ("b2", b), ("l2", l2))]
    overlays = figures.drift_overlays(runs)
    walks = [o for o in overlays if o.linestyle == "--"]
    assert len(walks) == 2, "one random-walk line per distinct (α, N, d)"
    for o, cfg in zip(walks, (b, a)):  # inserted in front, last group first
        alpha, N = cfg["learning_rate"], cfg["population_size"]
        assert f"α={alpha:g}, N={N}, d={D:,}" in o.label
        assert o.iterations == list(range(7))
        assert [x**2 for x in o.norms] == pytest.approx([t * alpha**2 * D / N for t in range(7)], rel=1e-12)
    s, U = 1e-3 * 20.0, 1e-3**2 * D / 16
    stationary = next(o for o in overlays if o.linestyle == ":")
    assert stationary.norms == pytest.approx([math.sqrt((1 - s) ** 2 * U / (1 - (1 - s) ** 2))] * 2)
    transient = next(o for o in overlays if o.linestyle == "-.")
    assert transient.norms[1] ** 2 == pytest.approx((1 - s) ** 2 * U)


# --------------------------------------------------------------------- reward-measured target
def conciseness_evals(gain: float, its: tuple[int, ...] = (0, 5, 10), n: int = 24) -> list[dict[str, Any]]:
    """Conciseness rows (exact matches 0, per-example rewards closing the length gap by `gain`)
    beside accuracy rows of two prior tasks."""
    gaps = [12.0 + (7 * i) % 40 for i in range(n)]  # never closed: the change is exactly `gain`
    rows = [r for r in evals({"piqa": 0.6, "hellaswag": 0.4}, 0.2, its) if r["task"] != "countdown"]
    for k in its:
        rewards = [-max(0.0, g - gain * k / its[-1]) for g in gaps]
        rows.append({"iteration": k, "task": "conciseness", "accuracy": 0.0, "n": n, "limit": n, "max_new_tokens": 64,
                     "correct": [0] * n, "reward": sum(rewards) / n, "rewards": rewards})
    return rows


def load(root: Path, specs: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]) -> tuple[list[Any], dict, list]:
    from esft.report.evals import choose_settings
    from esft.report.tables import comparison

    grpo = [{"iteration": t, "reward/mean": 0.05 * t} for t in range(1, 11)]
    runs = [load_run(write_run(root, name, cfg, rows, grpo if cfg.get("trainer") == "grpo" else metrics(cfg)))
            for name, (cfg, rows) in specs.items()]
    settings = choose_settings([r.evals for r in runs])
    return runs, settings, comparison(runs, settings)


def draw(name: str, runs: list[Any], settings: dict, rows: list, path: Path, monkeypatch) -> dict[str, Any]:
    """Draw one figure; what `inspect` reports plus each panel's title, y label and first line's data."""
    seen: dict[str, Any] = {}

    def inspecting_save(fig, p):
        fig.savefig(p)
        seen.update(inspect(fig))
        if fig._suptitle is not None and not _inside(fig._suptitle.get_window_extent(fig.canvas.get_renderer()), fig.bbox):
            seen["text_outside_canvas"].append(fig._suptitle.get_text())
        seen["panels"] = [(ax.get_title(), ax.get_ylabel(), ax.lines[0].get_ydata().tolist() if ax.lines else [])
                          for ax in fig.axes if ax.axison]
        figures.plt.close(fig)
        return p

    monkeypatch.setattr(figures, "_save", inspecting_save)
    assert figures.PLOTS[name][1](runs, settings, rows, path) == path
    assert seen["text_outside_canvas"] == [], f"{name}: labels cut off at the canvas edge"
    assert (seen["figure_legends"], seen["panel_legends"]) == (1, 0), f"{name}: one legend for the figure"
    assert not seen["legend_over_panel"], f"{name}: the legend covers a panel"
    assert all(x == int(x) for x in seen["iteration_ticks"]), f"{name}: fractional iteration ticks"
    return seen


@pytest.fixture
def concise(tmp_path) -> tuple[list[Any], dict, list]:
    """A λ sweep trained on conciseness: no AWD, AWD L2 at λ = 1 and 10."""
    cfgs = {"es": es(task="conciseness"),
            "l2_1": es(task="conciseness", awd="l2", awd_lambda=1.0, output_dir="runs/l2_1"),
            "l2_10": es(task="conciseness", awd="l2", awd_lambda=10.0, output_dir="runs/l2_10")}
    return load(tmp_path, {n: (c, conciseness_evals(12.0 / (1 + i))) for i, (n, c) in enumerate(cfgs.items())})


def test_forgetting_curves_show_a_reward_target_as_mean_reward_from_the_evaluations(concise, tmp_path,
                                                                                    monkeypatch) -> None:
    runs, settings, rows = concise
    seen = draw("forgetting_curves.png", runs, settings, rows, tmp_path / "f.png", monkeypatch)
    (title, ylabel, ys), prior = seen["panels"][0], seen["panels"][1]
    assert (title, ylabel) == ("Target task: conciseness", "mean reward, 95% bootstrap interval")
    curve = runs[0].evals["conciseness"][settings["conciseness"]]
    assert ys == pytest.approx([curve[k].reward for k in (0, 5, 10)]), "the evaluation mean reward, not ×100"
    assert ys != pytest.approx([0.1 + 0.05 * t for t in (1, 2, 3)]), "not the training reward/mean"
    assert prior[1] == "change from iteration 0 (points), 95% interval"
    assert len(seen["panels"]) == 2, "no right axis: every target was evaluated"


@pytest.mark.parametrize("with_grpo", [False, True])
def test_forgetting_curves_put_a_reward_target_beside_accuracy_targets_on_a_right_axis(tmp_path, monkeypatch,
                                                                                      with_grpo) -> None:
    specs = {"cd": (es(), evals(TASKS, 0.3)),
             "cc": (es(task="conciseness", population_size=20), conciseness_evals(10.0))}
    if with_grpo:  # never evaluated on its target: its training reward shares the right axis
        specs["grpo"] = ({"trainer": "grpo", "task": "countdown", "model": "embedded", "beta": 0.005},
                         evals({"piqa": 0.6}, 0.1))
    runs, settings, rows = load(tmp_path, specs)
    seen = draw("forgetting_curves.png", runs, settings, rows, tmp_path / "f.png", monkeypatch)
    left, right = seen["panels"][0], seen["panels"][2]
    assert left[:2] == ("Target task (each run's training task)", "accuracy (%), 95% Wilson interval")
    assert left[2] == pytest.approx([10.0, 25.0, 40.0]), "countdown accuracy in percent"
    curve = runs[1].evals["conciseness"][settings["conciseness"]]
    assert right[2] == pytest.approx([curve[k].reward for k in (0, 5, 10)]), "the conciseness mean reward"
    assert right[1] == ("reward: evaluated (solid), training (dashed)" if with_grpo
                        else "mean reward of reward targets, 95% bootstrap")


def test_task_curves_show_each_task_in_its_primary_metric(concise, tmp_path, monkeypatch) -> None:
    runs, settings, rows = concise
    seen = draw("task_curves.png", runs, settings, rows, tmp_path / "t.png", monkeypatch)
    labels = {title.split("\n")[0]: ylabel for title, ylabel, _ in seen["panels"]}
    assert labels == {"conciseness (target)": "mean reward", "hellaswag": "accuracy (%)", "piqa": "accuracy (%)"}
    curve = runs[0].evals["conciseness"][settings["conciseness"]]
    assert seen["panels"][0][2] == pytest.approx([curve[k].reward for k in (0, 5, 10)])


def test_task_curves_of_a_single_reward_task_fit_one_panel(tmp_path, monkeypatch) -> None:
    only = [r for r in conciseness_evals(6.0) if r["task"] == "conciseness"]
    runs, settings, rows = load(tmp_path, {"es": (es(task="conciseness"), only)})
    seen = draw("task_curves.png", runs, settings, rows, tmp_path / "t.png", monkeypatch)  # title inside the canvas
    assert [p[1] for p in seen["panels"]] == ["mean reward"]


def test_lambda_figure_shows_the_reward_targets_change_in_reward_units(concise, tmp_path, monkeypatch) -> None:
    runs, settings, rows = concise
    seen = draw("lambda.png", runs, settings, rows, tmp_path / "l.png", monkeypatch)
    (t_title, t_label, t_ys), (p_title, p_label, _) = seen["panels"]
    assert (t_title, t_label) == ("AWD L2: target task change", "change in mean reward from iteration 0")
    assert (p_title, p_label) == ("AWD L2: average prior-task change", "change from iteration 0 (points)")
    assert t_ys == pytest.approx([rows[1].target.value, rows[2].target.value]), "the table's values, in reward units"
    assert rows[1].target.value == pytest.approx(6.0) and rows[1].target.has_interval


def test_a_lambda_ladder_is_one_sweep_whatever_kl_fields_its_runs_carry_without_a_budget() -> None:
    """Runs made before --kl_every's default changed hold another value of a field no
    budget read: they still form one ladder, while a budget run stays apart."""
    from types import SimpleNamespace

    def run(lam: float, **kw: Any) -> Any:
        return SimpleNamespace(is_es=True, awd="l1", awd_lambda=lam, config=es(awd="l1", awd_lambda=lam, **kw))

    runs = [run(0.03, kl_every=10), run(0.1, kl_every=1), run(0.3, kl_every=1),
            run(0.1, kl_every=10, kl_budget=0.05, kl_tasks="piqa")]
    sweeps = figures.lambda_sweeps(runs, [None] * len(runs))
    assert sorted(len(s.members) for s in sweeps) == [1, 3]
