"""`--awd_lambda auto` in every cell of a grid, against plain ES and the ladder of that cell.

Reads the run directories of sweeps (`examples/auto_lambda_grid_cpu.yaml`, and for the
T=20, N=8 cell `examples/paper_claims_cpu.yaml`, whose plain ES and λ = 3, 10, 30 runs are
that cell's ladder) and sorts their seed-0 runs by their config into cells of (target task,
T, N) and arms: plain ES, `auto`, and L2 rungs by c = s·T. Writes one object per cell: its settings,
auto's λ, auto's share of plain ES's held-out gain and its cut of the mean prior-task KL, and
the ladder's best rung (the largest KL cut among the rungs, auto included, that keep >= 90%
of the gain; null if none). Prints the same as a markdown table with every rung; `--figure`
draws every cell's ladder as share kept against KL cut, beside the curve a gain proportional to
the coherent displacement would follow (docs/results/auto-lambda.md says why no λ on it meets
the goal). The cells run at several training seeds get a table of their own (`over_seeds`:
per seed against that seed's plain ES, then over the seeds), `--seeds_json` and
`--seeds_figure` write it.

    python benchmarks/auto_lambda_grid.py runs/auto-grid runs/paper-claims --json benchmarks/results/auto_lambda_grid.json
    # runs kept in the repository, beside cells measured before records were kept:
    python benchmarks/auto_lambda_grid.py benchmarks/results/kept/auto-grid \
        --earlier benchmarks/results/auto_lambda_grid.json --json benchmarks/results/auto_lambda_grid.json \
        --figure docs/auto_lambda_grid.png
    python benchmarks/auto_lambda_grid.py benchmarks/results/kept/auto-grid benchmarks/results/kept/paper-claims \
        --seeds_json benchmarks/results/auto_lambda_seeds.json --seeds_figure docs/auto_lambda_seeds.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_claims import _seed_estimate, load, mean_kl, paired_gain, target_rewards  # noqa: E402

from esft.auto_lambda import HORIZON

KEEP = 0.9  # the share of plain ES's gain a λ must keep
#: What the runs of one cell must share (all but T, N and the AWD strength).
SETTING = ("model", "task", "sigma", "learning_rate", "max_train_samples", "max_new_tokens", "prompts_per_step",
           "noise_mode", "noise_rank", "trainable", "frozen", "mirror_sampling")


def arm_row(run: dict[str, Any], ref_gain: float | None, ref_kl: float | None) -> dict[str, Any]:
    pair = target_rewards(run)
    gain = paired_gain(*pair) if pair else None
    kl = mean_kl(run)
    cfg = run["config"]
    lam = cfg.get("awd_lambda_chosen", cfg.get("awd_lambda"))
    return {
        "run": run["name"], "lambda": lam if cfg.get("awd", "none") != "none" else None,
        "gain": gain[0] if gain else None, "gain_ci": [gain[1], gain[2]] if gain else None,
        "share": gain[0] / ref_gain if gain and ref_gain else None,
        "kl": kl, "kl_cut": ref_kl / kl if kl and ref_kl else None,
    }


Cell = tuple[str, int, int]  # (target task, T, N)


def arm_of(config: dict[str, Any], any_seed: bool = False) -> tuple[Cell, str] | None:
    """((task, T, N), arm) of an ES run with plain ES or fixed/auto L2 at seed 0 (at any seed
    with `any_seed`); None for anything else."""
    if config.get("trainer") == "grpo" or config.get("kl_budget") is not None:
        return None
    if not any_seed and int(config.get("seed", 0)) != 0:
        return None
    T = int(config["max_steps"])
    cell = (str(config["task"]), T, int(config["population_size"]))
    awd = config.get("awd", "none")
    if awd == "none":
        return cell, "es"
    if awd != "l2" or config.get("awd_decoupled"):
        return None
    if config.get("awd_lambda") == "auto":
        return cell, "auto"
    c = float(config["learning_rate"]) * float(config.get("awd_lambda") or 10.0) * T
    return cell, f"c{c:.3g}"


def _rung(row: dict[str, Any], ref_gain: float | None, ref_kl: float | None) -> dict[str, Any]:
    """A rung measured earlier (from `--earlier`), its share and KL cut against the cell's reference."""
    return {**row, "share": row["gain"] / ref_gain if row["gain"] is not None and ref_gain else None,
            "kl_cut": ref_kl / row["kl"] if row["kl"] and ref_kl else None}


