"""What running user rewards in a worker process costs, against a call in the trainer's process.

(a) The guard alone: a cheap reward (completion lengths, 8 completions) called K times
    through `RewardGuard(60)` (a worker process: the call is pickled to the supervisor, on to
    the worker, and the values back) and `RewardGuard(60, isolation="none")` (a direct call),
    in interleaved blocks; prints µs per call.
(b) Tiny ES iterations of the embedded model with the same cheap custom reward: each
    iteration's plan is scored by a population whose guard runs the reward in a worker
    process and by one whose guard calls it directly (same seeds, same weights, alternating
    which goes first), and the rewards must agree bitwise. Prints the median population
    time per iteration of each and the overhead as a percentage, measured and as predicted
    from (a) (calls per iteration × µs per call). The goal is under 2%.

    python benchmarks/reward_guard.py
    python benchmarks/reward_guard.py --workload 8x4x16 --iterations 4 --repeats 2 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

PROMPTS = [
    "Say hi.", "Name a fruit.", "Describe the sea.", "Name a bird.", "Count to three.",
    "Name a colour.", "Describe a cat.", "Say goodbye.",
]


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def guard_loop(calls: int, blocks: int) -> dict[str, float]:
    from esft.rewards import RewardGuard
    from esft.tasks.custom import CustomTask

    rows = [{"prompt": "p"}] * 8
    completions = ["a completion of some length"] * 8
    task = CustomTask.from_functions([length_reward], rows)
    guards = {"direct": RewardGuard(60, isolation="none"), "process": RewardGuard(60)}
    guards["process"].call(task, 0, completions, rows)  # starts the supervisor and the worker
    times: dict[str, list[float]] = {k: [] for k in guards}
    for b in range(blocks):
        for name in (("direct", "process") if b % 2 == 0 else ("process", "direct")):
            guard = guards[name]
            t0 = time.perf_counter()
            for _ in range(calls):
                guard.call(task, 0, completions, rows)
            times[name].append((time.perf_counter() - t0) / calls)
    for guard in guards.values():
        guard.close()
    direct, process = statistics.median(times["direct"]), statistics.median(times["process"])
    return {"direct_us": 1e6 * direct, "process_us": 1e6 * process, "overhead_us": 1e6 * (process - direct)}


def es_iterations(workload: str, iterations: int, repeats: int, threads: int) -> dict[str, float]:
    from esft.config import ESConfig
    from esft.population import LocalPopulation
    from esft.rewards import RewardGuard
    from esft.trainer import ESTrainer

    n, p, t = (int(x) for x in workload.split("x"))
    with tempfile.TemporaryDirectory() as out:
        cfg = ESConfig(
            model="embedded", population_size=n, prompts_per_step=p, max_new_tokens=t, generation_batch_size=p,
            trainable=r"model\.layers\.0\.", seed=7, num_threads=threads, disable_tqdm=True, output_dir=out,
            max_steps=iterations, reward_timeout=60,
        )
        trainer = ESTrainer(reward_funcs=length_reward, train_dataset=[{"prompt": q} for q in PROMPTS], args=cfg)
        prompts = trainer.engine.encode([trainer.task.messages(e) for e in trainer.train_examples])
        guards = {"process": RewardGuard(60), "none": RewardGuard(60, isolation="none")}
        pops = {name: LocalPopulation(cfg, trainer.state, trainer.engine, trainer.task, trainer.train_examples,
                                      prompts, guard=guard) for name, guard in guards.items()}
        # Warm-up, untimed: first-touch of the work buffers, the first generate(), the worker's start.
        for pop in pops.values():
            pop.score(trainer.plan(1, len(prompts), pop))
        times: dict[str, list[float]] = {k: [] for k in pops}
        scoring: dict[str, list[float]] = {k: [] for k in pops}
        for rep in range(repeats):
            for it in range(1, iterations + 1):
                plan = trainer.plan(it, len(prompts), pops["none"])
                order = ("process", "none") if (rep + it) % 2 else ("none", "process")
                rewards = {}
                for name in order:
                    t0 = time.perf_counter()
                    res = pops[name].score(plan)
                    wall = time.perf_counter() - t0
                    times[name].append(wall)
                    scoring[name].append(wall - res.stats["generation"] - res.stats["perturb_restore"])
                    rewards[name] = res.rewards
                assert rewards["process"] == rewards["none"], "the worker process changed a reward"
        for guard in guards.values():
            guard.close()
        trainer.close()
    guarded, direct = statistics.median(times["process"]), statistics.median(times["none"])
    return {
        "members": n, "calls_per_iteration": n,
        "guarded_s": guarded, "direct_s": direct, "overhead_pct": 100 * (guarded - direct) / direct,
        "scoring_guarded_ms": 1e3 * statistics.median(scoring["process"]),
        "scoring_direct_ms": 1e3 * statistics.median(scoring["none"]),
        "spread_pct": 100 * (max(times["none"]) - min(times["none"])) / direct,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="guard calls per timed block in (a)")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--workload", default="8x4x16", help="NxPxT: members x prompts x new tokens in (b)")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {a.threads} threads, torch {torch.__version__}")
    g = guard_loop(a.calls, a.blocks)
    print(f"(a) guard per call: direct {g['direct_us']:.1f} µs, worker process {g['process_us']:.1f} µs "
          f"-> {g['overhead_us']:.1f} µs overhead per call")
    r = es_iterations(a.workload, a.iterations, a.repeats, a.threads)
    predicted = 100 * r["calls_per_iteration"] * g["overhead_us"] * 1e-6 / r["direct_s"]
    print(f"(b) {a.workload} (NxPxT), {a.iterations} iterations x {a.repeats} repeats, interleaved:")
    print("| reward_isolation | population s / iteration (median) | scoring ms / iteration |")
    print("|---|---:|---:|")
    print(f"| none (direct) | {r['direct_s']:.3f} | {r['scoring_direct_ms']:.2f} |")
    print(f"| process (worker) | {r['guarded_s']:.3f} | {r['scoring_guarded_ms']:.2f} |")
    in_iteration = 100 * (r["scoring_guarded_ms"] - r["scoring_direct_ms"]) * 1e-3 / r["direct_s"]
    print(f"overhead per iteration: measured {r['overhead_pct']:+.2f}% (run-to-run spread of the direct runs "
          f"{r['spread_pct']:.1f}%), predicted from (a) {predicted:.3f}% "
          f"({r['calls_per_iteration']} calls x {g['overhead_us']:.0f} µs)")
    # The scoring phase alone is timed to the microsecond, free of generation's noise.
    print(f"scoring phase with the guard: +{r['scoring_guarded_ms'] - r['scoring_direct_ms']:.1f} ms per iteration "
          f"= {in_iteration:.3f}% of the iteration")


if __name__ == "__main__":
    main()
