"""Ray scale-out: iteration time with K actors vs in-process, and what crosses the wire.

Runs real ES iterations (conciseness task, embedded model, all weights trainable) three
ways: in-process with 2 torch threads, and on a local Ray cluster with 1 and 2 CPU actors
of 1 thread each. The first iteration is a warm-up; the others are averaged. For every
mode it reports:

- iteration seconds and the speed-up over in-process;
- "outside generation": 1 − (generation on the critical path) / iteration, i.e. the share
  spent perturbing, scoring, updating, scheduling and communicating;
- "scheduling + communication": the busiest actor's idle time while the population is
  scored (dispatch, result transfer and load imbalance) over the iteration; goal ≤ 10%;
- bytes pickled on the wire per iteration (member calls + update broadcast), measured
  again at N=30 to show that it grows with N and not with the model.

    python benchmarks/scaling.py                       # N=8, 8 prompts, 32 tokens
    python benchmarks/scaling.py --device cuda --workers 1,2   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch


def run_mode(workers: int | None, args: argparse.Namespace, steps: int, **overrides) -> list[dict]:
    from esft.config import ESConfig
    from esft.trainer import ESTrainer

    with tempfile.TemporaryDirectory() as out:
        settings = dict(
            model="embedded", task="conciseness", population_size=args.population, prompts_per_step=args.prompts,
            max_new_tokens=args.tokens, generation_batch_size=args.prompts, sigma=1e-3, learning_rate=5e-4,
            max_steps=steps, output_dir=out, disable_tqdm=True, logging_steps=0, seed=3,
            num_threads=args.threads, device=args.device, workers=workers, worker_threads=1 if args.device == "cpu" else None,
            sync_check_steps=0,
        )
        settings.update(overrides)
        cfg = ESConfig(**settings)
        return ESTrainer(args=cfg).train()


def summarize(name: str, history: list[dict]) -> dict:
    rows = history[1:]  # the first iteration allocates buffers and starts actors
    mean = lambda key: sum(m.get(key, 0.0) for m in rows) / len(rows)  # noqa: E731
    it = mean("time/iteration")
    if "time/population_wall" in rows[0]:
        actors = sorted({k.split("/")[1] for m in rows for k in m if k.startswith("workers/worker-")})
        busy = [max(m.get(f"workers/{a}/busy_s", 0.0) for a in actors) for m in rows]
        gen = [max(m.get(f"workers/{a}/generation_s", 0.0) for a in actors) for m in rows]
        sched = [m["time/population_wall"] - b for m, b in zip(rows, busy)]
        gen_crit, sched_s = sum(gen) / len(rows), sum(sched) / len(rows)
        wire = mean("wire/member_bytes") + mean("wire/update_bytes")
    else:
        gen_crit, sched_s, wire = mean("time/generation"), 0.0, 0.0
    return {
        "mode": name, "iteration_s": it, "generation_critical_s": gen_crit,
        "outside_generation": 1 - gen_crit / it, "scheduling_s": sched_s, "scheduling_frac": sched_s / it,
        "wire_bytes": wire, "reward_mean": [m["reward/mean"] for m in history],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--output", default="benchmarks/results/scaling.json")
    args = ap.parse_args()
    import ray

    torch.set_num_threads(args.threads)
    results = [summarize(f"in-process ({args.threads} threads)", run_mode(None, args, args.steps))]
    ray.init(include_dashboard=False, num_cpus=None if args.device == "cuda" else args.threads)
    try:
        for k in (int(x) for x in args.workers.split(",")):
            label = f"Ray, {k} {'CUDA' if args.device == 'cuda' else 'CPU'} actor(s)" + (" x 1 thread" if args.device == "cpu" else "")
            results.append(summarize(label, run_mode(k, args, args.steps)))
        # Wire bytes at N=30 (1 prompt, 1 token, one layer: only the payload size matters here).
        small = run_mode(2, args, 2, population_size=30, prompts_per_step=1, max_new_tokens=1, trainable=r"model\.layers\.0\.")
        wire30 = small[-1]["wire/member_bytes"] + small[-1]["wire/update_bytes"]
    finally:
        ray.shutdown()
    base = results[0]["iteration_s"]
    for r in results:
        r["speedup"] = base / r["iteration_s"]
    payload = {
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "device": args.device,
        "workload": f"N={args.population} x {args.prompts} prompts x {args.tokens} tokens", "results": results,
        "wire_bytes_n30": wire30, "timestamp": time.strftime("%Y-%m-%d %H:%M"),
    }
    with open(args.output, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"\n{payload['workload']}, device {args.device}\n")
    print("| mode | iteration s | speed-up | outside generation | scheduling + communication | wire bytes/iteration |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        sched = f"{r['scheduling_s']:.2f} s ({100 * r['scheduling_frac']:.1f}%)" if r["wire_bytes"] else "—"
        wire = f"{r['wire_bytes']:.0f}" if r["wire_bytes"] else "—"
        print(f"| {r['mode']} | {r['iteration_s']:.2f} | {r['speedup']:.2f}x | {100 * r['outside_generation']:.1f}% | {sched} | {wire} |")
    print(f"\nwire bytes per iteration at N=30: {wire30:.0f}")


if __name__ == "__main__":
    main()
