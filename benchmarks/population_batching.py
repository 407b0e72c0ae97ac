"""Population batching: one member at a time vs full-rank batched vs low-rank batched vs ideal.

For each workload (N members × P prompts per member, T new tokens, all weights trainable)
this times one steady-state ES iteration (population evaluation, scoring and the update)
four ways, side by side in one process on the embedded model:

- one:     `--members_per_batch 1`, the default path (perturb, generate, restore per member);
- full:    `--members_per_batch N`, full-rank members stacked in one batched decoding loop
           (in balanced passes when N copies of the weights exceed the memory budget), one
           matmul per member with one-at-a-time shapes: bitwise the one-at-a-time logits;
- full_bmm: the same stacked weights, one batched matmul (bmm) over all members per layer:
           the CUDA path's kernel, run here on CPU (not bitwise: its thread split differs);
- lowrank: `--members_per_batch N --noise_rank r`, the base matmul shared by all members;
- ideal:   plain batched generation with the base weights of the same N·P sequences, with
           N·P rows per pass (the ESFT_BATCH_MEMORY_GB budget does not apply): no ES at all.

`--subset NxP=k` times only the first k members of a slow method on that workload and
extrapolates the population part linearly to N (the update is always timed in full); the
table marks such rows. `--quality_steps K` (default 20) adds a short training comparison on the conciseness
task: full-rank vs low-rank r=1 and r=4 with the same seeds, N, prompts and iterations.
`--floor_only` times only the matmuls that full-rank members cannot share (`matmul_floor`).
`--verify` checks whether speculative verification (score the base model's continuation in
one teacher-forced pass, keep the prefix a member agrees with) could be exact: it compares
the logits of incremental greedy decoding with those of one pass over the same tokens.

    python benchmarks/population_batching.py                      # defaults below, 2 threads
    python benchmarks/population_batching.py --workloads 8x8 --tokens 16 --quality_steps 0
    python benchmarks/population_batching.py --floor_only --json results/population_batching.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace

import torch


def _population_pass(pop, state, engine, members, batch, examples, per_pass: int):
    """Generate and score `members` in passes of `per_pass`; (rewards, tokens, gen s, es s, texts)."""
    from esft.es import balanced_groups
    from esft.population import generate_group, score_group

    rewards, texts = [], []
    tokens, t_gen, t_es = 0, 0.0, 0.0
    sizes = [1] * len(members) if per_pass == 1 else balanced_groups(len(members), pop.max_group())
    start = 0
    for size in sizes:
        group = members[start : start + size]
        per_member, g, p = generate_group(state, engine, pop.batcher, group, pop.cfg.sigma, batch)
        t_gen += g
        t_es += p
        for gens in per_member:
            tokens += sum(x.num_tokens for x in gens)
            texts.append([x.text for x in gens])
        rewards += [r.reward for r in score_group(pop.task, list(range(start, start + size)), per_member, examples, g, p)]
        start += size
    return rewards, tokens, t_gen, t_es, texts, sizes


def run_workload(workload: str, tokens: int, threads: int, rank: int, subset: dict[str, int]) -> list[dict]:
    from esft import es
    from esft.batched import PopulationBatcher
    from esft.config import ESConfig
    from esft.params import WeightState
    from esft.population import LocalPopulation
    from esft.trainer import ESTrainer

    n, p = (int(x) for x in workload.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as out:
        cfg = ESConfig(
            model="embedded", task="conciseness", population_size=n, prompts_per_step=p, max_new_tokens=tokens,
            generation_batch_size=p, output_dir=out, disable_tqdm=True, num_threads=threads, max_steps=1,
        )
        trainer = ESTrainer(args=cfg)
        engine = trainer.engine
        prompts = engine.encode([trainer.task.messages(e) for e in trainer.train_examples])
        subset_idx = es.prompt_subset(cfg.seed, 1, len(prompts), p)
        batch = [prompts[i] for i in subset_idx]
        examples = [trainer.train_examples[i] for i in subset_idx]
        seeds = es.iteration_seeds(cfg.seed, 1, n)
        members = es.members(seeds, False)
        scale = es.update_scale(cfg.learning_rate, n)

        lr_cfg = replace(cfg, noise_rank=rank, members_per_batch=n)
        states = {
            "one": (trainer.state, replace(cfg, members_per_batch=1)),
            "full": (trainer.state, replace(cfg, members_per_batch=n)),
            "full_bmm": (trainer.state, replace(cfg, members_per_batch=n)),
            "lowrank": (WeightState.from_config(trainer.model, lr_cfg), lr_cfg),
        }
        # Every method is timed from the same weights: the update is undone from this copy.
        snapshot = {name: m.clone() for name, m in trainer.state.items()}
        base_texts = None
        results = {}
        previous_batcher = None
        for method in ("ideal", "one", "full", "full_bmm", "lowrank"):
            if method == "ideal":
                engine.generate_ids(batch[:2], 2, copies=n)  # warm-up
                t0 = time.perf_counter()
                gens = engine.generate_ids(batch, copies=n)
                t = time.perf_counter() - t0
                base_texts = [g.text for g in gens[: len(batch)]]
                results[method] = dict(iteration_s=t, generation_s=t, es_s=0.0, tokens=sum(g.num_tokens for g in gens),
                                       passes=f"1 x {n * p} rows", extrapolated=False)
                continue
            state, mcfg = states[method]
            batcher = None
            if method in ("full", "full_bmm"):
                if previous_batcher is not None:
                    previous_batcher.release()  # one stack of member weights at a time
                batcher = previous_batcher = PopulationBatcher(state, exact=method == "full")
            pop = LocalPopulation(mcfg, state, engine, trainer.task, trainer.train_examples, prompts, batcher)
            per_pass = mcfg.members_per_batch
            # Warm-up, untimed: allocates work buffers / stacked weights and first-touches them.
            k_warm = min(n, per_pass if per_pass > 1 else 1)
            warm = es.members(list(range(1, k_warm + 1)), False)
            _population_pass(pop, state, engine, warm, [x[:8] for x in batch[:2]], examples[:2], per_pass)
            state.apply_update([1], [0.0], 0.0)
            trainer.state.load_masters(snapshot)
            k = subset.get(f"{workload}:{method}", n)
            timed = members[:k]
            t0 = time.perf_counter()
            rewards, ntok, t_gen, t_es, texts, sizes = _population_pass(pop, state, engine, timed, batch, examples, per_pass)
            t_pop = time.perf_counter() - t0
            factor = n / k
            t1 = time.perf_counter()
            # The update for all N seeds (coefficients need all N rewards: pad with the timed ones).
            coeffs = es.coefficients((rewards * n)[:n], False) or [0.0] * n
            state.apply_update(seeds, coeffs, scale)
            t_update = time.perf_counter() - t1
            results[method] = dict(
                iteration_s=t_pop * factor + t_update, generation_s=t_gen * factor, es_s=t_es * factor + t_update,
                tokens=int(ntok * factor), passes=f"{len(sizes)} x {max(sizes)} members" if per_pass > 1 else f"{k} x 1",
                extrapolated=k < n, rewards=rewards, texts=texts,
            )
            trainer.state.load_masters(snapshot)  # the low-rank state shares these fp32 tensors
        # Side checks: full-rank batched rewards vs one at a time; members that repeat the base.
        one = results["one"]["rewards"]
        equal_one = {}  # over the members both timed (subset rows time fewer)
        for method in ("full", "full_bmm"):
            other = results[method]["rewards"]
            common = min(len(one), len(other))
            equal_one[method] = one[:common] == other[:common]
        for method in ("one", "full", "full_bmm", "lowrank"):
            texts = results[method].pop("texts")
            # Completions (member × prompt) identical to the base model's: the room for
            # speculative verification against the base continuation.
            pairs = [(a, b) for t in texts for a, b in zip(t, base_texts)]
            results[method]["same_as_base"] = sum(a == b for a, b in pairs) / len(pairs)
        ideal_s = results["ideal"]["iteration_s"]
        one_s = results["one"]["iteration_s"]
        for method, r in results.items():
            r.pop("rewards", None)
            rows.append({
                "workload": f"{n}x{p}x{tokens}", "method": method, **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()},
                "speedup_vs_one": round(one_s / r["iteration_s"], 2), "over_ideal": round(r["iteration_s"] / ideal_s, 2),
                "tokens_per_s": round(r["tokens"] / r["generation_s"], 1),
                "full_rewards_equal_one": equal_one.get(method),
            })
    return rows


def _test_reward(trainer) -> float:
    """Mean reward of the current weights on the task's 24 held-out test prompts (greedy)."""
    examples = trainer.task.load("test")
    gens = trainer.engine.generate([trainer.task.messages(e) for e in examples])
    return sum(trainer.task.reward(g.text, e) for g, e in zip(gens, examples)) / len(examples)


