"""The `esft` command: train, replay, quickstart.

`esft train` flags are generated from ESConfig (TRL style), so flags, YAML keys and the
config docstring never disagree.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

USAGE = """usage: esft <command> [options]

commands:
  train       fine-tune with ES (+AWD); flags are ESConfig fields, --config file.yaml
  replay      rebuild the weights of any iteration from a run's seed log
  eval        task accuracy of a model, or of a run over its iterations (forgetting)
  kl          KL(p_base || p_iteration) on task prompts
  drift       weight drift ||θ − θ₀|| per layer and module type
  report      tables and figures comparing runs
  grpo        GRPO baseline (TRL's GRPOTrainer) on the same tasks; flags are GRPOConfig fields
  sweep       a grid of runs from one YAML spec, then eval, KL, drift and one report (resumable)
  quickstart  ES vs ES+AWD on the embedded model, with a report and a plot

`esft <command> --help` lists a command's options."""


def parse_train_args(argv: list[str]):
    """ESConfig from `--config file.yaml` (optional) and flags, flags winning."""
    from esft.config import ESConfig
    from esft.flags import config_file_values, dataclass_parser, field_names, parse_dataclass_flags

    parser = dataclass_parser([ESConfig], "esft train", "Fine-tune a causal LM with Evolution Strategies.")
    cfg, _ = parse_dataclass_flags(parser, argv, config_file_values(argv, field_names([ESConfig])))
    return cfg


def cmd_train(argv: list[str]) -> int:
    from esft.trainer import ESTrainer

    cfg = parse_train_args(argv)
    trainer = ESTrainer(args=cfg)
    history = trainer.train()
    if history:
        last = history[-1]
        print(
            f"done: {trainer.iteration} iterations, final reward mean {last['reward/mean']:.4g}, "
            f"drift {last['drift/norm']:.4g}; model in {trainer.run_dir / 'final'}"
        )
    return 0


def cmd_replay(argv: list[str]) -> int:
    from esft.io import check_replaceable
    from esft.runlock import writing_into
    from esft.seedlog import replay, save_hf_dir

    p = argparse.ArgumentParser(prog="esft replay", description="Rebuild the weights after iteration K from the seed log.")
    p.add_argument("run_dir")
    p.add_argument("--iteration", type=int, required=True, help="K (0 = the base model)")
    p.add_argument("--output", required=True, help="HF directory to write")
    p.add_argument("--device", default="auto")
    p.add_argument("--use_checkpoints", action="store_true",
                   help="start from the latest good checkpoint instead of replaying every record from the base")
    a = p.parse_args(argv)
    check_replaceable(a.output)  # before the replay: never overwrite a run or a folder of the user's
    with writing_into(a.run_dir, a.output, "replay"):  # into the run: one writer at a time
        state, tokenizer = replay(a.run_dir, a.iteration, device=a.device, use_checkpoints=a.use_checkpoints)
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        save_hf_dir(a.output, state, tokenizer, {"iteration": a.iteration, "replayed_from": str(a.run_dir)})
    print(f"weights after iteration {a.iteration} written to {a.output}")
    return 0


def cmd_quickstart(argv: list[str]) -> int:
    from esft.quickstart import parse_args, run_quickstart

    cfg, extra = parse_args(argv)
    run_quickstart(cfg, extra)
    return 0


def cmd_eval(argv: list[str]) -> int:
    from esft.evaluation import accuracy
    from esft.flags import int_list, name_list

    p = argparse.ArgumentParser(prog="esft eval", description="Accuracy under the paper's extraction rules.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="'embedded', a hub id or an HF directory")
    src.add_argument("--run", help="a run directory: evaluate its iterations (forgetting over training)")
    p.add_argument("--tasks", type=name_list, required=True, help="comma-separated task names")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each eval set")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--every", type=int, default=None, help="--run: iterations 0, K, 2K, ..., last")
    p.add_argument("--iterations", type=int_list, default=None, help="--run: explicit comma-separated iterations")
    p.add_argument("--output", default=None, help="output folder (--run default: RUN_DIR/eval)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--num_fewshot", type=int, default=None, help="mmlu_pro worked examples (validation split)")
    p.add_argument("--dataset", default=None,
                   help="data of a module:function task (a file or hub id with a 'prompt' column; --run: the run's own)")
    p.add_argument("--reward_timeout", type=float, default=None,
                   help="seconds per call of a module:function reward (default: the run's, else 60; 0: no limit)")
    p.add_argument("--harness", choices=["lm-eval"], default=None,
                   help="score with lm-evaluation-harness (log-likelihood multiple choice, acc/acc_norm) instead")
    p.add_argument("--device", default="auto")
    p.add_argument("--torch_dtype", default="auto")
    a = p.parse_args(argv)
    tasks = a.tasks
    if a.harness:
        return _eval_harness(p, a)
    for flag in ("every", "limit", "max_new_tokens", "batch_size"):
        value = getattr(a, flag)
        if value is not None and value < 1:
            p.error(f"--{flag} must be >= 1 (got {value})")
    if a.reward_timeout is not None and not a.reward_timeout >= 0:
        p.error(f"--reward_timeout must be >= 0 (got {a.reward_timeout})")
    if a.run:
        rows = accuracy.evaluate_run(a.run, tasks, a.every, a.iterations, a.limit, a.max_new_tokens,
                                     a.batch_size, a.output, a.data_dir, a.device, num_fewshot=a.num_fewshot,
                                     dataset=a.dataset, reward_timeout=a.reward_timeout)
        print(accuracy.format_forgetting_table(rows))
        print(f"rows: {Path(a.output or Path(a.run) / 'eval') / accuracy.FORGETTING_FILE}")
        return 0
    if not a.output:
        p.error("--output is required with --model")
    from esft.models import load_model
    from esft.rewards import RewardGuard
    from esft.runlock import run_lock

    task_objs = accuracy.load_tasks(tasks, a.data_dir, a.num_fewshot, a.dataset)
    timeout = 60.0 if a.reward_timeout is None else a.reward_timeout
    with run_lock(a.output, "evaluation"), RewardGuard(timeout) as guard:
        for task in task_objs:
            guard.prepare(task)  # user rewards' workers start before the model loads
        model, tokenizer = load_model(a.model, a.torch_dtype, a.device)
        results = accuracy.evaluate_model(model, tokenizer, task_objs, a.limit, a.max_new_tokens, a.batch_size,
                                          samples_dir=Path(a.output) / "samples", guard=guard)
        path = accuracy.write_results(results, a.output, {"model": a.model, "limit": a.limit,
                                                          "max_new_tokens": a.max_new_tokens})
    print(accuracy.format_results_table(results))
    print(f"results: {path}")
    return 0


def _eval_harness(p: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    """`esft eval --harness lm-eval`: the same model or run iterations, lm-eval's protocol."""
    from esft.evaluation import harness

    harness.require_lm_eval()
    harness.harness_tasks(a.tasks)  # a task without a formulation fails before any model loads
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit must be >= 1 (got {a.limit})")
    if a.run:
        rows = harness.evaluate_run(a.run, a.tasks, a.every, a.iterations, a.limit, a.batch_size, a.output,
                                    a.data_dir, a.device)
        print(harness.format_table(rows))
        print(f"rows: {Path(a.output or Path(a.run) / 'eval') / harness.HARNESS_FILE}")
        return 0
    if not a.output:
        p.error("--output is required with --model")
    from esft.io import append_jsonl
    from esft.models import load_model
    from esft.runlock import run_lock

    with run_lock(a.output, "evaluation"):
        for name in a.tasks:  # data files are checked before the model loads
            harness.write_documents(name, Path(a.output) / "harness_documents", a.limit, a.data_dir)
        model, tokenizer = load_model(a.model, a.torch_dtype, a.device)
        results = harness.evaluate_model(model, tokenizer, a.tasks, a.limit, a.batch_size, a.data_dir, a.output)
        path = Path(a.output) / harness.HARNESS_FILE
        for r in results:
            append_jsonl(path, {"model": a.model, **harness.harness_row(0, r, a.limit)})
    print(harness.format_table(results))
    print(f"rows: {path}")
    return 0


def _delegate(module: str):
    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(module).main(argv)

    return run


COMMANDS = {
    "train": cmd_train,
    "replay": cmd_replay,
    "eval": cmd_eval,
    "kl": _delegate("esft.evaluation.kl"),
    "drift": _delegate("esft.evaluation.drift"),
    "report": _delegate("esft.report.runs"),
    "grpo": _delegate("esft.grpo"),
    "sweep": _delegate("esft.sweep"),
    "quickstart": cmd_quickstart,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"esft: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd](rest)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, ConnectionError) as e:
        # Bad input, a missing optional extra or an unreachable cluster: one clear line, no traceback.
        print(f"esft {cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk (DiskFullError names the file and the fix), a permission, ...
        where = f" ({e.filename})" if e.filename and str(e.filename) not in str(e) else ""
        print(f"esft {cmd}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
