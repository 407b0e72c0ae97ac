"""ES bookkeeping vs generation: where does an iteration's time go (steady state)?

For each workload (N members × P prompts × T new tokens) this runs one real ES iteration on
the embedded model (perturb, generate, restore, score, update, drift) and, for reference,
plain batched generation of the same prompts N times with the base weights. It reports
per-phase seconds and the fraction of the iteration spent outside generation; the goal
is under 5%.

    python benchmarks/es_overhead.py                 # default workloads, 2 threads
    python benchmarks/es_overhead.py --workloads 8x32x128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch


def run(workload: str, threads: int) -> dict:
    from esft.config import ESConfig
    from esft.es import coefficients
    from esft.seedlog import IterationRecord, apply_record
    from esft.trainer import ESTrainer

    n, p, t = (int(x) for x in workload.split("x"))
    with tempfile.TemporaryDirectory() as out:
        cfg = ESConfig(
            model="embedded", task="conciseness", population_size=n, prompts_per_step=p,
            max_new_tokens=t, generation_batch_size=p, output_dir=out, disable_tqdm=True,
            num_threads=threads, max_steps=1,
        )
        trainer = ESTrainer(args=cfg)
        trainer._prepare_run_dir()
        prompts = trainer.engine.encode([trainer.task.messages(e) for e in trainer.train_examples])
        # Warm-up, untimed: the first perturbation and update allocate and first-touch the
        # work and scratch buffers, a one-off cost that steady-state iterations never pay.
        trainer.state.perturb(1, 1, cfg.sigma)
        trainer.state.restore()
        warm = IterationRecord(0, list(range(n)), [0.0] * n, [0.0] * n, {})
        apply_record(trainer.state, warm, cfg, trainer.anchor)
        t0 = time.perf_counter()
        seeds, rewards, stats = trainer.evaluate_population(1, prompts)
        t1 = time.perf_counter()
        record = IterationRecord(1, seeds, rewards, coefficients(rewards, False), {})
        apply_record(trainer.state, record, cfg, trainer.anchor)
        t2 = time.perf_counter()
        iteration = t2 - t0
        scoring = (t1 - t0) - stats["generation"] - stats["perturb_restore"]
        # Reference: the same prompts, N times, base weights, no ES bookkeeping at all.
        from esft.es import prompt_subset

        batch = [prompts[i] for i in prompt_subset(cfg.seed, 1, len(prompts), p)]
        g0 = time.perf_counter()
        plain_tokens = 0
        for _ in range(n):
            plain_tokens += sum(g.num_tokens for g in trainer.engine.generate_ids(batch))
        plain = time.perf_counter() - g0
    overhead = stats["perturb_restore"] + (t2 - t1)
    return {
        "workload": workload,
        "iteration_s": round(iteration, 2),
        "generation_s": round(stats["generation"], 2),
        "perturb_restore_s": round(stats["perturb_restore"], 2),
        "update_awd_drift_s": round(t2 - t1, 2),
        "scoring_s": round(scoring, 3),
        "es_tokens": stats["tokens"],
        "plain_generation_s": round(plain, 2),
        "plain_tokens": plain_tokens,
        "overhead_fraction": round(overhead / iteration, 4),
        "iteration_over_plain": round(iteration / plain, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="8x8x32,8x32x64,8x32x128", help="NxPxT, comma separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write results here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = [run(w, a.threads) for w in a.workloads.split(",")]
    print(f"machine: {platform.processor() or platform.machine()}, {a.threads} threads, torch {torch.__version__}")
    head = ["workload (NxPxT)", "iteration s", "generation s", "perturb+restore s", "update+drift s",
            "ES overhead", "plain gen s", "iteration/plain"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['workload']} | {r['iteration_s']} | {r['generation_s']} | {r['perturb_restore_s']} | "
              f"{r['update_awd_drift_s']} | {100 * r['overhead_fraction']:.1f}% | {r['plain_generation_s']} | "
              f"{r['iteration_over_plain']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