def run_quality(steps: int, threads: int, ranks: list[int], n: int, p: int, tokens: int) -> list[dict]:
    from esft.config import ESConfig
    from esft.trainer import ESTrainer

    rows = []
    base_test = None
    for rank in [None, *ranks]:
        with tempfile.TemporaryDirectory() as out:
            cfg = ESConfig(
                model="embedded", task="conciseness", population_size=n, prompts_per_step=p, max_new_tokens=tokens,
                generation_batch_size=p, members_per_batch=n, noise_rank=rank, sigma=2e-3, learning_rate=5e-3,
                max_steps=steps, output_dir=out, disable_tqdm=True, num_threads=threads, logging_steps=0,
            )
            trainer = ESTrainer(args=cfg)
            if base_test is None:
                base_test = _test_reward(trainer)
            t0 = time.perf_counter()
            hist = trainer.train()
            secs = time.perf_counter() - t0
            test = _test_reward(trainer)
        rewards = [h["reward/mean"] for h in hist]
        rows.append({
            "noise": "full-rank" if rank is None else f"low-rank r={rank}", "first": round(rewards[0], 2),
            "last": round(rewards[-1], 2), "best": round(max(rewards), 2),
            "mean_last3": round(sum(rewards[-3:]) / len(rewards[-3:]), 2),
            "drift": round(hist[-1]["drift/norm"], 2), "seconds": round(secs, 1), "curve": [round(r, 2) for r in rewards],
            "test_base": round(base_test, 2), "test_final": round(test, 2),
        })
    return rows


