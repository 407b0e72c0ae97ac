"""The fp32 master in host memory (`--master_device cpu`): the device holds only the at-rest
weights and the work buffers, and every bit is the same as with the master beside them.

On the CPU the "device" is the CPU work buffer and the master a separate host buffer, which
runs the same streaming code a GPU run does (without the CUDA streams)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import TINY, Tiny, assert_bitwise_equal

from esft.params import WeightState, resolve_master_device


def _trained(dtype: torch.dtype, master_device: str, noise_rank: int | None = None) -> tuple[dict, dict, list, WeightState]:
    model = Tiny(dtype)
    state = WeightState(model, noise_rank=noise_rank, master_device=master_device)
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(1)).to(dtype)
    outputs = []
    for seed, sign in ((11, 1), (11, -1), (12, 1)):
        state.perturb(seed, sign, 0.1)
        outputs.append(model.b(model.a(x)))
        state.restore()
    state.apply_update([11, 12], [0.7, -1.3], 0.01)
    return ({n: t.clone() for n, t in state.items()}, {n: p.data.clone() for n, p in state.named}, outputs, state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("noise_rank", [None, 2], ids=["full-rank", "low-rank"])
def test_a_host_master_gives_the_same_bits_as_a_device_master(dtype, noise_rank) -> None:
    device = _trained(dtype, "device", noise_rank)
    host = _trained(dtype, "cpu", noise_rank)
    assert host[3].host_master and not device[3].host_master
    assert_bitwise_equal(device[0], host[0], "fp32 masters after an update")
    assert_bitwise_equal(device[1], host[1], "at-rest weights after an update")
    assert all(torch.equal(a, b) for a, b in zip(device[2], host[2])), "a perturbed member computed other outputs"


def test_memory_accounting_gives_4_bytes_per_weight_on_the_device_with_a_host_master() -> None:
    bf16_host = _trained(torch.bfloat16, "cpu")[3].memory()
    bf16_device = _trained(torch.bfloat16, "device")[3].memory()
    # bf16 weights (2) + a bf16 work buffer (2), the fp32 master (4) on the host or beside them.
    assert bf16_host["device_state_bytes_per_weight"] == 4.0 and bf16_host["master_host_bytes"] == 4 * 55
    assert bf16_device["device_state_bytes_per_weight"] == 8.0 and bf16_device["master_device_bytes"] == 4 * 55
    fp32 = _trained(torch.float32, "device")[3].memory()
    assert fp32["device_state_bytes_per_weight"] == 8.0, "an fp32 parameter is its own master: weights + work"
    assert bf16_host["scratch_bytes"] > 0, "the streaming scratch is counted apart, one largest tensor per slot"


def test_auto_keeps_the_master_on_the_host_only_where_it_saves_gpu_memory() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_master_device("auto", cuda, torch.bfloat16) == "cpu"
    assert resolve_master_device("auto", cuda, torch.float32) == "device"
    assert resolve_master_device("auto", cpu, torch.bfloat16) == "device"
    assert resolve_master_device("cpu", cpu, torch.float32) == "cpu"
    with pytest.raises(ValueError, match="master_device must be auto, cpu or device"):
        resolve_master_device("gpu", cpu, torch.float32)


@pytest.mark.slow
def test_a_run_with_a_host_master_equals_todays_run_bitwise(tmp_path, reference_run, awd_run) -> None:
    from esft.config import ESConfig
    from esft.seedlog import SEEDLOG, load_checkpoint_tensors
    from esft.trainer import ESTrainer

    for ref, extra in ((reference_run, {}), (awd_run, {"awd": "l2", "awd_lambda": 10.0})):
        out = tmp_path / ref.parent.name
        cfg = ESConfig(**{**TINY, **extra}, master_device="cpu", output_dir=str(out))
        trainer = ESTrainer(args=cfg)
        assert trainer.state.host_master
        trainer.train()
        assert (out / SEEDLOG).read_bytes() == (ref / SEEDLOG).read_bytes(), ref.parent.name
        assert_bitwise_equal(load_checkpoint_tensors(out / "final"), load_checkpoint_tensors(ref / "final"),
                             f"host-master run vs {ref.parent.name}")
    # Where the master lives may change on a resume: it never changes a bit.
    assert not ESConfig(**TINY).differences(dataclasses.replace(ESConfig(**TINY), master_device="cpu"))
