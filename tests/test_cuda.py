"""The CUDA path, checked on a GPU: exactness, replay, resume, batching and decoding.

Skipped without a GPU (the suite passes on CPU); `make gpu-check` runs them first on a lent
GPU machine. The model is a small random-weight one of a real architecture (`esft.synthetic`),
saved to a folder so that replay and resume can load it by path like any local model; the
task is conciseness (its reward reads any text).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_bitwise_equal

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RUN = dict(task="conciseness", population_size=4, max_train_samples=4, max_new_tokens=8, sigma=0.05,
           learning_rate=0.02, max_steps=3, save_steps=1, seed=7, disable_tqdm=True, device="cuda",
           torch_dtype="bfloat16")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from esft.synthetic import random_model

    out = tmp_path_factory.mktemp("cuda-model") / "tiny"
    model, tokenizer = random_model("tiny", torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _train(out: Path, model_dir: Path, **extra):
    from esft.config import ESConfig
    from esft.trainer import ESTrainer

    trainer = ESTrainer(args=ESConfig(**{**RUN, **extra}, model=str(model_dir), output_dir=str(out)))
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, model_dir) -> Path:
    out = tmp_path_factory.mktemp("cuda") / "run"
    _train(out, model_dir, master_device="device")
    return out


@pytest.mark.parametrize("master_device", ["device", "cpu"])
def test_a_whole_population_leaves_the_master_and_the_bf16_weights_bitwise_unchanged(model_dir, master_device) -> None:
    from esft.engine import HFEngine
    from esft.models import load_model
    from esft.params import WeightState
    from esft.synthetic import random_prompts

    model, tok = load_model(str(model_dir), "bfloat16", "cuda")
    state = WeightState(model, master_device=master_device)
    engine = HFEngine(model, tok, 8, 4)
    before = ({n: m.clone() for n, m in state.items()}, {n: p.data.clone() for n, p in state.named})
    for seed in range(6):
        state.perturb(seed, 1 if seed % 2 else -1, 0.05)
        engine.generate_ids(random_prompts(4, 6, model.config.vocab_size))
        state.restore()
    assert_bitwise_equal(before[0], dict(state.items()), "fp32 masters after a population")
    assert_bitwise_equal(before[1], {n: p.data for n, p in state.named}, "bf16 weights after a population")


def test_replay_equals_the_checkpoint_bitwise(cuda_run) -> None:
    from esft.seedlog import load_checkpoint_tensors, replay

    state, _ = replay(cuda_run, 3, device="cuda")
    final = load_checkpoint_tensors(cuda_run / "final")
    assert_bitwise_equal({n: t.cpu() for n, t in state.items()}, final, "CUDA replay vs checkpoint")


def test_a_host_master_equals_a_device_master_bitwise(tmp_path, cuda_run, model_dir) -> None:
    from esft.seedlog import SEEDLOG, load_checkpoint_tensors

    trainer = _train(tmp_path / "host", model_dir, master_device="cpu")
    assert trainer.state.host_master
    assert (tmp_path / "host" / SEEDLOG).read_bytes() == (cuda_run / SEEDLOG).read_bytes()
    assert_bitwise_equal(load_checkpoint_tensors(tmp_path / "host" / "final"), load_checkpoint_tensors(cuda_run / "final"),
                         "host vs device master")


def test_kill_9_and_resume_end_bitwise_equal(tmp_path, cuda_run, model_dir) -> None:
    from esft.seedlog import SEEDLOG, load_checkpoint_tensors

    out = tmp_path / "killed"
    args = [a for k, v in {**RUN, "model": str(model_dir), "output_dir": str(out)}.items()
            for a in ([f"--{k}"] if v is True else [f"--{k}", str(v)])]
    proc = subprocess.Popen([sys.executable, "-m", "esft.cli", "train", *args])
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / SEEDLOG).exists() and len((out / SEEDLOG).read_text().splitlines()) >= 1:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run([sys.executable, "-m", "esft.cli", "train", *args, "--resume"], timeout=600)
    assert done.returncode == 0
    assert (out / SEEDLOG).read_bytes() == (cuda_run / SEEDLOG).read_bytes()
    assert_bitwise_equal(load_checkpoint_tensors(out / "final"), load_checkpoint_tensors(cuda_run / "final"), "resumed")


def test_batched_members_score_the_rewards_they_score_one_at_a_time(tmp_path, cuda_run, model_dir) -> None:
    from esft.io import read_jsonl

    _train(tmp_path / "bmm", model_dir, master_device="device", members_per_batch=4)
    one = [r["rewards"] for r in read_jsonl(cuda_run / "seedlog.jsonl")]
    batched = [r["rewards"] for r in read_jsonl(tmp_path / "bmm" / "seedlog.jsonl")]
    assert batched == one


def test_low_rank_replay_equals_the_checkpoint(tmp_path, model_dir) -> None:
    from esft.seedlog import load_checkpoint_tensors, replay

    _train(tmp_path / "lr", model_dir, noise_rank=1, members_per_batch=4)
    state, _ = replay(tmp_path / "lr", 3, device="cuda")
    assert_bitwise_equal({n: t.cpu() for n, t in state.items()}, load_checkpoint_tensors(tmp_path / "lr" / "final"),
                         "low-rank CUDA replay")


def test_static_cache_and_compiled_decoding_give_the_dynamic_caches_tokens(model_dir) -> None:
    from esft.engine import HFEngine
    from esft.models import load_model
    from esft.synthetic import random_prompts

    model, tok = load_model(str(model_dir), "bfloat16", "cuda")
    prompts = random_prompts(8, 12, model.config.vocab_size)
    dynamic = HFEngine(model, tok, 16, 8, static_cache=False, compile=False).generate_ids(prompts)
    static = HFEngine(model, tok, 16, 8, static_cache=True, compile=False).generate_ids(prompts)
    compiled = HFEngine(model, tok, 16, 8, static_cache=True, compile=True).generate_ids(prompts)
    assert [g.text for g in static] == [g.text for g in dynamic]
    assert [g.text for g in compiled] == [g.text for g in dynamic]


NOISE = """
import sys, torch
from esft.noise import fill_noise
from esft.params import tensors_checksum
out = torch.empty(4096, 33, device="cuda")
print(tensors_checksum([("t", fill_noise(out, int(sys.argv[1]), "model.layers.0.mlp.up_proj.weight"))]))
"""


def test_noise_is_the_same_in_another_process() -> None:
    runs = [subprocess.run([sys.executable, "-c", NOISE, "12345"], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1] and runs[0].strip()
    other = subprocess.run([sys.executable, "-c", NOISE, "12346"], capture_output=True, text=True, check=True).stdout
    assert other != runs[0]


def test_gpu_memory_per_weight_is_4_bytes_with_a_host_master(model_dir) -> None:
    from esft.models import load_model
    from esft.params import WeightState

    model, _ = load_model(str(model_dir), "bfloat16", "cuda")
    state = WeightState(model, master_device="cpu")
    state.perturb(1, 1, 0.05)
    state.restore()
    mem = state.memory()
    assert mem["device_state_bytes_per_weight"] == 4.0, json.dumps(mem)