def verify_exactness(threads: int, prompts_n: int = 8, tokens: int = 32) -> dict:
    """Logits of incremental decoding vs one teacher-forced pass over the same tokens."""
    from esft.engine import HFEngine
    from esft.models import load_model
    from esft.tasks import get_task

    torch.set_num_threads(threads)
    model, tok = load_model("embedded", "float32", "cpu")
    task = get_task("conciseness")
    engine = HFEngine(model, tok, tokens, prompts_n)
    prompts = engine.encode([task.messages(e) for e in task.load("train")[:prompts_n]])
    ids, mask = engine._batch_inputs(prompts)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=engine.pad_id,
                             eos_token_id=sorted(engine.eos_ids), output_logits=True, return_dict_in_generate=True)
        incremental = torch.stack(out.logits, 1)
        seq = out.sequences
        full_mask = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
        parallel = model(input_ids=seq, attention_mask=full_mask).logits[:, ids.shape[1] - 1 : -1]
    new = seq[:, ids.shape[1] :]
    alive = torch.ones_like(new, dtype=torch.bool)  # positions up to each completion's end
    for b in range(new.shape[0]):
        ends = [j for j in range(new.shape[1]) if int(new[b, j]) in engine.eos_ids]
        if ends:
            alive[b, ends[0] + 1 :] = False
    diff = (incremental - parallel).abs().amax(-1)[alive]
    agree = (incremental.argmax(-1) == parallel.argmax(-1))[alive]
    return {"positions": int(alive.sum()), "bitwise_equal_logits": int((diff == 0).sum()),
            "max_abs_logit_diff": float(diff.max()), "argmax_agreement": float(agree.float().mean())}


