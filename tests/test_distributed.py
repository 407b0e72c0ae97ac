"""Ray scale-out on a local cluster: same seed log and same bits as in-process, lost actors replaced."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, assert_bitwise_equal, tiny_cli_args

from esft.callbacks import TrainerCallback
from esft.config import ESConfig
from esft.seedlog import SEEDLOG, load_checkpoint_tensors
from esft.trainer import ESTrainer

ray = pytest.importorskip("ray")
from esft import distributed  # noqa: E402
from esft.distributed import WorkerDivergedError, WorkersLostError  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_cluster(embedded_dir):
    """One local Ray cluster for the module (starting one costs ~15 s); 2 CPUs as on CI."""
    env = {k: os.environ[k] for k in distributed.FORWARDED_ENV if k in os.environ}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env} if env else None)
    yield
    ray.shutdown()


def ray_config(out: Path, **overrides) -> ESConfig:
    return ESConfig(**{**TINY, "workers": 2, "sync_check_steps": 1, **overrides}, output_dir=str(out))


class PopulationHook(TrainerCallback):
    """Calls `hook(population, iteration, member_result)` after every member's reward."""

    def __init__(self, hook) -> None:
        self.hook = hook

    def on_train_begin(self, trainer) -> None:
        trainer.population.hooks.append(self.hook)


def final_weights(run: Path):
    return load_checkpoint_tensors(run / "final")


def test_two_actors_reproduce_the_in_process_run_bitwise(tmp_path, reference_run) -> None:
    trainer = ESTrainer(args=ray_config(tmp_path / "ray"))
    history = trainer.train()
    assert (tmp_path / "ray" / SEEDLOG).read_bytes() == (reference_run / SEEDLOG).read_bytes()
    assert_bitwise_equal(final_weights(tmp_path / "ray"), final_weights(reference_run), "2 Ray actors vs in-process")
    last = history[-1]
    # Both actors took members (dynamic scheduling) and reported their throughput.
    assert {"workers/worker-0/members_per_s", "workers/worker-1/members_per_s"} <= set(last)
    assert last["workers/worker-0/tokens_per_s"] > 0 and last["workers/worker-0/idle_s"] >= 0
    # What travels per iteration: a few hundred bytes for N=4, independent of the 135M weights.
    assert 0 < last["wire/member_bytes"] < 2000 and 0 < last["wire/update_bytes"] < 2000
    assert last["workers/failures"] == 0


def test_actors_evaluate_batched_member_groups_with_the_same_bits(tmp_path, reference_run) -> None:
    history = ESTrainer(args=ray_config(tmp_path / "ray", members_per_batch=2)).train()
    # Full-rank batched members score bitwise as one at a time on CPU, so the run is the reference.
    assert (tmp_path / "ray" / SEEDLOG).read_bytes() == (reference_run / SEEDLOG).read_bytes()
    assert_bitwise_equal(final_weights(tmp_path / "ray"), final_weights(reference_run), "batched groups on 2 actors")
    assert history[-1]["wire/member_bytes"] > 0


def test_a_killed_actor_is_replaced_and_the_run_ends_bitwise_equal(tmp_path, awd_run) -> None:
    killed: list[int] = []

    def kill_mid_iteration(pop, iteration, result) -> None:
        # After iteration 2's first reward, kill the actor that still holds a member.
        if iteration == 2 and not killed:
            victim = pop.workers["worker-0"]
            killed.append(victim.info["pid"])
            os.kill(victim.info["pid"], signal.SIGKILL)

    trainer = ESTrainer(args=ray_config(tmp_path / "ray", awd="l2", awd_lambda=10.0), callbacks=[PopulationHook(kill_mid_iteration)])
    history = trainer.train()
    assert killed, "the hook never fired"
    assert_bitwise_equal(final_weights(tmp_path / "ray"), final_weights(awd_run), "run with a killed actor vs uninterrupted")
    assert (tmp_path / "ray" / SEEDLOG).read_bytes() == (awd_run / SEEDLOG).read_bytes()
    it2 = history[1]
    assert it2["workers/failures"] == 1 and it2["workers/restarts"] == 1
    assert history[-1]["workers/live"] == 2, "the replacement joined the pool"


def test_sync_check_names_a_corrupted_actor(tmp_path) -> None:
    done: list[bool] = []

    def corrupt(pop, iteration, result) -> None:
        if iteration == 2 and not done:
            done.append(True)
            victim = pop.workers["worker-1"]
            bad = {n: m.clone() for n, m in pop.state.items()}
            next(iter(bad.values())).view(-1)[0] += 1e-3
            ray.get(victim.actor.load_state.remote(bad, iteration - 1))

    trainer = ESTrainer(args=ray_config(tmp_path / "ray"), callbacks=[PopulationHook(corrupt)])
    with pytest.raises(WorkerDivergedError, match=r"worker-1 pid \d+ .*after iteration 2"):
        trainer.train()
    # The driver's log is intact up to the failed check, so --resume can take over.
    assert len((tmp_path / "ray" / SEEDLOG).read_text().splitlines()) == 2


