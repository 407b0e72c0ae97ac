"""ES arithmetic without a language model: noise, reward shaping, exact updates, AWD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import Tiny

from esft import es
from esft.anchor import AnchorFile, anchor_and_drift, shrink
from esft.noise import noise, tensor_seed
from esft.params import WeightState


# --------------------------------------------------------------------------- noise
def test_iid_noise_is_deterministic_and_distinct_per_tensor_and_seed() -> None:
    a1 = noise(3, "layer.weight", (64, 8))
    a2 = noise(3, "layer.weight", (64, 8))
    assert torch.equal(a1, a2), "same (seed, name) must regenerate identical noise"
    assert not torch.equal(a1, noise(3, "other.weight", (64, 8))), "iid: each tensor has its own stream"
    assert not torch.equal(a1, noise(4, "layer.weight", (64, 8))), "different seeds must differ"
    assert tensor_seed(3, "x") == tensor_seed(3, "x") != tensor_seed(3, "y")


def test_shared_noise_reproduces_reference_generator_for_every_tensor() -> None:
    seed = 12345
    expected = torch.randn((10, 4), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    assert torch.equal(noise(seed, "a.weight", (10, 4), mode="shared"), expected)
    # Every tensor restarts the same generator, so same-shaped tensors share their noise.
    assert torch.equal(noise(seed, "b.weight", (10, 4), mode="shared"), expected)


# ----------------------------------------------------------------- reward shaping
def test_z_scores_use_population_std_plus_epsilon() -> None:
    r = [1.0, 2.0, 4.0, 7.0]
    z = es.normalize_rewards(r)
    expected = (np.array(r) - np.mean(r)) / (np.std(r) + 1e-8)
    assert z == pytest.approx(expected.tolist(), abs=1e-12)


def test_equal_rewards_skip_the_update_without_nan() -> None:
    assert es.normalize_rewards([0.5, 0.5, 0.5]) is None
    assert es.coefficients([2.0, 2.0], mirror=True) is None


def test_mirror_coefficient_is_difference_of_pair_z_scores() -> None:
    r = [3.0, 1.0, 0.0, 2.0]
    z = es.normalize_rewards(r)
    assert es.coefficients(r, mirror=True) == pytest.approx([z[0] - z[1], z[2] - z[3]])
    assert [(m.seed, m.sign) for m in es.members([11, 22], mirror=True)] == [(11, 1), (11, -1), (22, 1), (22, -1)]


def test_seeds_and_prompt_subsets_are_pure_functions_of_seed_and_iteration() -> None:
    assert es.iteration_seeds(0, 5, 6) == es.iteration_seeds(0, 5, 6)
    assert es.iteration_seeds(0, 5, 6) != es.iteration_seeds(0, 6, 6)
    assert es.iteration_seeds(0, 5, 6) != es.iteration_seeds(1, 5, 6)
    sub = es.prompt_subset(0, 3, 200, 16)
    assert sub == es.prompt_subset(0, 3, 200, 16) and len(set(sub)) == 16
    assert es.prompt_subset(0, 3, 10, None) == list(range(10))


# ------------------------------------------------------------ exact perturbations
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_writes_master_plus_sigma_noise_and_restore_is_bitwise(dtype: torch.dtype) -> None:
    model = Tiny(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = WeightState(model)
    sigma = 0.01
    for seed, sign in [(1, 1), (1, -1), (7, 1)]:
        state.perturb(seed, sign, sigma)
        for name, p in model.named_parameters():
            master = state.masters[state.names.index(name)]
            expected = (master + sign * sigma * noise(seed, name, p.shape)).to(dtype)
            assert torch.equal(p.data, expected), f"{name}: perturbed weights are not master + σε"
        state.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed after perturb/restore cycles"


def test_update_matches_an_independent_float64_computation() -> None:
    model = Tiny()
    theta0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    state = WeightState(model)
    seeds, coeffs, alpha, n = [5, 9, 13], [1.2, -0.3, -0.9], 0.05, 3
    norm = state.apply_update(seeds, coeffs, es.update_scale(alpha, n))
    total_sq = 0.0
    for name, p in model.named_parameters():
        delta = sum(c * noise(s, name, p.shape).double() for s, c in zip(seeds, coeffs)) * (alpha / n)
        total_sq += float(delta.square().sum())
        torch.testing.assert_close(p.detach().double(), theta0[name] + delta, rtol=0, atol=1e-6)
    assert norm == pytest.approx(math.sqrt(total_sq), rel=1e-5)


def test_trainable_and_frozen_filters_choose_tensors() -> None:
    model = Tiny()
    assert WeightState(model, trainable=r"^a\.").names == ["a.weight", "a.bias"]
    assert WeightState(model, frozen=r"bias").names == ["a.weight", "b.weight"]
    with pytest.raises(ValueError, match="no parameter matches"):
        WeightState(model, trainable="nothing-matches")
    with pytest.raises(ValueError, match="invalid"):
        WeightState(model, trainable="(")


# ---------------------------------------------------------------------------- AWD
def test_l2_awd_scales_the_drift_by_one_minus_step() -> None:
    d = torch.tensor([1.0, -2.0, 0.5])
    assert torch.equal(shrink(d.clone(), "l2", 0.1), d * 0.9)
    with pytest.raises(ValueError):
        shrink(d.clone(), "l2", 1.0)


def test_l1_awd_soft_thresholds_with_exact_zeros() -> None:
    d = torch.tensor([0.3, -0.05, 0.1, -0.4, 0.0999])
    out = shrink(d.clone(), "l1", 0.1)
    assert out.tolist() == pytest.approx([0.2, 0.0, 0.0, -0.3, 0.0])
    assert (out[[1, 2, 4]] == 0).all(), "entries within the threshold must become exactly 0"


def test_huber_awd_is_quadratic_inside_and_l1_outside() -> None:
    s, delta = 0.5, 1.0
    d = torch.tensor([0.6, -1.2, 3.0, -4.0, 1.5])
    out = shrink(d.clone(), "huber", s, delta)
    # inside |d| <= δ(1+s) = 1.5: d/(1+s); outside: d − s·δ·sign(d)
    assert out.tolist() == pytest.approx([0.4, -0.8, 2.5, -3.5, 1.0])
    # The proximal step is continuous at the boundary.
    edge = torch.tensor([delta * (1 + s) - 1e-6, delta * (1 + s) + 1e-6])
    a, b = shrink(edge.clone(), "huber", s, delta).tolist()
    assert abs(a - b) < 1e-5


def test_anchor_file_roundtrip_and_awd_pulls_master_toward_theta0(tmp_path) -> None:
    model = Tiny()
    state = WeightState(model)
    anchor = AnchorFile.write(tmp_path / "theta0.safetensors", state.items())
    for name, master in state.items():
        assert torch.equal(anchor.get(name), master), "θ₀ file must hold the exact base weights"
    state.apply_update([1], [1.0], 0.1)
    before = anchor_and_drift(state.items(), anchor, "none", 0.0)
    after = anchor_and_drift(state.items(), anchor, "l2", 0.5)
    assert after == pytest.approx(before * 0.5, rel=1e-6)
    # A huge L1 step puts every weight back on θ₀ exactly.
    anchor_and_drift(state.items(), anchor, "l1", 1e3)
    for name, master in state.items():
        assert torch.equal(master, anchor.get(name))
    assert anchor.norm(state.names) == pytest.approx(
        math.sqrt(sum(float(p.detach().double().square().sum()) for p in Tiny().parameters()))
    )


def test_noise_stream_0_draws_what_runs_drew_before_streams_and_other_streams_are_fresh() -> None:
    # The key runs have always used: seed logs written before streams existed stay valid.
    old = np.random.default_rng([7, 3, 0x5EED]).integers(0, 2**31 - 1, size=6)
    assert es.iteration_seeds(7, 3, 6) == es.iteration_seeds(7, 3, 6, stream=0) == [int(s) for s in old]
    old_subset = sorted(int(i) for i in np.random.default_rng([7, 3, 0x9409]).choice(20, size=4, replace=False))
    assert es.prompt_subset(7, 3, 20, 4) == old_subset
    streams = [set(es.iteration_seeds(7, 3, 6, stream=k)) for k in range(3)]
    assert all(not (streams[i] & streams[j]) for i in range(3) for j in range(i + 1, 3)), "streams share seeds"
    plan = es.plan_iteration(7, 3, 6, False, 20, 4, stream=2)
    assert plan.seeds == es.iteration_seeds(7, 3, 6, stream=2) and plan.subset == es.prompt_subset(7, 3, 20, 4, stream=2)


def test_the_trainer_plans_each_iteration_from_its_noise_stream() -> None:
    from types import SimpleNamespace

    from esft.config import ESConfig
    from esft.trainer import ESTrainer

    one_at_a_time = SimpleNamespace(max_group=lambda: 1)
    for stream in (0, 3):
        cfg = ESConfig(seed=11, noise_stream=stream, population_size=4, prompts_per_step=2)
        plan = ESTrainer.plan(SimpleNamespace(args=cfg), 5, 10, one_at_a_time)
        assert plan.seeds == es.iteration_seeds(11, 5, 4, stream=stream)
        assert plan.subset == es.prompt_subset(11, 5, 10, 2, stream=stream)
