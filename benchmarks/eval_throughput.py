"""Accuracy-evaluation throughput and seed-log replay cost on the embedded model.

Evaluation is generation-bound: this measures prompts/s and tokens/s of `esft eval`
(length-sorted batches) per task, and how long replaying K iterations of an N-member
log takes (K·N noise regenerations), to decide whether replayed checkpoints need caching.

    python benchmarks/eval_throughput.py --data_dir ../shared/data
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def eval_rows(tasks: list[str], limit: int, max_new_tokens: int, batch_size: int, data_dir: str) -> list[dict]:
    from esft.evaluation.accuracy import evaluate_model, load_tasks
    from esft.models import load_model

    model, tok = load_model("embedded", "float32", "cpu")
    results = evaluate_model(model, tok, load_tasks(tasks, data_dir), limit, max_new_tokens, batch_size, progress=False)
    return [{"task": r.task, "n": r.n, "seconds": r.seconds, "prompts/s": r.prompts_per_second,
             "tokens/s": r.tokens_per_second, "mean tokens": r.mean_completion_tokens} for r in results]


def replay_cost(iterations: int, population: int) -> dict:
    """Seconds per replayed iteration of a full-model log (fake coefficients, real noise)."""
    from esft.anchor import AnchorFile
    from esft.config import ESConfig
    from esft.models import load_model
    from esft.params import WeightState
    from esft.seedlog import IterationRecord, apply_record

    model, _ = load_model("embedded", "float32", "cpu")
    state = WeightState(model)
    cfg = ESConfig(population_size=population, awd="l2", awd_lambda=10.0)
    with tempfile.TemporaryDirectory() as d:
        anchor = AnchorFile.write(os.path.join(d, "theta0.safetensors"), state.items())
        t0 = time.perf_counter()
        for k in range(1, iterations + 1):
            rec = IterationRecord(k, list(range(k * 100, k * 100 + population)), [0.0] * population,
                                  [((i % 3) - 1) * 0.5 for i in range(population)], {})
            apply_record(state, rec, cfg, anchor, compute_drift=False)
        seconds = time.perf_counter() - t0
    return {"iterations": iterations, "population": population, "seconds": seconds,
            "seconds/iteration": seconds / iterations, "params": state.num_parameters}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data_dir", default=os.environ.get("ESFT_DATA_DIR", "../shared/data"))
    ap.add_argument("--tasks", default="hellaswag,piqa,arc_challenge,gsm8k")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"{a.threads} threads, {a.limit} examples per task, {a.max_new_tokens} new tokens, batch {a.batch_size}")
    print("| task | n | seconds | prompts/s | tokens/s | mean tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in eval_rows(a.tasks.split(","), a.limit, a.max_new_tokens, a.batch_size, a.data_dir):
        print(f"| {r['task']} | {r['n']} | {r['seconds']:.1f} | {r['prompts/s']:.2f} | {r['tokens/s']:.0f} | {r['mean tokens']:.1f} |")
    r = replay_cost(5, 30)
    print(f"\nreplay (AWD l2, all {r['params']:,} weights): {r['iterations']} iterations of N={r['population']} "
          f"in {r['seconds']:.1f} s = {r['seconds/iteration']:.2f} s/iteration")


if __name__ == "__main__":
    main()
