"""The paper's claims, measured: one row per claim from a sweep of `examples/paper_claims_cpu.yaml`.

Reads the sweep's run directories (config.yaml, metrics.jsonl, eval/forgetting.jsonl,
kl.json) and prints, then writes as JSON, the table of README "What the paper claims, what
esft measures":

1. drift grows like √T and shrinks like 1/√N: measured ‖θ_T − θ₀‖ against Eq. 2 of arXiv
   2605.30148, E‖θ_T − θ₀‖² = T·α²·d/N, as ratios, and the fitted exponents;
2. AWD L2 holds the drift at its predicted plateau (the fixed point of d ← (1 − s)(d + u));
3. a λ range where AWD keeps ≥ 90% of plain ES's held-out target gain while cutting the
   prior-task KL ≥ 2× (or the measured trade-off curve);
4. L1 and L2 behave alike (the same trade-off curve);
5. GRPO drifts far less in norm yet moves the prior-task KL comparably.

    python benchmarks/paper_claims.py runs/paper-claims [--json benchmarks/results/paper_claims.json]
    python benchmarks/paper_claims.py benchmarks/results/kept/paper-claims runs/paper-claims   # kept runs too
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from esft.report.evals import choose_settings, group_rows, task_change

BOOTSTRAP = 10_000


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def load(run: Path) -> dict[str, Any]:
    """What the claims need from one run directory."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    metrics = [m for m in read_jsonl(run / "metrics.jsonl") if m.get("iteration", 0) > 0]
    evals = read_jsonl(run / "eval" / "forgetting.jsonl")
    kl_rows = json.loads((run / "kl.json").read_text()) if (run / "kl.json").exists() else []
    last_kl = max((r["iteration"] for r in kl_rows), default=None)
    drift = {int(m["iteration"]): float(m["drift/norm"]) for m in metrics if "drift/norm" in m}
    if not drift and (run / "drift.json").exists():
        drift = {int(r["iteration"]): float(r["global"]["norm"]) for r in json.loads((run / "drift.json").read_text())}
    return {
        "name": run.name, "config": config, "metrics": metrics, "evals": evals, "drift": drift,
        "kl": {r["task"]: float(r["kl_exact_token"]) for r in kl_rows if r["iteration"] == last_kl},
        "d": next((int(m["params/trainable"]) for m in metrics if "params/trainable" in m), None),
    }


