"""Fixed λ, auto λ or a KL budget: how the adaptive AWD modes compare with a λ ladder.

Reads two sweeps made with the same base settings and seeds: `examples/paper_claims_cpu.yaml`
(plain ES and the AWD L2 ladder) and `examples/awd_control_cpu.yaml` (`--awd_lambda auto`,
two `--kl_budget` values), and prints:

- auto λ: the λ it chose, the probes' evidence, their cost as a share of the run, and where
  the auto run lands on the ladder's trade-off (held-out target gain against prior KL);
- each KL budget X: the KL measured during training (final, and the largest of every
  measurement) against X, the held-out target gain against plain ES and against the
  fixed-λ trade-off at the same final KL (interpolated along the ladder in log KL), and the
  KL measurements' cost: one measurement against its iteration, and all of them against
  the rest of the training time (what `--kl_every` amortises);
- one budget against one fixed λ, training seed by training seed (with each seed's plain ES
  where it was run), and the mean difference with its 95% t-interval over seeds.

    python benchmarks/awd_control.py runs/paper-claims runs/awd-control [--json benchmarks/results/awd_control.json]
    python benchmarks/awd_control.py - runs/budget-only --previous benchmarks/results/awd_control.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from paper_claims import load, mean_kl, paired_gain, target_rewards

from esft.awd_schedule import DRIFT_KEY, KL_KEY, PROBE_DRIFT_KEY, PROBE_KL_KEY, pooled_curvature
from esft.seedlog import SeedLog


def summary(run: dict[str, Any], ref_gain: float | None, ref_kl: float | None) -> dict[str, Any]:
    pair = target_rewards(run)
    gain = paired_gain(*pair) if pair else None
    kl = mean_kl(run)
    return {
        "run": run["name"], "gain": gain, "retention": gain[0] / ref_gain if gain and ref_gain else None,
        "kl": kl, "kl_cut": ref_kl / kl if kl and ref_kl else None,
        "drift": run["drift"][max(run["drift"])] if run["drift"] else None,
    }


def gain_at_kl(ladder: list[dict[str, Any]], kl: float) -> float | None:
    """The fixed-λ trade-off's held-out gain at a given final KL (linear in log KL between rungs)."""
    points = sorted((p["kl"], p["gain"][0]) for p in ladder if p["kl"] and p["gain"])
    if len(points) < 2 or not points[0][0] <= kl <= points[-1][0]:
        return None
    xs = [math.log(k) for k, _ in points]
    return float(np.interp(math.log(kl), xs, [g for _, g in points]))


def curvature_readings(run_dir: Path) -> list[dict[str, Any]]:
    """The budget's readings from the seed log, in the order the controller took them: the
    probe (at θ₀ + one update-sized step, before its record's update) and each measurement,
    with its curvature KL/‖θ − θ₀‖²."""
    readings = []
    for r in SeedLog(run_dir).records():
        for kind, kl_key, drift_key, at in (("probe", PROBE_KL_KEY, PROBE_DRIFT_KEY, r.iteration - 1),
                                            ("measured", KL_KEY, DRIFT_KEY, r.iteration)):
            kl, drift = r.extra.get(kl_key), r.extra.get(drift_key)
            if kl is not None and float(kl) > 1e-12 and drift:  # as the controller: a KL of 0 is no reading
                readings.append({"after": at, "kind": kind, "kl": float(kl), "drift": float(drift),
                                 "curvature": float(kl) / float(drift) ** 2})
    return readings


def end_curvature_errors(readings: list[dict[str, Any]], max_steps: int) -> dict[str, float] | None:
    """How well the readings before the end predicted the curvature at the end (the reading
    after `max_steps`): the latest reading alone, and the mean of all of them (what the
    controller plans on); relative errors, end / prediction − 1."""
    if len(readings) < 2 or readings[-1]["after"] != max_steps:
        return None
    before, end = [r["curvature"] for r in readings[:-1]], readings[-1]["curvature"]
    return {"latest": end / before[-1] - 1.0, "pooled": end / pooled_curvature(before) - 1.0}


