"""`make gpu-check DEVICE=cpu`: the GPU check's own code, run on a tiny model, so that it works
the day a GPU machine is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_dry_run_writes_every_row(tmp_path) -> None:
    out = tmp_path / "gpu-cpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for row in ("cuda_tests", "generate", "es_iteration", "memory", "grpo_step"):
        assert row in result and "error" not in result[row], f"{row}: {result.get(row)}"
    assert result["cuda_tests"]["skipped"] >= 8 and result["cuda_tests"].get("failed", 0) == 0
    es = result["es_iteration"]["prompts2"]
    assert {"ideal_s", "one_at_a_time", "bmm", "lowrank_r1", "bmm_speedup_vs_one_at_a_time"} <= set(es)
    memory = result["memory"]
    assert memory["master_cpu/awd_none"]["device_state_bytes_per_weight"] == 4.0, "bf16 weights + work buffer"
    assert memory["master_device/awd_none"]["device_state_bytes_per_weight"] == 8.0, "... + the fp32 master"
    assert (out.with_suffix(".md")).read_text().startswith("GPU check on ")