def target_rewards(run: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    """Per-example held-out target rewards at iteration 0 and at the last evaluated iteration."""
    task = run["config"]["task"]
    evals = group_rows(r for r in run["evals"] if r["task"] == task and "rewards" in r)
    if task not in evals:
        return None
    # A run evaluated twice (e.g. before and after the test split grew) keeps both settings:
    # the report's choice (the usable one with the larger n) decides, never a mix.
    change = task_change(evals, task, choose_settings([evals])[task])
    if change is None:
        return None
    return list(change[0].rewards or ()), list(change[1].rewards or ())


def paired_gain(before: list[float], after: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Mean change and its paired-bootstrap 95% interval."""
    diff = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(BOOTSTRAP, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def mean_kl(run: dict[str, Any]) -> float | None:
    return float(np.mean(list(run["kl"].values()))) if run["kl"] else None


def awd_step(config: dict[str, Any]) -> float:
    lam = float(config.get("awd_lambda") or 0.0)
    return lam if config.get("awd_decoupled") else float(config["learning_rate"]) * lam


# -------------------------------------------------------------------------- claims
def random_walk(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Claim 1: ‖θ_T − θ₀‖ against √(T·α²·d/N) for the runs without AWD."""
    rows, points = [], []
    for r in runs.values():
        cfg = r["config"]
        if cfg.get("trainer") == "grpo" or cfg.get("awd", "none") != "none" or not r["drift"] or not r["d"]:
            continue
        alpha, n = float(cfg["learning_rate"]), int(cfg["population_size"])
        # Skipped updates (all rewards equal) add nothing: T counts the updates made.
        updates = np.cumsum([0 if m.get("es/skipped") else 1 for m in r["metrics"]])
        for m, t in zip(r["metrics"], updates):
            k = int(m["iteration"])
            if t > 0:
                points.append((math.log(t), math.log(n), math.log(r["drift"][k])))
        T = int(updates[-1])
        predicted = math.sqrt(T * alpha**2 * r["d"] / n)
        rows.append({"run": r["name"], "N": n, "updates": T, "measured": r["drift"][max(r["drift"])],
                     "predicted": predicted, "ratio": r["drift"][max(r["drift"])] / predicted})
    fit = None
    if len({p[1] for p in points}) > 1:
        x = np.array([[1.0, a, b] for a, b, _ in points])
        coef, *_ = np.linalg.lstsq(x, np.array([p[2] for p in points]), rcond=None)
        fit = {"T_exponent": float(coef[1]), "N_exponent": float(coef[2])}
    return {"rows": sorted(rows, key=lambda r: r["N"]), "fit": fit}


def l2_plateau(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Claim 2: the L2 runs' drift against the transient and fixed point of d ← (1 − s)(d + u)."""
    out = []
    for r in runs.values():
        cfg = r["config"]
        if cfg.get("awd") != "l2" or not r["drift"] or not r["d"]:
            continue
        alpha, n, s = float(cfg["learning_rate"]), int(cfg["population_size"]), awd_step(cfg)
        u = alpha**2 * r["d"] / n
        x = 0.0
        for m in r["metrics"]:
            if not m.get("es/skipped"):
                x = (1 - s) ** 2 * (x + u)
        plateau = math.sqrt((1 - s) ** 2 * u / (1 - (1 - s) ** 2))
        final = r["drift"][max(r["drift"])]
        out.append({"run": r["name"], "step": s, "measured": final, "predicted_at_T": math.sqrt(x),
                    "plateau": plateau, "ratio_at_T": final / math.sqrt(x), "share_of_plateau": math.sqrt(x) / plateau})
    return sorted(out, key=lambda r: r["step"])


def tradeoff(runs: dict[str, dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Claims 3-5: held-out target gain and mean prior KL of every run against plain ES."""
    ref = runs[reference]
    ref_pair = target_rewards(ref)
    ref_gain = paired_gain(*ref_pair)[0] if ref_pair else None
    ref_kl = mean_kl(ref)
    out = []
    for r in runs.values():
        pair = target_rewards(r)
        gain = paired_gain(*pair) if pair else None
        kl = mean_kl(r)
        cfg = r["config"]
        out.append({
            "run": r["name"], "awd": cfg.get("awd", "none") if cfg.get("trainer") != "grpo" else "grpo",
            "lambda": cfg.get("awd_lambda"), "N": cfg.get("population_size"),
            "gain": gain[0] if gain else None, "gain_lo": gain[1] if gain else None, "gain_hi": gain[2] if gain else None,
            "retention": gain[0] / ref_gain if gain and ref_gain else None,
            "kl": kl, "kl_cut": ref_kl / kl if kl and ref_kl else None,
            "drift": r["drift"][max(r["drift"])] if r["drift"] else None,
        })
    return out


# ---------------------------------------------------------------- over seeds
def _seed_estimate(values: list[float]) -> dict[str, Any] | None:
    from esft.report.intervals import t_interval

    if not values:
        return None
    e = t_interval(values)
    return {"mean": e.value, "lo": e.lo if e.has_interval else None, "hi": e.hi if e.has_interval else None,
            "n": len(values), "values": values}


def _wall_minutes(run: dict[str, Any]) -> float | None:
    times = [float(m["time/iteration"]) for m in run["metrics"] if m.get("time/iteration") is not None]
    return sum(times) / 60 if times else None


def over_seeds(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setting (runs that differ only in `seed`): the held-out gain and the mean
    prior KL as a mean over seeds with a t-interval over them, beside the mean per-example
    half-width of the gain, the drift and the wall time of a run."""
    from esft.report.seeds import setting_key
    from esft.report.summary import run_label

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs.values():
        # A run still training (no held-out score or KL yet) would add its drift so far as if final.
        if target_rewards(r) is not None and r["kl"]:
            groups.setdefault(setting_key(r["config"]), []).append(r)
    out = []
    for members in groups.values():
        members = sorted(members, key=lambda r: int(r["config"].get("seed", 0)))
        gains, halves, kls, drifts, walls = [], [], [], [], []
        for r in members:
            pair = target_rewards(r)
            if pair:
                g, lo, hi = paired_gain(*pair)
                gains.append(g)
                halves.append((hi - lo) / 2)
            if mean_kl(r) is not None:
                kls.append(mean_kl(r))
            if r["drift"]:
                drifts.append(r["drift"][max(r["drift"])])
            if _wall_minutes(r) is not None:
                walls.append(_wall_minutes(r))
        cfg = members[0]["config"]
        out.append({
            "setting": run_label(cfg), "runs": [r["name"] for r in members],
            "seeds": [int(r["config"].get("seed", 0)) for r in members],
            "trainer": cfg.get("trainer", "es"), "awd": cfg.get("awd", "none"), "lambda": cfg.get("awd_lambda"),
            "N": cfg.get("population_size"), "T": cfg.get("max_steps"),
            "gain": _seed_estimate(gains), "gain_example_half_width": sum(halves) / len(halves) if halves else None,
            "kl": _seed_estimate(kls), "drift": _seed_estimate(drifts), "minutes": _seed_estimate(walls),
        })
    return out


def population(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The abstract's claim, AWD ≈ a large population at lower cost: plain ES at each N
    against N=8 + AWD L2 λ=10, and the N at which plain ES's KL (fitted as a power of N on
    the measured ones) reaches the AWD run's, with the compute that N costs (∝ N)."""
    plain = sorted((r for r in rows if r["trainer"] == "es" and r["awd"] == "none" and r["kl"] and r["T"] == 20),
                   key=lambda r: r["N"])
    awd = next((r for r in rows if r["awd"] == "l2" and float(r["lambda"] or 0) == 10 and r["N"] == 8
                and r["kl"] and len(r["seeds"]) >= 2), None)
    if len(plain) < 2 or awd is None:
        return None
    x = np.log([r["N"] for r in plain])
    y = np.log([r["kl"]["mean"] for r in plain])
    slope, intercept = np.polyfit(x, y, 1)
    n_match = float(np.exp((math.log(awd["kl"]["mean"]) - intercept) / slope)) if slope < 0 else None
    minutes = {r["N"]: r["minutes"]["mean"] for r in plain if r["minutes"]}
    per_member = np.mean([m / n for n, m in minutes.items()]) if minutes else None
    awd_minutes = awd["minutes"]["mean"] if awd["minutes"] else None
    return {
        "plain": plain, "awd": awd, "kl_exponent": float(slope), "n_matching_awd_kl": n_match,
        "compute_ratio": (n_match * per_member / awd_minutes) if n_match and per_member and awd_minutes else None,
    }


def recovery(root: Path) -> dict[str, Any]:
    """Prior-task accuracy and KL over a long plain-ES run, every evaluated iteration, per seed."""
    from esft.report.intervals import wilson

    out: dict[str, Any] = {}
    for path in sorted(root.iterdir()):
        if not (path / "config.yaml").exists() or path.name == "report":
            continue
        run = load(path)
        priors = [t for t in ("hellaswag", "piqa", "arc_challenge")]
        curve = []
        for k in sorted({r["iteration"] for r in run["evals"]}):
            rows = {r["task"]: r for r in run["evals"] if r["iteration"] == k and r["task"] in priors}
            if len(rows) < len(priors):
                continue
            correct = sum(round(r["accuracy"] * r["n"]) for r in rows.values())
            n = sum(r["n"] for r in rows.values())
            lo, hi = wilson(correct, n)
            target = next((r for r in run["evals"] if r["iteration"] == k and r["task"] == run["config"]["task"]
                           and r.get("rewards")), None)
            curve.append({"iteration": k, "prior_accuracy": correct / n, "lo": lo, "hi": hi,
                          **{f"{t}_accuracy": rows[t]["accuracy"] for t in priors},
                          "target_reward": float(np.mean(target["rewards"])) if target else None})
        kl_rows = json.loads((path / "kl.json").read_text()) if (path / "kl.json").exists() else []
        kl: dict[int, list[float]] = {}
        for r in kl_rows:
            kl.setdefault(int(r["iteration"]), []).append(float(r["kl_exact_token"]))
        out[path.name] = {"accuracy": curve, "kl": {k: float(np.mean(v)) for k, v in sorted(kl.items())}}
    return out


def recovery_markdown(rec: dict[str, Any]) -> str:
    lines = ["| run | iteration | prior accuracy [95% Wilson] | HellaSwag | PIQA | ARC-C | mean prior KL | target reward |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, r in rec.items():
        for c in r["accuracy"]:
            kl = r["kl"].get(c["iteration"])
            target = "–" if c["target_reward"] is None else f"{c['target_reward']:.1f}"
            lines.append(f"| {name} | {c['iteration']} | {c['prior_accuracy']:.1%} [{c['lo']:.1%}, {c['hi']:.1%}] | "
                         f"{c['hellaswag_accuracy']:.0%} | {c['piqa_accuracy']:.0%} | {c['arc_challenge_accuracy']:.0%} | "
                         f"{'–' if kl is None else f'{kl:.3f}'} | {target} |")
    return "\n".join(lines)


def plot_recovery(rec: dict[str, Any], path: Path) -> Path:
    """Prior-task accuracy (pooled over the three tasks, Wilson band; PIQA dashed) and the mean
    prior KL against the iteration, one colour per run: does forgetting come back?"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, kl_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, r) in enumerate(rec.items()):
        colour = f"C{i}"
        it = [c["iteration"] for c in r["accuracy"]]
        acc_ax.plot(it, [100 * c["prior_accuracy"] for c in r["accuracy"]], "o-", color=colour, label=f"{name}: 3 tasks")
        acc_ax.fill_between(it, [100 * c["lo"] for c in r["accuracy"]], [100 * c["hi"] for c in r["accuracy"]],
                            color=colour, alpha=0.2)
        acc_ax.plot(it, [100 * c["piqa_accuracy"] for c in r["accuracy"]], "--", color=colour, label=f"{name}: PIQA")
        kl_ax.plot(list(r["kl"]), list(r["kl"].values()), "o-", color=colour, label=name)
    acc_ax.set(xlabel="iteration", ylabel="accuracy (%)", title="prior-task accuracy (95% Wilson band)")
    kl_ax.set(xlabel="iteration", ylabel="nats/token", title="mean prior-task KL(base ‖ run)")
    for ax in (acc_ax, kl_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _interval(e: dict[str, Any] | None, fmt: str = "{:+.1f}") -> str:
    if e is None:
        return "–"
    s = fmt.format(e["mean"])
    if e["lo"] is not None:
        s += f" [{fmt.format(e['lo'])}, {fmt.format(e['hi'])}]"
    return s


def seeds_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| setting | seeds | held-out gain, mean [95% t over seeds] | per-example ± | mean prior KL [t] | "
             "‖θ_T − θ₀‖ | minutes per run |", "|---|---|---|---:|---|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["trainer"], r["awd"], r["N"] or 0, str(r["lambda"]))):
        half = "–" if r["gain_example_half_width"] is None else f"±{r['gain_example_half_width']:.1f}"
        drift = "–" if r["drift"] is None else f"{r['drift']['mean']:.2f}"
        minutes = "–" if r["minutes"] is None else f"{r['minutes']['mean']:.1f}"
        lines.append(f"| {r['setting']} | {', '.join(map(str, r['seeds']))} | {_interval(r['gain'])} | {half} | "
                     f"{_interval(r['kl'], '{:.3f}')} | {drift} | {minutes} |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    lines = ["### Drift against Eq. 2 (runs without AWD)", "",
             "| run | N | updates T | ‖θ_T − θ₀‖ | √(T·α²·d/N) | measured / predicted |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["random_walk"]["rows"]:
        lines.append(f"| {r['run']} | {r['N']} | {r['updates']} | {r['measured']:.2f} | {r['predicted']:.2f} | {r['ratio']:.3f} |")
    fit = result["random_walk"]["fit"]
    if fit:
        lines += ["", f"Fit over every iteration of these runs: ‖θ_T − θ₀‖ ∝ T^{fit['T_exponent']:.3f} · N^{fit['N_exponent']:.3f} (Eq. 2: T^0.5 · N^-0.5)."]
    lines += ["", "### AWD L2 against its prediction", "",
              "| run | s = α·λ | ‖θ_T − θ₀‖ | predicted at T | measured / predicted | plateau √X* | predicted share of plateau reached |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["l2_plateau"]:
        lines.append(f"| {r['run']} | {r['step']:.3g} | {r['measured']:.2f} | {r['predicted_at_T']:.2f} | "
                     f"{r['ratio_at_T']:.3f} | {r['plateau']:.2f} | {r['share_of_plateau']:.0%} |")
    if result.get("over_seeds"):
        lines += ["", "### Over training seeds", "", seeds_markdown(result["over_seeds"])]
    pop = result.get("population")
    if pop:
        match = "–" if pop["n_matching_awd_kl"] is None else f"{pop['n_matching_awd_kl']:.0f}"
        ratio = "–" if pop["compute_ratio"] is None else f"{pop['compute_ratio']:.1f}×"
        lines += ["", "### AWD against larger populations", "",
                  f"Plain ES's mean prior KL falls like N^{pop['kl_exponent']:.2f}; it reaches N=8 + AWD L2 λ=10's "
                  f"{pop['awd']['kl']['mean']:.3f} at N ≈ {match}, which costs {ratio} the AWD run's compute."]
    if result.get("recovery"):
        lines += ["", "### Prior tasks over a long plain-ES run", "", recovery_markdown(result["recovery"])]
    lines += ["", "### Held-out target gain against prior-task KL", "",
              "| run | held-out gain [95%] | share of ES's gain | mean prior KL | KL cut vs ES | ‖θ_T − θ₀‖ |",
              "|---|---|---:|---:|---:|---:|"]
    for r in result["tradeoff"]:
        gain = "–" if r["gain"] is None else f"{r['gain']:+.2f} [{r['gain_lo']:+.2f}, {r['gain_hi']:+.2f}]"
        ret = "–" if r["retention"] is None else f"{r['retention']:.0%}"
        kl = "–" if r["kl"] is None else f"{r['kl']:.4f}"
        cut = "–" if r["kl_cut"] is None else f"{r['kl_cut']:.2f}×"
        drift = "–" if r["drift"] is None else f"{r['drift']:.2f}"
        lines.append(f"| {r['run']} | {gain} | {ret} | {kl} | {cut} | {drift} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dirs", nargs="+", help="sweep directories or kept records (keep_records.py); a run "
                    "name found in several is read from the last")
    ap.add_argument("--reference", default="es-n8", help="the plain-ES run the others are compared with")
    ap.add_argument("--json", default=None)
    ap.add_argument("--recovery", default=None, help="sweep directory of examples/recovery_cpu.yaml")
    ap.add_argument("--recovery_figure", default=None, help="with --recovery: draw its curves to this PNG")
    a = ap.parse_args()
    runs = {p.name: load(p) for root in map(Path, a.sweep_dirs) for p in sorted(root.iterdir())
            if (p / "config.yaml").exists() and p.name != "report"}
    seeds = over_seeds(runs)
    result = {"random_walk": random_walk(runs), "l2_plateau": l2_plateau(runs), "tradeoff": tradeoff(runs, a.reference),
              "over_seeds": seeds, "population": population(seeds)}
    if a.recovery:
        result["recovery"] = recovery(Path(a.recovery))
        if a.recovery_figure:
            plot_recovery(result["recovery"], Path(a.recovery_figure))
    print(markdown(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