def budget_row(run: dict[str, Any], ladder: list[dict[str, Any]], ref: dict[str, Any]) -> dict[str, Any]:
    metrics = run["metrics"]
    budget = float(run["config"]["kl_budget"])
    measured = [float(m["kl/measured"]) for m in metrics if "kl/measured" in m]
    kl_share = [m["time/kl"] / m["time/iteration"] for m in metrics if "time/kl" in m and m.get("time/iteration")]
    total_s = sum(float(m.get("time/iteration", 0.0)) for m in metrics if m.get("iteration", 0) > 0)
    kl_s = sum(float(m.get("time/kl", 0.0)) + float(m.get("time/kl_probe", 0.0)) for m in metrics)
    s = summary(run, _first(ref["gain"]), ref["kl"])
    return {
        **s, "budget": budget, "seed": int(run["config"].get("seed", 0)), "kl_final_train": measured[-1] if measured else None,
        "kl_max": max(measured) if measured else None,
        "max_over_budget": max(measured) / budget if measured else None,
        "measured_at": [int(m["iteration"]) for m in metrics if "kl/measured" in m],
        "fixed_lambda_gain_at_same_kl": gain_at_kl(ladder, s["kl"]) if s["kl"] else None,
        "kl_measurement_share": float(np.median(kl_share)) if kl_share else None,
        "kl_overhead": kl_s / (total_s - kl_s) if total_s > kl_s else None,
        "steps": [m.get("awd/step") for m in metrics],
        **_curvatures(run),
    }


def _curvatures(run: dict[str, Any]) -> dict[str, Any]:
    readings = curvature_readings(run["path"]) if run.get("path") else []
    if not readings:
        return {}
    return {"curvatures": readings,
            "end_curvature_error": end_curvature_errors(readings, int(run["config"]["max_steps"]))}


