"""The GPU check: the CUDA tests, then every speed and memory row of the CUDA path, in one pass.

A GPU machine is lent for minutes, has torch and transformers but no hub, and takes 64 MiB
of upload: so the models are random-weight ones of real architectures (`esft.synthetic`:
Qwen2.5-1.5B, Llama-3.2-1B) and every generation runs a fixed number of tokens. In order:

1. `pytest -m cuda` (tests/test_cuda.py): exactness, replay, resume, batching, decoding;
2. tokens/s of plain `generate` (dynamic cache) against the static-cache, compiled path, at
   batch 32 and 256;
3. one ES iteration (N=30; 32 and 200 prompts per member; 256 new tokens): one member at a
   time (with the master on the device, and on the host: its cost), `bmm`-batched members,
   low-rank r=1, against the ideal, plain batched generation of the same number of tokens;
   the bookkeeping (perturb, restore, update) of each;
4. peak GPU memory per trained weight (`torch.cuda.max_memory_allocated`) with the master on
   the device and on the host, with and without AWD, beside `WeightState.memory()`'s account;
5. one TRL GRPO step on the same model, for scale;
6. the device, driver, CUDA, torch and transformers versions.

Rows past `--budget_s` are skipped and marked so. Writes `benchmarks/results/gpu-<device>.json`
and a markdown table beside it. `--device cpu` runs the same code on a tiny model in well
under a minute (a test runs it, so it cannot rot before a GPU is lent).

    make gpu-check                 # python benchmarks/gpu_check.py --device cuda
    make gpu-check DEVICE=cpu      # the dry run
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))  # a lent GPU machine has the tree, not an installed esft

#: Sizes per device: the issue's for CUDA, a few tokens for the CPU dry run.
SIZES = {
    "cuda": {"es_model": "qwen2.5-1.5b", "gen_models": ["qwen2.5-1.5b", "llama-3.2-1b"], "gen_batches": [32, 256],
             "prompt_len": 64, "new_tokens": 256, "population": 30, "es_prompts": [32, 200], "dtype": torch.bfloat16,
             "grpo_generations": 8, "grpo_batch": 16},
    "cpu": {"es_model": "tiny", "gen_models": ["tiny"], "gen_batches": [2, 4], "prompt_len": 8, "new_tokens": 4,
            "population": 2, "es_prompts": [2], "dtype": torch.bfloat16, "grpo_generations": 2, "grpo_batch": 2},
}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def run(self, rows: dict[str, Any], name: str, fn: Any) -> None:
        if self.left() <= 0:
            rows[name] = {"skipped": "budget"}
            return
        t0 = time.perf_counter()
        try:
            rows[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
        rows[name]["seconds"] = round(time.perf_counter() - t0, 2)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def versions(device: str) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version(), "machine": platform.machine()}
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["device"] = platform.processor() or "cpu"
    return info


def cuda_tests() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_cuda.py")], capture_output=True, text=True, cwd=ROOT)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    return {"returncode": proc.returncode, "summary": summary, **counts,
            "failures": [ln for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]}


def generate_rows(s: dict[str, Any], device: str) -> dict[str, Any]:
    from esft.engine import HFEngine
    from esft.synthetic import random_model, random_prompts

    out = {}
    for name in s["gen_models"]:
        model, tok = random_model(name, s["dtype"], device, new_tokens=s["new_tokens"])
        for batch in s["gen_batches"]:
            prompts = random_prompts(batch, s["prompt_len"], model.config.vocab_size)
            for label, static in (("dynamic", False), ("static_compiled", True)):
                engine = HFEngine(model, tok, s["new_tokens"], batch, static_cache=static, compile=static)
                engine.generate_ids(prompts)  # warm-up (and compilation)
                _sync(device)
                t0 = time.perf_counter()
                gens = engine.generate_ids(prompts)
                _sync(device)
                dt = time.perf_counter() - t0
                out[f"{name}/batch{batch}/{label}"] = {"tokens_per_s": sum(g.num_tokens for g in gens) / dt, "s": dt}
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


class _LengthTask:
    """A bounded built-in-style reward (no worker process): the completion's length."""

    name = "length"

    def rewards(self, completions: list[str], examples: list[Any]) -> list[float]:
        return [float(len(c)) for c in completions]

    def reward(self, completion: str, example: Any) -> float:
        return float(len(completion))