def matmul_floor(workload: str, tokens: int, group: int, steps: int = 8) -> dict:
    """Seconds the decoding matmuls alone take when each member has its own weights.

    Full-rank members cannot share a weight: at P rows per member, every decoded token
    reads each member's whole weight set (all Linear weights and the tied output head;
    538 MB in fp32), `group` distinct sets in turn, which no cache holds. This times
    exactly those matmuls (P rows, one per member, the full path's kernel) for `steps`
    tokens and scales to N members × T tokens: no attention, norms, sampling or
    prefill. It is what full-rank batching cannot remove.
    """
    from esft.models import load_model

    n, p = (int(x) for x in workload.split("x"))
    model, _ = load_model("embedded", "float32", "cpu")
    shapes = [m.weight.shape for m in model.modules() if isinstance(m, torch.nn.Linear)]
    del model
    copies = [[torch.randn(s) for s in shapes] for _ in range(group)]
    xs = {s[1]: torch.randn(p, s[1]) for s in shapes}
    with torch.inference_mode():
        for ws in copies:  # first touch
            for w in ws:
                torch.mm(xs[w.shape[1]], w.t())
        t0 = time.perf_counter()
        for _ in range(steps):
            for ws in copies:
                for w in ws:
                    torch.mm(xs[w.shape[1]], w.t())
        per_member_token = (time.perf_counter() - t0) / (steps * group)
    bytes_ = sum(s.numel() for s in shapes) * 4
    return {"workload": f"{n}x{p}x{tokens}", "matmul_floor_s": round(per_member_token * n * tokens, 2),
            "per_member_token_ms": round(1000 * per_member_token, 2),
            "weight_bytes_per_member_token": bytes_, "GB_per_s": round(bytes_ / per_member_token / 1e9, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="8x8,8x32,30x8,30x32", help="NxP (members x prompts per member)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=1, help="noise_rank of the low-rank rows")
    ap.add_argument("--subset", default="30x32:one=8,30x32:full=12,30x32:full_bmm=12",
                    help="WORKLOAD:METHOD=k: time k members only and extrapolate (comma separated)")
    ap.add_argument("--quality_steps", type=int, default=20)
    ap.add_argument("--quality_ranks", default="1,4")
    ap.add_argument("--quality_shape", default="8x8x24", help="NxPxT of the quality runs")
    ap.add_argument("--verify", action="store_true", help="also test speculative verification for exactness")
    ap.add_argument("--json", default=None, help="also write results here")
    ap.add_argument("--floor_only", action="store_true",
                    help="only time the full-rank matmul floor of each workload (see matmul_floor)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    subset = {}
    for item in filter(None, a.subset.split(",")):
        key, k = item.split("=")
        subset[key] = int(k)
    if a.floor_only:
        floor = []
        for w in filter(None, a.workloads.split(",")):
            floor.append(matmul_floor(w, a.tokens, group=min(4, int(w.split("x")[0]))))
            print(json.dumps(floor[-1]), flush=True)
        if a.json:  # added to the results of a full run, if there is one
            previous = json.load(open(a.json)) if os.path.exists(a.json) else {}
            with open(a.json, "w") as f:
                json.dump({**previous, "matmul_floor": floor}, f, indent=1)
        return
    rows = []
    for w in filter(None, a.workloads.split(",")):
        load_before = os.getloadavg()[0]
        workload_rows = run_workload(w, a.tokens, a.threads, a.rank, subset)
        for r in workload_rows:  # another process on the 2 cores would show here
            r["load_before"], r["load_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
        rows += workload_rows
        print(json.dumps(workload_rows), flush=True)
    print(f"machine: {platform.processor() or platform.machine()}, {a.threads} threads, torch {torch.__version__}")
    head = ["workload (NxPxT)", "method", "passes", "iteration s", "generation s", "ES s", "tokens/s",
            "speed-up vs one", "× ideal", "completions = base"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        mark = " *" if r["extrapolated"] else ""
        base = "" if r["method"] == "ideal" else f"{100 * r['same_as_base']:.0f}%"
        print(f"| {r['workload']} | {r['method']} | {r['passes']} | {r['iteration_s']:.1f}{mark} | {r['generation_s']:.1f} | "
              f"{r['es_s']:.1f} | {r['tokens_per_s']:.0f} | {r['speedup_vs_one']:.2f} | {r['over_ideal']:.2f} | {base} |")
    for r in rows:
        if r["method"] in ("full", "full_bmm"):
            print(f"{r['workload']}: {r['method']} rewards identical to one at a time: {r['full_rewards_equal_one']}")
    quality = []
    if a.quality_steps:
        n, p, t = (int(x) for x in a.quality_shape.split("x"))
        quality = run_quality(a.quality_steps, a.threads, [int(x) for x in a.quality_ranks.split(",")], n, p, t)
        print(f"\nquality: conciseness, {a.quality_steps} iterations, N={n}, {p} prompts, {t} tokens, σ=2e-3, α=5e-3")
        print("| noise | reward it. 1 | final | best | mean of last 3 | test reward base → final | ‖θ−θ₀‖ | seconds |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for q in quality:
            print(f"| {q['noise']} | {q['first']} | {q['last']} | {q['best']} | {q['mean_last3']} | "
                  f"{q['test_base']} → {q['test_final']} | {q['drift']} | {q['seconds']} |")
        for q in quality:
            print(q["noise"], q["curve"])
    verify = None
    if a.verify:
        verify = verify_exactness(a.threads)
        print(f"\nspeculative verification, base model, 8 prompts x 32 tokens: {verify['bitwise_equal_logits']} of "
              f"{verify['positions']} positions have bitwise-equal logits in one pass vs incremental decoding "
              f"(max |Δ| {verify['max_abs_logit_diff']:.2e}); greedy tokens agree at {100 * verify['argmax_agreement']:.1f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"speed": rows, "quality": quality, "verify": verify}, f, indent=1)


if __name__ == "__main__":
    main()
