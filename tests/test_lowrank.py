"""Low-rank noise (--noise_rank): factors, exact perturb/restore, the one-matmul update, replay."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from helpers import TINY, Tiny

from esft import es, lowrank
from esft.config import ESConfig
from esft.noise import noise
from esft.params import WeightState


def expected_noise(seed: int, name: str, shape: torch.Size, rank: int) -> torch.Tensor:
    """ε of one tensor under --noise_rank, computed from the definitions alone (float64)."""
    if len(shape) != 2:
        return noise(seed, name, shape).double()
    ab = noise(seed, name, (shape[0] + shape[1], rank)).double()
    a, b = ab[: shape[0]], ab[shape[0] :]
    return a @ b.T / math.sqrt(rank)


def test_lowrank_noise_is_a_deterministic_rank_r_matrix_with_unit_variance() -> None:
    a1, b1 = lowrank.factors(3, "w", (300, 200), 4)
    a2, b2 = lowrank.factors(3, "w", (300, 200), 4)
    assert torch.equal(a1, a2) and torch.equal(b1, b2), "factors must be a pure function of (seed, name, shape)"
    assert a1.shape == (300, 4) and b1.shape == (200, 4)
    assert not torch.equal(a1, lowrank.factors(4, "w", (300, 200), 4)[0]), "different seeds must differ"
    eps = lowrank.lowrank_noise(3, "w", (300, 200), 4)
    assert int(torch.linalg.matrix_rank(eps.double(), rtol=1e-5)) == 4, "ε = A·Bᵀ/√r has rank r"
    assert 0.85 < float(eps.var()) < 1.15, "A·Bᵀ/√r keeps unit variance per entry, like full-rank noise"
    assert lowrank.is_lowrank((5, 7), 2) and not lowrank.is_lowrank((5,), 2) and not lowrank.is_lowrank((5, 7), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowrank_perturb_writes_master_plus_sigma_ab_and_restore_is_bitwise(dtype: torch.dtype) -> None:
    model = Tiny(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = WeightState(model, noise_rank=2)
    assert state.lowrank == [True, False, True], "matrices get low-rank noise, the bias a full Gaussian"
    sigma = 0.01
    for seed, sign in [(1, 1), (1, -1), (9, 1)]:
        state.perturb(seed, sign, sigma)
        for name, p in model.named_parameters():
            master = state.masters[state.names.index(name)].double()
            expected = (master + sign * sigma * expected_noise(seed, name, p.shape, 2)).to(dtype)
            torch.testing.assert_close(p.data, expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2,
                                       msg=f"{name}: perturbed weights are not master + σ·A·Bᵀ/√r")
        state.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed after low-rank perturb/restore cycles"


def test_lowrank_update_matches_an_independent_float64_computation() -> None:
    model = Tiny()
    theta0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    state = WeightState(model, noise_rank=3)
    seeds, coeffs, alpha, n = [5, 9, 13, 21], [1.2, -0.3, -0.9, 0.4], 0.05, 4
    norm = state.apply_update(seeds, coeffs, es.update_scale(alpha, n))
    total_sq = 0.0
    for name, p in model.named_parameters():
        delta = sum(c * expected_noise(s, name, p.shape, 3) for s, c in zip(seeds, coeffs)) * (alpha / n)
        total_sq += float(delta.square().sum())
        torch.testing.assert_close(p.detach().double(), theta0[name] + delta, rtol=0, atol=1e-6,
                                   msg=f"{name} ≠ θ₀ + (α/N)·Σ cⱼ·Aⱼ·Bⱼᵀ/√r")
    assert norm == pytest.approx(math.sqrt(total_sq), rel=1e-5)


def test_lowrank_update_bits_do_not_depend_on_the_thread_count() -> None:
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.Linear(160, 64))
            state = WeightState(model, noise_rank=4)
            state.apply_update(list(range(30)), [0.1 * (j - 15) for j in range(30)], 1e-3)
            results.append({n: m.clone() for n, m in state.items()})
    finally:
        torch.set_num_threads(before)
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), f"{name}: update differs between 1 and 2 threads"


def test_noise_rank_is_validated_and_reaches_the_weight_state() -> None:
    with pytest.raises(ValueError, match="noise_rank must be >= 1"):
        ESConfig(noise_rank=0)
    with pytest.raises(ValueError, match="members_per_batch must be >= 1"):
        ESConfig(members_per_batch=0)
    assert WeightState.from_config(Tiny(), ESConfig(noise_rank=2)).noise_rank == 2
    assert WeightState.from_config(Tiny(), ESConfig()).noise_rank is None
    assert "members_per_batch" in __import__("esft.config").config.RESUMABLE_FIELDS
    assert ESConfig(noise_rank=1).differences(ESConfig()) == ["noise_rank: 1 != None"]


# ----------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def lowrank_run(tmp_path_factory, embedded_dir):
    from esft.trainer import ESTrainer

    out = tmp_path_factory.mktemp("lowrank") / "run"
    cfg = ESConfig(**{**TINY, "noise_rank": 2, "members_per_batch": 4}, output_dir=str(out))
    ESTrainer(args=cfg).train()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3])
def test_lowrank_replay_is_bitwise_equal_to_the_checkpoint(lowrank_run, k: int) -> None:
    from esft.seedlog import load_checkpoint_tensors, replay

    assert yaml.safe_load((lowrank_run / "config.yaml").read_text())["noise_rank"] == 2
    state, _ = replay(lowrank_run, k, device="cpu")
    assert state.noise_rank == 2, "replay must rebuild the low-rank noise of the run"
    expected = load_checkpoint_tensors(lowrank_run / f"checkpoint-{k}")
    diff = [n for n, t in state.state_dict().items() if n in expected and not torch.equal(t, expected[n])]
    assert not diff, f"low-rank replay of iteration {k} differs from the checkpoint in {diff[:3]}"


@pytest.mark.slow
def test_lowrank_update_equals_independent_computation_from_the_seed_log(lowrank_run, embedded_dir) -> None:
    from safetensors.torch import load_file

    from esft.seedlog import SeedLog, load_checkpoint_tensors

    base = load_file(str(embedded_dir / "model.safetensors"))
    final = load_checkpoint_tensors(lowrank_run / "final")
    scale = es.update_scale(TINY["learning_rate"], TINY["population_size"])
    recs = SeedLog(lowrank_run).records()
    assert sum(not r.skipped for r in recs) >= 2, "tiny low-rank run should see differing rewards"
    for name, theta0 in base.items():
        if not name.startswith("model.layers.0."):
            assert torch.equal(final[name], theta0), f"frozen tensor {name} changed"
            continue
        expected = theta0.double()
        for rec in (r for r in recs if not r.skipped):
            expected = expected + scale * sum(
                c * expected_noise(s, name, theta0.shape, 2) for s, c in zip(rec.seeds, rec.coefficients)
            )
        torch.testing.assert_close(final[name].double(), expected, rtol=0, atol=1e-6,
                                   msg=f"{name} ≠ θ₀ + Σ (α/N)·Σ cⱼ·Aⱼ·Bⱼᵀ/√r")