def es_rows(s: dict[str, Any], device: str) -> dict[str, Any]:
    from esft import es
    from esft.config import ESConfig
    from esft.engine import HFEngine
    from esft.params import WeightState
    from esft.population import LocalPopulation
    from esft.synthetic import random_model, random_prompts

    model, tok = random_model(s["es_model"], s["dtype"], device, new_tokens=s["new_tokens"])
    out: dict[str, Any] = {}
    n = s["population"]
    for n_prompts in s["es_prompts"]:
        prompts = random_prompts(n_prompts, s["prompt_len"], model.config.vocab_size)
        examples = [{}] * n_prompts
        engine = HFEngine(model, tok, s["new_tokens"], n_prompts)
        engine.generate_ids(prompts)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        engine.generate_ids([p for _ in range(n) for p in prompts])  # the same tokens, no perturbation
        _sync(device)
        ideal = time.perf_counter() - t0
        row: dict[str, Any] = {"ideal_s": ideal}
        arms = (("one_at_a_time", {"master_device": "device"}), ("one_at_a_time_host_master", {"master_device": "cpu"}),
                ("bmm", {"members_per_batch": n}), ("lowrank_r1", {"members_per_batch": n, "noise_rank": 1}))
        for label, extra in arms:
            cfg = ESConfig(population_size=n, max_new_tokens=s["new_tokens"], generation_batch_size=n_prompts,
                           sigma=1e-3, disable_tqdm=True, device=device, **extra)
            state = WeightState.from_config(model, cfg)
            pop = LocalPopulation(cfg, state, engine, _LengthTask(), examples, prompts)
            plan = es.plan_iteration(0, 1, n, False, n_prompts, None, pop.max_group())
            pop.score(plan)  # warm-up: buffers, batcher planning
            _sync(device)
            t0 = time.perf_counter()
            res = pop.score(plan)
            coeffs = es.coefficients(res.rewards, False) or [1.0] * n
            t1 = time.perf_counter()
            state.apply_update(plan.seeds, coeffs, 0.0)  # scale 0: timed, leaves the weights as they are
            _sync(device)
            t_update = time.perf_counter() - t1
            total = time.perf_counter() - t0
            row[label] = {"s": total, "vs_ideal": total / ideal, "perturb_restore_s": res.stats["perturb_restore"],
                          "update_s": t_update, "bookkeeping_share": (res.stats["perturb_restore"] + t_update) / total}
            del pop, state
            if device == "cuda":
                torch.cuda.empty_cache()
        row["bmm_speedup_vs_one_at_a_time"] = row["one_at_a_time"]["s"] / row["bmm"]["s"]
        row["host_master_cost"] = row["one_at_a_time_host_master"]["s"] / row["one_at_a_time"]["s"] - 1
        out[f"prompts{n_prompts}"] = row
    return out


def memory_rows(s: dict[str, Any], device: str) -> dict[str, Any]:
    from esft.anchor import AnchorFile, anchor_and_drift
    from esft.params import WeightState
    from esft.synthetic import random_model

    out = {}
    for master_device in ("device", "cpu"):
        for awd in ("none", "l2"):
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            model, _ = random_model(s["es_model"], s["dtype"], device)
            state = WeightState(model, master_device=master_device)
            state.perturb(1, 1, 1e-3)
            state.restore()
            state.apply_update([1, 2], [1.0, -1.0], 1e-4)
            if awd == "l2":
                with tempfile.TemporaryDirectory() as tmp:
                    anchor = AnchorFile.write(Path(tmp) / "theta0.safetensors", state.items())
                    anchor_and_drift(state.items(), anchor, "l2", 0.01)
                    state.sync_rest()
            row: dict[str, Any] = dict(state.memory())
            if device == "cuda":
                row["peak_gpu_bytes_per_weight"] = torch.cuda.max_memory_allocated() / state.num_parameters
            out[f"master_{master_device}/awd_{awd}"] = row
            del state, model
    return out


