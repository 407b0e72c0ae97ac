"""benchmarks/keep_records.py: a record keeps the small files of a finished run (and none of
its weights), skips an unfinished run, and reads back through paper_claims.load exactly as
the run directory does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import keep_records  # noqa: E402
import paper_claims  # noqa: E402


def write_run(root: Path, name: str, finished: bool = True) -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "final").mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "conciseness", "seed": 1, "population_size": 8,
                                                      "learning_rate": 0.005, "max_steps": 2}))
    (run / "seedlog.jsonl").write_text('{"iteration": 1, "seeds": [3, 4]}\n')
    (run / "metrics.jsonl").write_text("".join(json.dumps({"iteration": k, "drift/norm": 1.5 * k,
                                                           "params/trainable": 10}) + "\n" for k in (1, 2)))
    (run / "drift.json").write_text(json.dumps([{"iteration": 2, "global": {"norm": 3.0}}]))
    (run / "auto_lambda.json").write_text(json.dumps({"chosen_lambda": 5.0}))
    (run / "theta0.safetensors").write_bytes(b"\0" * 1024)
    (run / "final" / "model.safetensors").write_bytes(b"\0" * 1024)
    if finished:
        rows = [{"iteration": k, "task": "conciseness", "n": 3, "accuracy": 0.0, "rewards": [-9.0 + k, -8.0, -7.0]}
                for k in (0, 2)]
        (run / "eval" / "forgetting.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "kl.json").write_text(json.dumps([{"iteration": 2, "task": "piqa", "kl_exact_token": 0.25}]))
    return run


def test_keeps_the_small_files_of_finished_runs_only(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_run(sweep, "seed1")
    write_run(sweep, "seed2", finished=False)
    (sweep / "report").mkdir()
    kept = keep_records.keep(sweep, tmp_path / "records")
    assert kept == ["seed1"]
    files = sorted(str(p.relative_to(tmp_path / "records")) for p in (tmp_path / "records").rglob("*") if p.is_file())
    assert files == sorted(f"seed1/{name}" for name in keep_records.KEPT)
    for name in keep_records.KEPT:
        assert (tmp_path / "records" / "seed1" / name).read_bytes() == (sweep / "seed1" / name).read_bytes()


def test_a_record_reads_as_its_run(tmp_path: Path) -> None:
    run = write_run(tmp_path / "sweep", "seed1")
    keep_records.keep(tmp_path / "sweep", tmp_path / "records")
    from_run, from_record = paper_claims.load(run), paper_claims.load(tmp_path / "records" / "seed1")
    assert from_record == from_run
    assert from_record["drift"] == {1: 1.5, 2: 3.0} and from_record["kl"] == {"piqa": 0.25}
    assert paper_claims.target_rewards(from_record) == ([-9.0, -8.0, -7.0], [-7.0, -8.0, -7.0])


def test_over_seeds_joins_records_and_new_runs_with_a_t_interval(tmp_path: Path) -> None:
    """Seed 1 kept from an earlier session, seeds 2 and 3 trained now (seed 4 still training):
    one setting, three seeds, whose gain interval is mean ± t(0.975, 2)·s/√3 on the three runs' own gains."""
    write_run(tmp_path / "sweep", "seed1")
    keep_records.keep(tmp_path / "sweep", tmp_path / "records")
    runs = {"seed1": paper_claims.load(tmp_path / "records" / "seed1")}
    for seed, shift in ((2, 4.0), (3, -1.0)):
        run = write_run(tmp_path / "now", f"seed{seed}")
        config = yaml.safe_load((run / "config.yaml").read_text())
        (run / "config.yaml").write_text(yaml.safe_dump({**config, "seed": seed}))
        rows = [json.loads(line) for line in (run / "eval" / "forgetting.jsonl").read_text().splitlines()]
        rows[1]["rewards"] = [r + shift for r in rows[1]["rewards"]]
        (run / "eval" / "forgetting.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[run.name] = paper_claims.load(run)
    unfinished = write_run(tmp_path / "now", "seed4", finished=False)
    (unfinished / "config.yaml").write_text(yaml.safe_dump({**config, "seed": 4}))
    runs["seed4"] = paper_claims.load(unfinished)  # still training: left out, not counted as a seed
    (row,) = paper_claims.over_seeds(runs)
    gains = [2 / 3, 2 / 3 + 4.0, 2 / 3 - 1.0]  # seed 1: only the first example moved, by +2
    mean = sum(gains) / 3
    sd = (sum((g - mean) ** 2 for g in gains) / 2) ** 0.5
    half = 4.302652729911275 * sd / 3**0.5  # t(0.975, 2)
    assert row["seeds"] == [1, 2, 3] and row["gain"]["values"] == pytest.approx(gains)
    assert row["gain"]["mean"] == pytest.approx(mean)
    assert (row["gain"]["lo"], row["gain"]["hi"]) == pytest.approx((mean - half, mean + half))


def test_a_sweep_without_kl_keeps_its_evaluated_runs(tmp_path: Path) -> None:
    """The style-task sweep measures no KL: with kl=False an evaluated run counts as finished,
    while the default still waits for kl.json."""
    run = write_run(tmp_path / "sweep", "verbosity")
    (run / "kl.json").unlink()
    assert keep_records.keep(tmp_path / "sweep", tmp_path / "records") == []
    assert keep_records.keep(tmp_path / "sweep", tmp_path / "records", kl=False) == ["verbosity"]
    assert not (tmp_path / "records" / "verbosity" / "kl.json").exists()
