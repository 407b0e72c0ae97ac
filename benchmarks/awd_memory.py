"""Peak resident memory of ES training with and without Anchored Weight Decay.

Each setting runs in a fresh process (a few full-model iterations on the embedded model)
and reports its peak RSS (ru_maxrss). θ₀ is streamed from a memory-mapped file one tensor
at a time, so AWD should add well under 10%.

    python benchmarks/awd_memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, torch
from esft.config import ESConfig
from esft.trainer import ESTrainer
awd, out = sys.argv[1], sys.argv[2]
cfg = ESConfig(model="embedded", task="conciseness", population_size=4, prompts_per_step=4,
               max_new_tokens=8, max_steps=3, awd=awd, output_dir=out, disable_tqdm=True,
               num_threads=2, logging_steps=0)
ESTrainer(args=cfg).train()
print(json.dumps({"awd": awd, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(awd: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        r = subprocess.run([sys.executable, "-c", CHILD, awd, out + "/run"], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--penalties", default="none,l2,l1")
    a = ap.parse_args()
    rows = [measure(p) for p in a.penalties.split(",")]
    base = rows[0]["peak_rss_mib"]
    print("| --awd | peak RSS (MiB) | vs none |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['awd']} | {r['peak_rss_mib']:.0f} | {100 * (r['peak_rss_mib'] / base - 1):+.1f}% |")


if __name__ == "__main__":
    main()