def seed_pairs(runs: list[dict[str, Any]], budget: float, lam: float,
               earlier_rows: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """The budget against the fixed λ, training seed by training seed: each pair saw the same
    seeds, and their final rewards are paired over the same held-out questions. Intervals over
    questions cannot show the spread between ES runs; the spread over seeds does.

    A seed whose fixed-λ run is not among `runs` takes it (and its plain ES) from
    `earlier_rows`, an earlier result's rows: its difference is then the difference of the
    two gains, without an interval over questions."""
    def by_seed(keep: Any) -> dict[int, dict[str, Any]]:
        return {int(r["config"].get("seed", 0)): r for r in runs if keep(r["config"])}

    budgets = by_seed(lambda c: c.get("kl_budget") is not None and float(c["kl_budget"]) == budget)
    fixed = by_seed(lambda c: c.get("awd") == "l2" and c.get("kl_budget") is None
                    and isinstance(c.get("awd_lambda"), (int, float)) and float(c["awd_lambda"]) == lam)
    earlier = {int(r["seed"]): r for r in earlier_rows}
    rows = []
    for seed, b in sorted(budgets.items()):
        pb = target_rewards(b)
        if not pb:
            continue  # not evaluated
        budget_side = {"seed": seed, "budget_run": b["name"], "budget_gain": paired_gain(*pb), "budget_kl": mean_kl(b)}
        if seed not in fixed:
            if seed in earlier:
                e = earlier[seed]
                # The earlier result's own budget run stays beside the new one: what the change did.
                # The same run read again (more seeds added beside it) keeps the row's own earlier run.
                again = (e.get("budget_run") == b["name"] and e["budget_gain"][0] == budget_side["budget_gain"][0]
                         and e["budget_kl"] == budget_side["budget_kl"])
                before = ({k: e.get(k) for k in ("earlier_budget_gain", "earlier_budget_kl")} if again
                          else {"earlier_budget_gain": e["budget_gain"], "earlier_budget_kl": e["budget_kl"]})
                rows.append({**e, **budget_side, **before,
                             "difference": [budget_side["budget_gain"][0] - e["fixed_gain"][0], None, None]})
            continue
        f = fixed[seed]
        pf = target_rewards(f)
        if not pf or len(pb[1]) != len(pf[1]):
            continue  # not evaluated, or on different question sets: nothing to pair
        population = b["config"].get("population_size")
        plain = by_seed(lambda c, n=population: c.get("awd", "none") == "none" and c.get("kl_budget") is None
                        and c.get("population_size") == n).get(seed)
        pe = target_rewards(plain) if plain else None
        if not pe or len(pe[1]) != len(pb[1]):
            plain, pe = None, None  # none at this seed, or scored on other questions
        rows.append({
            **budget_side, "fixed_run": f["name"], "fixed_gain": paired_gain(*pf), "fixed_kl": mean_kl(f),
            "difference": paired_gain(pf[1], pb[1]),  # budget − fixed, final rewards on the same questions
            # The same seed's plain ES, where one was run on the same questions.
            "es_run": plain["name"] if plain else None,
            "es_gain": paired_gain(*pe) if pe else None,
            "es_kl": mean_kl(plain) if plain else None,
        })
    diffs = [r["difference"][0] for r in rows]
    return {
        "budget": budget, "lambda": lam, "rows": rows,
        "mean_budget_gain": float(np.mean([r["budget_gain"][0] for r in rows])) if rows else None,
        "mean_fixed_gain": float(np.mean([r["fixed_gain"][0] for r in rows])) if rows else None,
        "mean_difference": float(np.mean(diffs)) if diffs else None,
        "sd_difference": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None,
        "difference_interval": mean_interval(diffs),
    }


#: Two-sided 95% quantiles of Student's t by degrees of freedom (no scipy needed for a table).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 30: 2.042}


def mean_interval(values: list[float]) -> list[float] | None:
    """The 95% t-interval of the mean over training seeds: the spread between ES runs,
    which the intervals over questions do not show."""
    n = len(values)
    if n < 2:
        return None
    df = max(k for k in T_975 if k <= n - 1)  # the next smaller table entry: a slightly wider interval
    half = T_975[df] * float(np.std(values, ddof=1)) / math.sqrt(n)
    mean = float(np.mean(values))
    return [mean - half, mean + half]


def plot(result: dict[str, Any], path: Path) -> None:
    """Two panels: each budget run's measured KL against its budget over the iterations (does
    it hold?), and each seed's held-out gain under the budget against the fixed λ's and against
    the previous budget controller's (is the spread the controller's or the runs'?)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (held, seeds) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours: dict[float, str] = {}  # one colour per budget, named in the legend once
    for b in result["budgets"]:
        readings = [r for r in b.get("curvatures", []) if r["kind"] == "measured"]
        if not readings:
            continue
        first = b["budget"] not in colours
        colour = colours.setdefault(b["budget"], f"C{len(colours)}")
        held.plot([r["after"] for r in readings], [r["kl"] / b["budget"] for r in readings], "o-", color=colour,
                  alpha=0.6, ms=3, label=f"X = {b['budget']:g}" if first else None)
    for level, style, text in ((1.0, "--", "the budget"), (1.2, ":", "1.2·X (the goal's limit)"),
                               (0.9, "-.", "0.9·X (the plan's aim)")):
        held.axhline(level, color="red" if level == 1.0 else "grey", ls=style, lw=1, label=text)
    held.set_xlabel("iteration")
    held.set_ylabel("KL measured during training / X")
    held.set_title("the KL each budget run measured, against its budget", fontsize=10)
    held.grid(alpha=0.3)
    held.legend(fontsize=8, loc="lower right")

    rows = [r for r in (result.get("seeds") or {}).get("rows", []) if r.get("fixed_gain")]
    budget = [r["budget_gain"][0] for r in rows]
    for key, label, marker, colour in (("fixed_gain", "fixed λ={lam:g}", "o", "C2"),
                                       ("earlier_budget_gain", "previous budget run", "s", "C4")):
        pairs = [(r[key][0], g) for r, g in zip(rows, budget) if r.get(key)]
        if len(pairs) < 2:
            continue
        xs, ys = zip(*pairs)
        r_xy = float(np.corrcoef(xs, ys)[0, 1])
        seeds.scatter(xs, ys, marker=marker, color=colour, alpha=0.75,
                      label=f"{label.format(lam=result['seeds']['lambda'])} (r = {r_xy:+.2f})")
    if rows:
        lo = min(min(budget), *(r["fixed_gain"][0] for r in rows)) - 2
        hi = max(max(budget), *(r["fixed_gain"][0] for r in rows)) + 2
        seeds.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    seeds.set_xlabel("held-out gain of the other run at the same seed")
    seeds.set_ylabel(f"held-out gain under --kl_budget {(result.get('seeds') or {}).get('budget', '')}")
    seeds.set_title("seed by seed: the budget against a fixed λ and against itself", fontsize=10)
    seeds.grid(alpha=0.3)
    seeds.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("claims_dir", help="the paper-claims sweep (plain ES and the λ ladder); '-' with --previous")
    ap.add_argument("control_dir")
    ap.add_argument("--reference", default="es-n8")
    ap.add_argument("--json", default=None)
    ap.add_argument("--figure", default=None, help="a PNG: the budgets' KL against X, and the seed pairs' gains")
    ap.add_argument("--pair_budget", type=float, default=0.1, help="the budget compared seed by seed ...")
    ap.add_argument("--pair_lambda", type=float, default=10.0, help="... with the fixed L2 λ that ends at its KL")
    ap.add_argument("--previous", default=None,
                    help="an earlier --json result: what the directories lack (the ladder, auto λ, the seed pairs' "
                         "fixed-λ and plain-ES runs) is read from it, so budget runs can be re-run alone after a "
                         "change to the budget controller (no other run uses it)")
    a = ap.parse_args()
    previous = json.loads(Path(a.previous).read_text()) if a.previous else {}
    claims = _runs(a.claims_dir)
    control = _runs(a.control_dir)
    if a.reference in claims:
        ref = summary(claims[a.reference], None, None)
        ladder = [summary(r, _first(ref["gain"]), ref["kl"]) | {"lambda": r["config"].get("awd_lambda")}
                  for r in claims.values() if r["config"].get("awd") == "l2"]
        ladder.append(ref | {"lambda": 0.0})
    elif previous:
        ref, ladder = previous["reference"], previous["ladder"]
    else:
        raise SystemExit(f"no run {a.reference!r} in {a.claims_dir}, and no --previous result to take it from")
    result: dict[str, Any] = {"reference": ref, "ladder": sorted(ladder, key=lambda p: p["lambda"])}
    if "auto" in control:
        evidence = json.loads((Path(a.control_dir) / "auto" / "auto_lambda.json").read_text())
        result["auto"] = {**summary(control["auto"], _first(ref["gain"]), ref["kl"]),
                          "evidence": evidence}
    elif "auto" in previous:
        result["auto"] = previous["auto"]
    result["budgets"] = sorted((budget_row(r, ladder, ref) for r in control.values() if r["config"].get("kl_budget")),
                               key=lambda row: (row["budget"], row["seed"]))
    result["seeds"] = seed_pairs([*claims.values(), *control.values()], a.pair_budget, a.pair_lambda,
                                 (previous.get("seeds") or {}).get("rows", []))
    print(markdown(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    if a.figure:
        plot(result, Path(a.figure))


def _first(interval: list[float] | None) -> float | None:
    """The point estimate of a [estimate, low, high] gain, None when there is none."""
    return interval[0] if interval else None


def _runs(directory: str) -> dict[str, dict[str, Any]]:
    if directory == "-":
        return {}
    root = Path(directory)
    if not root.is_dir():
        raise SystemExit(f"{directory}: no such directory")
    return {p.name: load(p) | {"path": p} for p in sorted(root.iterdir()) if (p / "config.yaml").exists()}


def _gain(s: dict[str, Any]) -> str:
    g = s.get("gain")
    if not g:
        return "–"
    return f"{g[0]:+.2f}" if g[1] is None else f"{g[0]:+.2f} [{g[1]:+.2f}, {g[2]:+.2f}]"


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def markdown(result: dict[str, Any]) -> str:
    lines = ["### The fixed-λ ladder (plain ES = λ 0)", "",
             "| λ | held-out gain [95%] | share of ES's gain | mean prior KL | KL cut |", "|---:|---|---:|---:|---:|"]
    for p in result["ladder"]:
        lines.append(f"| {p['lambda']:g} | {_gain(p)} | {_num(p['retention'], '.0%')} | {_num(p['kl'], '.4f')} | "
                     f"{_num(p['kl_cut'], '.2f')} |")
    if "auto" in result:
        au, ev = result["auto"], result["auto"]["evidence"]
        lines += ["", f"### `--awd_lambda auto`: chose λ={ev['chosen_lambda']:g} in {ev['seconds']:.0f} s "
                  f"({ev['cost_fraction']:.0%} of the run)", "",
                  "| λ | probe step | probe reward | retention |", "|---:|---:|---:|---:|"]
        for r in ev["ladder"]:
            lines.append(f"| {r['lambda']:g} | {r['probe_step']:.3g} | {r['reward']:.2f} | {_num(r['retention'], '.0%')} |")
        lines += ["", f"The auto run: held-out gain {_gain(au)} ({_num(au['retention'], '.0%')} of ES's), mean prior KL "
                  f"{_num(au['kl'], '.4f')} ({_num(au['kl_cut'], '.2f')}× under ES)."]
    lines += ["", "### KL budgets", "",
              "| budget X | seed | KL at the end (training / report) | max KL (measured at) | max / X | held-out gain [95%] | "
              "share of ES's gain | fixed-λ gain at the same KL | one measurement / its iteration | all KL time / the rest of training |",
              "|---:|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    for b in result["budgets"]:
        lines.append(
            f"| {b['budget']:g} | {b['seed']} | {_num(b['kl_final_train'], '.4f')} / {_num(b['kl'], '.4f')} | "
            f"{_num(b['kl_max'], '.4f')} ({', '.join(map(str, b['measured_at']))}) | {_num(b['max_over_budget'], '.2f')} | "
            f"{_gain(b)} | {_num(b['retention'], '.0%')} | {_num(b['fixed_lambda_gain_at_same_kl'], '+.2f')} | "
            f"{_num(b['kl_measurement_share'], '.1%')} | {_num(b['kl_overhead'], '.1%')} |")
    errors = [(b, b["end_curvature_error"]) for b in result["budgets"] if b.get("end_curvature_error")]
    if errors:
        lines += ["", "### The end's curvature (KL/‖θ − θ₀‖²) against what the readings before it predicted", "",
                  "| budget X | seed | readings (after iteration: curvature × 10⁵) | latest alone | mean of all |",
                  "|---:|---:|---|---:|---:|"]
        for b, e in errors:
            seen = ", ".join(f"{r['after']}: {r['curvature'] * 1e5:.2f}" for r in b["curvatures"])
            lines.append(f"| {b['budget']:g} | {b['seed']} | {seen} | {e['latest']:+.1%} | {e['pooled']:+.1%} |")
        lines += ["", "rms error over these runs (every budget): " + ", ".join(
            f"{key} {math.sqrt(np.mean([e[key] ** 2 for _, e in errors])):.1%}" for key in ("latest", "pooled")) + "."]
    sp = result.get("seeds") or {}
    if sp.get("rows"):
        lines += ["", f"### `--kl_budget {sp['budget']:g}` against fixed λ={sp['lambda']:g}, seed by seed", "",
                  "| seed | plain ES: gain (KL) | fixed λ: gain [95%] | its KL | budget: gain [95%] | its KL | "
                  "budget − fixed [95%, over questions] |",
                  "|---:|---|---|---:|---|---:|---|"]
        for r in sp["rows"]:
            es = "–" if r["es_gain"] is None else f"{r['es_gain'][0]:+.1f} ({r['es_kl']:.3f})"
            lines.append(f"| {r['seed']} | {es} | {_gain({'gain': r['fixed_gain']})} | {_num(r['fixed_kl'], '.4f')} | "
                         f"{_gain({'gain': r['budget_gain']})} | {_num(r['budget_kl'], '.4f')} | "
                         f"{_gain({'gain': r['difference']})} |")
        ci = sp["difference_interval"]
        lines += ["", f"Over {len(sp['rows'])} seeds: fixed {_num(sp['mean_fixed_gain'], '+.2f')}, budget "
                  f"{_num(sp['mean_budget_gain'], '+.2f')}; mean difference {_num(sp['mean_difference'], '+.2f')} "
                  f"(sd over seeds {_num(sp['sd_difference'], '.2f')}"
                  + ("" if ci is None else f"; 95% t-interval over seeds [{ci[0]:+.2f}, {ci[1]:+.2f}]") + ")."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