def grpo_row(s: dict[str, Any], device: str) -> dict[str, Any]:
    from esft.grpo import grpo_args_from_mapping, require_trl, run_grpo
    from esft.synthetic import random_model

    require_trl()
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = random_model(s["es_model"], torch.float32)
        model.save_pretrained(Path(tmp) / "model")
        tok.save_pretrained(Path(tmp) / "model")
        del model
        run, cfg = grpo_args_from_mapping({
            "model": str(Path(tmp) / "model"), "task": "conciseness", "max_train_samples": 8, "max_steps": 2,
            "per_device_train_batch_size": s["grpo_batch"], "num_generations": s["grpo_generations"],
            "max_completion_length": s["new_tokens"], "output_dir": str(Path(tmp) / "grpo"), "save_steps": 100,
            "disable_tqdm": True, **({"use_cpu": True} if device == "cpu" else {"bf16": True}),
        })
        t0 = time.perf_counter()
        trainer = run_grpo(run, cfg)
        return {"steps": int(trainer.state.global_step), "s_per_step": (time.perf_counter() - t0) / 2}


def markdown(result: dict[str, Any]) -> str:
    v = result["versions"]
    lines = [f"GPU check on {v.get('device')} (driver {v.get('driver', '–')}, CUDA {v.get('cuda', '–')}, torch "
             f"{v['torch']}, transformers {v['transformers']}), {result['date']}, {result['seconds']:.0f} s", ""]
    t = result.get("cuda_tests", {})
    lines += [f"CUDA tests: {t.get('summary', '–')}", "", "| generate | tokens/s | s |", "|---|---:|---:|"]
    for k, r in sorted(result.get("generate", {}).items()):
        if isinstance(r, dict) and "tokens_per_s" in r:
            lines.append(f"| {k} | {r['tokens_per_s']:.0f} | {r['s']:.2f} |")
    lines += ["", "| ES iteration | s | × ideal | bookkeeping |", "|---|---:|---:|---:|"]
    for k, r in sorted(result.get("es_iteration", {}).items()):
        if isinstance(r, dict) and "ideal_s" in r:
            lines.append(f"| {k}, ideal (plain batched generation) | {r['ideal_s']:.2f} | 1.00 | – |")
            for label in ("one_at_a_time", "one_at_a_time_host_master", "bmm", "lowrank_r1"):
                x = r[label]
                lines.append(f"| {k}, {label} | {x['s']:.2f} | {x['vs_ideal']:.2f} | {100 * x['bookkeeping_share']:.1f}% |")
            lines.append(f"| {k}, bmm speed-up over one at a time | {r['bmm_speedup_vs_one_at_a_time']:.2f}× | | |")
            lines.append(f"| {k}, host master's cost over the device master | {100 * r['host_master_cost']:+.1f}% | | |")
    lines += ["", "| memory | device state B/weight | peak GPU B/weight |", "|---|---:|---:|"]
    for k, r in sorted(result.get("memory", {}).items()):
        if isinstance(r, dict) and "device_state_bytes_per_weight" in r:
            peak = r.get("peak_gpu_bytes_per_weight")
            lines.append(f"| {k} | {r['device_state_bytes_per_weight']:.2f} | {'–' if peak is None else f'{peak:.2f}'} |")
    g = result.get("grpo_step", {})
    if "s_per_step" in g:
        lines += ["", f"TRL GRPO on the same model: {g['s_per_step']:.2f} s per step."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/gpu-<device>.json)")
    ap.add_argument("--budget_s", type=float, default=480.0, help="rows past this many seconds are skipped")
    ap.add_argument("--skip_tests", action="store_true")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run `make gpu-check DEVICE=cpu` for the dry run", file=sys.stderr)
        return 2
    s = SIZES[a.device]
    budget = Budget(a.budget_s)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "versions": versions(a.device),
                              "sizes": {k: str(v) for k, v in s.items()}}
    if not a.skip_tests:
        budget.run(result, "cuda_tests", cuda_tests)
    budget.run(result, "generate", lambda: generate_rows(s, a.device))
    budget.run(result, "es_iteration", lambda: es_rows(s, a.device))
    budget.run(result, "memory", lambda: memory_rows(s, a.device))
    budget.run(result, "grpo_step", lambda: grpo_row(s, a.device))
    result["seconds"] = time.perf_counter() - budget.start
    out = Path(a.out) if a.out else HERE / "results" / f"gpu-{a.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