def _arm_runs(roots: list[Path], any_seed: bool = False) -> Iterator[tuple[dict[str, Any], Cell, str]]:
    """(run, cell, arm) of every scored run under `roots` that `arm_of` places; refuses a cell
    whose runs differ in anything but T, N, the AWD strength and the seed."""
    settings: dict[Cell, str] = {}
    for root in roots:
        for path in sorted(root.iterdir()):
            if not ((path / "config.yaml").exists() and (path / "kl.json").exists()):
                continue
            run = load(path)
            where = arm_of(run["config"], any_seed)
            if where is None:
                continue
            cell, arm = where
            # One cell holds runs of one setting but the AWD strength (and the seed).
            same = json.dumps({k: run["config"].get(k) for k in SETTING}, sort_keys=True)
            if settings.setdefault(cell, same) != same:
                raise ValueError(f"{path}: another setting than the other runs of cell {cell}")
            yield run, cell, arm


def cells(roots: list[Path], earlier: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One object per cell of the runs under `roots`; `earlier`: cells of a previous result whose
    runs are gone (measured on another machine before records were kept). Their rungs stay in the
    cell, and a run under `roots` adds a rung to it or replaces the rung of the same name."""
    runs: dict[Cell, dict[str, dict[str, Any]]] = {}
    for run, cell, arm in _arm_runs(roots):
        runs.setdefault(cell, {}).setdefault(arm, run)
    before = {(str(c["cell"]["task"]), int(c["cell"]["max_steps"]), int(c["cell"]["population_size"])): c
              for c in earlier or []}
    out = []
    # The earlier result's first task keeps its place at the top; then by task, each task's cells by (T, N).
    first = earlier[0]["cell"]["task"] if earlier else None
    for (task, T, N) in sorted(set(runs) | set(before), key=lambda c: (c[0] != first, c)):
        arms, old = runs.get((task, T, N), {}), before.get((task, T, N))
        if "es" in arms:
            ref_pair = target_rewards(arms["es"])
            ref_gain = paired_gain(*ref_pair)[0] if ref_pair else None
            ref_kl = mean_kl(arms["es"])
        elif old is not None:
            ref_gain, ref_kl = old["es_gain"], old["es_kl"]
        else:
            continue
        old_es = old and next((r["run"] for r in old["rungs"] if r["lambda"] is None), None)
        # A new plain-ES or auto run replaces the earlier one of that arm, whatever its name.
        replaced = {old_es if "es" in arms else None, old["auto_run"] if old and "auto" in arms else None}
        rows = {r["run"]: _rung(r, ref_gain, ref_kl) for r in (old["rungs"] if old else []) if r["run"] not in replaced}
        names = {arm: run["name"] for arm, run in arms.items()}
        rows.update({run["name"]: arm_row(run, ref_gain, ref_kl) for run in arms.values()})
        auto_name = names.get("auto", old["auto_run"] if old else None)
        es_name = names.get("es", old_es)
        if auto_name not in rows or es_name not in rows:
            continue
        ladder = [r for name, r in rows.items() if name != es_name]
        kept = [r for r in ladder if r["share"] is not None and r["share"] >= KEEP and r["kl_cut"] is not None]
        best = max(kept, key=lambda r: r["kl_cut"], default=None)
        auto, es = rows[auto_name], rows[es_name]
        out.append({
            "cell": {"max_steps": T, "population_size": N, "task": task, "seed": 0},
            "es_gain": es["gain"], "es_gain_ci": es["gain_ci"], "es_kl": ref_kl,
            "auto_run": auto["run"], "auto_lambda": auto["lambda"], "auto_share": auto["share"], "auto_kl_cut": auto["kl_cut"],
            "auto_goal_met": bool(auto["share"] is not None and auto["share"] >= KEEP
                                  and auto["kl_cut"] is not None and auto["kl_cut"] >= 2.0),
            "best_run": best["run"] if best else None,
            "best_share": best["share"] if best else None, "best_kl_cut": best["kl_cut"] if best else None,
            "rungs": sorted(rows.values(), key=lambda r: (r["lambda"] is not None, float(r["lambda"] or 0))),
        })
    return out


def over_seeds(roots: list[Path]) -> list[dict[str, Any]]:
    """The cells run at more than one training seed: each arm's share of that seed's plain-ES
    gain and its cut of that seed's plain-ES KL, per seed and over the seeds it shares with plain
    ES (mean with a t-interval over seeds, and pooled: the ratio of the arms' mean gains and mean
    KLs), and at how many seeds the arm meets the goal. A verdict drawn from one seed is a draw
    where the seeds part (docs/results/auto-lambda.md, "More training seeds")."""
    runs: dict[Cell, dict[str, dict[int, dict[str, Any]]]] = {}
    for run, cell, arm in _arm_runs(roots, any_seed=True):
        if target_rewards(run) is None or mean_kl(run) is None:
            continue
        # A fixed λ at auto's horizon (c = s·T = 1) is auto's run: the same λ and seed log.
        if arm == f"c{HORIZON:.3g}":
            arm = "auto"
        runs.setdefault(cell, {}).setdefault(arm, {}).setdefault(int(run["config"].get("seed", 0)), run)
    out = []
    for (task, T, N), arms in sorted(runs.items()):
        es = arms.get("es", {})
        if len(es) < 2:
            continue
        ref = {seed: (paired_gain(*target_rewards(run))[0], mean_kl(run)) for seed, run in es.items()}
        rows = []
        for arm, by_seed in sorted(arms.items(), key=lambda a: (a[0] != "es", a[0] != "auto", a[0])):
            seeds = sorted(set(by_seed) & set(ref))
            if len(seeds) < 2:
                continue
            per_seed = []
            for seed in seeds:
                row = arm_row(by_seed[seed], *ref[seed])
                per_seed.append({"seed": seed, "run": row["run"], "lambda": row["lambda"], "gain": row["gain"],
                                 "kl": row["kl"], "share": row["share"], "kl_cut": row["kl_cut"],
                                 "goal_met": None if arm == "es" else bool(row["share"] >= KEEP and row["kl_cut"] >= 2.0)})
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            pooled_share = mean([r["gain"] for r in per_seed]) / mean([ref[s][0] for s in seeds])
            pooled_cut = mean([ref[s][1] for s in seeds]) / mean([r["kl"] for r in per_seed])
            rows.append({
                "arm": arm, "lambda": per_seed[0]["lambda"], "seeds": seeds, "per_seed": per_seed,
                "share": _seed_estimate([r["share"] for r in per_seed]),
                "kl_cut": _seed_estimate([r["kl_cut"] for r in per_seed]),
                "pooled_share": pooled_share, "pooled_kl_cut": pooled_cut,
                "pooled_goal_met": bool(pooled_share >= KEEP and pooled_cut >= 2.0),
                "seeds_meeting_goal": sum(bool(r["goal_met"]) for r in per_seed),
            })
        if any(r["arm"] != "es" for r in rows):
            out.append({"cell": {"task": task, "max_steps": T, "population_size": N}, "arms": rows})
    return out


def seeds_markdown(result: list[dict[str, Any]]) -> str:
    """One line per arm of a cell run at several seeds: per-seed share and cut, then over seeds."""
    lines = ["| task | T, N | arm | λ | seeds | share per seed | KL cut per seed | share, mean [95% t] | "
             "KL cut, mean [95% t] | pooled (share, cut) | seeds meeting the goal |",
             "|---|---|---|---:|---|---|---|---|---|---|---:|"]

    def est(e: dict[str, Any], fmt: str) -> str:
        return fmt.format(e["mean"]) + (f" [{fmt.format(e['lo'])}, {fmt.format(e['hi'])}]" if e["lo"] is not None else "")

    for c in result:
        where = f"{c['cell']['task']} | {c['cell']['max_steps']}, {c['cell']['population_size']}"
        for a in c["arms"]:
            if a["arm"] == "es":
                continue
            lam = "–" if a["lambda"] is None else f"{float(a['lambda']):.3g}"
            shares = ", ".join(f"{r['share']:.0%}" for r in a["per_seed"])
            cuts = ", ".join(f"{r['kl_cut']:.2f}×" for r in a["per_seed"])
            name = "auto" if a["arm"] == "auto" else f"s·T = {a['arm'][1:]}"
            lines.append(f"| {where} | {name} | {lam} | {', '.join(map(str, a['seeds']))} | {shares} | {cuts} | "
                         f"{est(a['share'], '{:.0%}')} | {est(a['kl_cut'], '{:.2f}×')} | "
                         f"{a['pooled_share']:.0%}, {a['pooled_kl_cut']:.2f}× | "
                         f"{a['seeds_meeting_goal']} of {len(a['seeds'])} |")
    return "\n".join(lines)


def _cell(c: dict[str, Any]) -> str:
    """The task and "T, N" columns of a cell's table rows."""
    return f"{c['cell']['task']} | {c['cell']['max_steps']}, {c['cell']['population_size']}"


def markdown(result: list[dict[str, Any]]) -> str:
    lines = ["| task | T, N | run | λ | held-out gain [95%] | share of ES's gain | mean prior KL | KL cut |",
             "|---|---|---|---:|---|---:|---:|---:|"]
    for c in result:
        for r in c["rungs"]:
            gain = "–" if r["gain"] is None else f"{r['gain']:+.1f} [{r['gain_ci'][0]:+.1f}, {r['gain_ci'][1]:+.1f}]"
            share = "–" if r["share"] is None else f"{r['share']:.1%}"  # 89.6% is not "90%"
            lam = "–" if r["lambda"] is None else f"{float(r['lambda']):.3g}"
            cut = "–" if r["kl_cut"] is None else f"{r['kl_cut']:.2f}×"
            kl = "–" if r["kl"] is None else f"{r['kl']:.3f}"
            mark = " **auto**" if r["run"] == c["auto_run"] else ""
            lines.append(f"| {_cell(c)} | {r['run']}{mark} | {lam} | "
                         f"{gain} | {share} | {kl} | {cut} |")
    lines += ["", "| task | T, N | auto λ | auto share | auto KL cut | goal (≥ 90%, ≥ 2×) | best rung (share, cut) |",
              "|---|---|---:|---:|---:|:---:|---|"]
    for c in result:
        best = "none keeps 90%" if c["best_run"] is None else f"{c['best_run']} ({c['best_share']:.0%}, {c['best_kl_cut']:.2f}×)"
        share = "–" if c["auto_share"] is None else f"{c['auto_share']:.0%}"
        cut = "–" if c["auto_kl_cut"] is None else f"{c['auto_kl_cut']:.2f}×"
        lines.append(f"| {_cell(c)} | {float(c['auto_lambda']):.3g} | "
                     f"{share} | {cut} | {'yes' if c['auto_goal_met'] else 'no'} | {best} |")
    return "\n".join(lines)


def model_curve(T: int, c_values: list[float]) -> list[tuple[float, float]]:
    """(KL cut, share kept) of L2 at c = s·T for a run whose gain grows in proportion to its
    coherent displacement, from the sums `esft.auto_lambda` predicts with: the trade-off a task
    without a saturating reward is held to. On it, keeping 90% needs c ≈ 0.2, where the cut is 1.2×."""
    from esft.auto_lambda import predicted

    return [(p["kl_cut"], p["coherent_share"]) for p in (predicted(c / T, T) for c in c_values)]


def figure(result: list[dict[str, Any]], path: Path) -> Path:
    """Every cell's ladder in the plane of the goal, KL cut against share of plain ES's gain, one
    panel per target task (one line per cell from plain ES at (1×, 100%) through its rungs by λ;
    a star marks `auto`; bars are the rung's own 95% interval over held-out questions, divided by
    plain ES's gain), with the goal's corner shaded and the proportional-gain model's curve: a
    rung above the curve kept more than its coherent displacement would give, the sign of a
    reward that saturates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(c["cell"]["task"] for c in result))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.0 * len(tasks) + 2.6, 4.6), sharey=True, squeeze=False)
    cs = [0.02 * 1.15**k for k in range(45)]
    cut, share = zip(*model_curve(20, cs))  # T = 10 and 40: within 5 points of share (1.23× at 90% for all)
    colours = plt.get_cmap("tab10")
    # One colour per (T, N) on every panel, so a cell reads the same on both tasks.
    settings = sorted({(c["cell"]["max_steps"], c["cell"]["population_size"]) for c in result})
    handles: dict[str, Any] = {}
    for ax, task in zip(axes[0], tasks):
        handles["goal: ≥ 90% of the gain, ≥ 2× less KL"] = ax.fill_between([2.0, 14.0], KEEP, 1.6, color="#2ca02c",
                                                                         alpha=0.10, lw=0)
        (handles["gain ∝ coherent displacement (model)"],) = ax.plot(cut, share, "k--", lw=1)
        for c in (x for x in result if x["cell"]["task"] == task):
            setting = (c["cell"]["max_steps"], c["cell"]["population_size"])
            colour = colours(settings.index(setting) % 10)
            rungs = [r for r in c["rungs"] if r["share"] is not None and r["kl_cut"] is not None]
            (handles["T={}, N={}".format(*setting)],) = ax.plot(
                [r["kl_cut"] for r in rungs], [r["share"] for r in rungs], "o-", color=colour, ms=4, lw=1.2)
            for r in rungs:
                if r["lambda"] is not None and r["gain_ci"] and c["es_gain"]:
                    lo, hi = sorted(v / c["es_gain"] for v in r["gain_ci"])
                    ax.plot([r["kl_cut"]] * 2, [lo, hi], color=colour, lw=0.6, alpha=0.35)
                if r["run"] == c["auto_run"]:
                    ax.plot(r["kl_cut"], r["share"], "*", color=colour, ms=13, mec="black", mew=0.6)
        ax.set_xscale("log")
        ax.set_xlim(0.9, 14.0)
        ax.set_ylim(-0.2, 1.6)
        ax.set_xticks([1, 2, 4, 8])
        ax.set_xticklabels(["1×", "2×", "4×", "8×"])
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel("prior-task KL cut against plain ES (log)")
        ax.set_title(f"{task} (seed 0)", fontsize=10)
    (handles["auto (s·T = 1)"],) = axes[0][0].plot([], [], "*", color="grey", ms=11, mec="black", mew=0.6)
    order = [k for k in handles if not k.startswith("T=")] + ["T={}, N={}".format(*st) for st in settings]
    fig.legend([handles[k] for k in order], order, fontsize=8, loc="center right", frameon=False)
    axes[0][0].set_ylabel("share of plain ES's held-out gain kept")
    fig.suptitle("L2 AWD ladders per cell: what each λ keeps and what it cuts", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / fig.get_figwidth(), 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def seeds_figure(result: list[dict[str, Any]], path: Path) -> Path:
    """Each cell run at several seeds in the plane of the goal: one dot per (arm, seed), a ring
    at the arm's pooled share and cut, the goal's corner shaded. Where an arm's dots straddle
    the corner, one seed's verdict is a coin toss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result), figsize=(3.6 * len(result) + 0.4, 3.8), sharey=True, squeeze=False)
    colours = {"auto": "#d62728"}
    others = plt.get_cmap("tab10")
    right = max([4.0] + [1.2 * r["kl_cut"] for c in result for a in c["arms"] for r in a["per_seed"]])
    for ax, c in zip(axes[0], result):
        ax.fill_between([2.0, right], KEEP, 1.6, color="#2ca02c", alpha=0.10, lw=0)
        for k, a in enumerate(x for x in c["arms"] if x["arm"] != "es"):
            colour = colours.get(a["arm"], others(k + 1))
            name = "auto" if a["arm"] == "auto" else f"s·T = {a['arm'][1:]}"
            label = f"{name} (λ = {float(a['lambda']):.3g})"
            ax.plot([r["kl_cut"] for r in a["per_seed"]], [r["share"] for r in a["per_seed"]], "o", color=colour,
                    ms=6, alpha=0.8, label=label)
            for r in a["per_seed"]:
                ax.annotate(str(r["seed"]), (r["kl_cut"], r["share"]), textcoords="offset points", xytext=(5, 3),
                            fontsize=7, color=colour)
            ax.plot(a["pooled_kl_cut"], a["pooled_share"], "o", mfc="none", mec=colour, ms=12, mew=1.5)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlim(1.0, right)
        ax.set_xticks([1, 2, 4, 8][: 2 + (right > 4) + (right > 8)])
        ax.set_xticklabels(["1×", "2×", "4×", "8×"][: 2 + (right > 4) + (right > 8)])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylim(0.0, 1.6)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.set_xlabel("prior KL cut against that seed's plain ES")
        ax.set_title("{task}, T = {max_steps}, N = {population_size}".format(**c["cell"]), fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    axes[0][0].set_ylabel("share of that seed's plain-ES gain")
    fig.suptitle("One dot per training seed (its number beside it), a ring at the pooled value; green: the goal",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dirs", nargs="+")
    ap.add_argument("--json", default=None)
    ap.add_argument("--earlier", default=None, help="a previous --json result: its cells and rungs whose runs are "
                    "not among the sweep directories are kept (a run given here replaces its rung)")
    ap.add_argument("--figure", default=None, help="PNG of every cell's ladder: share kept against KL cut")
    ap.add_argument("--seeds_json", default=None, help="the cells run at several training seeds, per seed and over "
                    "them (the main --json and figure read seed 0)")
    ap.add_argument("--seeds_figure", default=None, help="PNG of those cells: one dot per arm and seed")
    a = ap.parse_args()
    earlier = json.loads(Path(a.earlier).read_text()) if a.earlier else None
    result = cells([Path(d) for d in a.sweep_dirs], earlier)
    print(markdown(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    seeds = over_seeds([Path(d) for d in a.sweep_dirs])
    if seeds:
        print("\n" + seeds_markdown(seeds))
    if a.seeds_json:
        Path(a.seeds_json).write_text(json.dumps(seeds, indent=1) + "\n")
    if a.seeds_figure and seeds:
        seeds_figure(seeds, Path(a.seeds_figure))
    if a.figure:
        figure(result, Path(a.figure))


if __name__ == "__main__":
    main()