def test_losing_every_actor_stops_with_a_resume_hint_and_resume_finishes(tmp_path, reference_run, monkeypatch) -> None:
    monkeypatch.setattr(distributed, "MAX_RESTARTS_PER_WORKER", 0)

    def kill_all(pop, iteration, result) -> None:
        if iteration == 3:
            for w in list(pop.workers.values()):
                os.kill(w.info["pid"], signal.SIGKILL)

    trainer = ESTrainer(args=ray_config(tmp_path / "ray"), callbacks=[PopulationHook(kill_all)])
    with pytest.raises(WorkersLostError, match="--resume"):
        trainer.train()
    monkeypatch.setattr(distributed, "MAX_RESTARTS_PER_WORKER", 3)
    ESTrainer(args=ray_config(tmp_path / "ray", resume=True)).train()
    assert_bitwise_equal(final_weights(tmp_path / "ray"), final_weights(reference_run), "resumed Ray run vs in-process")


def test_an_actor_without_the_driver_file_writes_the_same_anchor(tmp_path, awd_run) -> None:
    """On another node the run directory is not visible: θ₀ comes from the replica's own base weights."""
    from esft.anchor import AnchorFile
    from esft.models import load_tokenizer

    cfg = ESConfig(**{**TINY, "awd": "l2", "awd_lambda": 10.0})
    here = distributed.ESWorker(cfg.to_dict(), "embedded", load_tokenizer("embedded"), None, [], [], "cpu", 1, "a", str(awd_run / "theta0.safetensors"))
    elsewhere = distributed.ESWorker(cfg.to_dict(), "embedded", load_tokenizer("embedded"), None, [], [], "cpu", 1, "b", str(tmp_path / "absent"))
    assert here.anchor.path == awd_run / "theta0.safetensors"
    assert elsewhere.anchor.path != here.anchor.path
    driver = AnchorFile(awd_run / "theta0.safetensors")
    for name in elsewhere.state.names:
        assert torch.equal(elsewhere.anchor.get(name), driver.get(name)), name


# ------------------------------------------------------------------ clear errors
def test_cli_trains_on_workers_and_refuses_an_unreachable_cluster_cleanly(tmp_path, capsys) -> None:
    from esft.cli import main

    assert main(["train", *tiny_cli_args(output_dir=str(tmp_path / "ok"), workers=2, max_steps=1)]) == 0
    assert len((tmp_path / "ok" / SEEDLOG).read_text().splitlines()) == 1
    rc = main(["train", *tiny_cli_args(output_dir=str(tmp_path / "bad"), workers=2, ray_address="127.0.0.1:1")])
    assert rc == 2
    assert "ray start --head" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "config.yaml").exists(), "a failed connection must not leave a half-created run"


def test_missing_ray_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'esft\[ray\]'"):
        distributed.require_ray()


def test_unreachable_address_fails_fast_and_says_how_to_start_a_cluster() -> None:
    cfg = ESConfig(**{**TINY, "workers": 2, "ray_address": "127.0.0.1:1"})
    with pytest.raises(ConnectionError, match="ray start --head"):
        distributed.connect(cfg)
    with pytest.raises(ValueError, match="HOST:PORT"):
        distributed.connect(ESConfig(**{**TINY, "workers": 2, "ray_address": "nonsense"}))


def test_more_gpu_actors_than_gpus_is_refused() -> None:
    cfg = ESConfig(**{**TINY, "workers": 4, "worker_device": "cuda"})
    with pytest.raises(ValueError, match=r"need 4 GPUs, but the Ray cluster has 2"):
        distributed.actor_options(cfg, "cuda", {"GPU": 2.0, "CPU": 16.0})
    with pytest.raises(ValueError, match=r"need 6 CPUs"):
        distributed.actor_options(ESConfig(**{**TINY, "workers": 2, "worker_threads": 3}), "cpu", {"CPU": 4.0})
    assert distributed.actor_options(ESConfig(**{**TINY, "workers": 2}), "cpu", {"CPU": 4.0})["num_cpus"] == 2


def test_cuda_actors_need_the_driver_on_cuda(tmp_path) -> None:
    trainer = ESTrainer(args=ray_config(tmp_path / "ray", worker_device="cuda", device="cpu"))
    with pytest.raises(ValueError, match="--device cuda"):
        trainer.train()


def test_ray_address_without_workers_is_refused() -> None:
    with pytest.raises(ValueError, match="ray_address needs --workers"):
        ESConfig(ray_address="auto")


def test_a_kl_budget_run_on_two_actors_equals_the_in_process_run(tmp_path) -> None:
    """The driver decides each AWD step and logs it; the actors apply the logged step."""
    budget = dict(kl_budget=2e-4, kl_tasks="conciseness", kl_num_prompts=2, kl_max_tokens=4, kl_every=2)
    ESTrainer(args=ESConfig(**TINY, **budget, output_dir=str(tmp_path / "local"))).train()
    ESTrainer(args=ray_config(tmp_path / "ray", **budget)).train()
    local = (tmp_path / "local" / SEEDLOG).read_bytes()
    assert (tmp_path / "ray" / SEEDLOG).read_bytes() == local
    assert any(json.loads(line)["awd_step"] > 0 for line in local.splitlines()), "the budget never bound: empty check"
    assert_bitwise_equal(final_weights(tmp_path / "ray"), final_weights(tmp_path / "local"), "KL budget on 2 actors")
