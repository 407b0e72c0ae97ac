"""Weight drift: exact statistics on a hand-made module, then on a real tiny ES run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import TINY

from esft.evaluation.drift import (
    drift_report,
    drift_stats,
    format_drift_table,
    layer_key,
    main,
    module_group,
    module_type,
)

NAMES = {
    "model.embed_tokens.weight": (4, 3),
    "model.layers.0.self_attn.q_proj.weight": (3, 3),
    "model.layers.0.input_layernorm.weight": (3,),
    "model.layers.1.mlp.down_proj.weight": (3, 2),
    "model.norm.weight": (3,),
}


def tiny_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) for n, s in NAMES.items()}


def test_names_are_classified() -> None:
    assert [module_type(n) for n in NAMES] == ["embed", "attn_q", "norm", "mlp_down", "norm"]
    assert [layer_key(n) for n in NAMES] == ["embed", "layers.0", "layers.0", "layers.1", "final_norm"]
    assert module_type("model.layers.3.self_attn.o_proj.bias") == "attn_o"
    assert module_type("lm_head.weight") == "embed" and layer_key("lm_head.weight") == "lm_head"
    assert [module_group(t) for t in ("attn_v", "mlp_gate", "norm", "embed", "other")] == [
        "attention", "mlp", "norm", "embed", "other",
    ]


def test_drift_of_the_base_is_zero_everywhere() -> None:
    theta0 = tiny_params()
    stats = drift_stats(theta0.items(), theta0.__getitem__, taus=(0.0, 1e-6))
    entries = [stats["global"], *stats["per_layer"].values(), *stats["per_module"].values(), *stats["per_group"].values()]
    for e in entries:
        assert e["norm"] == 0 and e["relative"] == 0 and e["max_abs"] == 0 and e["mean_abs"] == 0
        assert e["sparsity"] == {"0": 1.0, "1e-06": 1.0}
    assert stats["global"]["numel"] == sum(math.prod(s) for s in NAMES.values())


def test_drift_stats_match_a_hand_computation() -> None:
    theta0 = tiny_params()
    # Known deltas: mostly zero, a few set values spanning the thresholds.
    deltas = {n: torch.zeros(s) for n, s in NAMES.items()}
    deltas["model.embed_tokens.weight"][1, 2] = 3e-5
    deltas["model.layers.0.self_attn.q_proj.weight"][0] = torch.tensor([0.5, -2e-7, 1e-3])
    deltas["model.layers.1.mlp.down_proj.weight"][2, 1] = -0.25
    deltas["model.norm.weight"][0] = 5e-7
    # θ held in float64 so that Δ is known exactly whatever θ₀'s rounding.
    theta = {n: theta0[n].double() + deltas[n].double() for n in NAMES}
    taus = (1e-6, 1e-4)
    stats = drift_stats(theta.items(), theta0.__getitem__, taus)

    def expected(names: list[str]) -> dict:
        d = torch.cat([(theta[n] - theta0[n].double()).flatten() for n in names])
        t0 = torch.cat([theta0[n].double().flatten() for n in names])
        norm = float(d.norm())
        return {
            "norm": norm,
            "relative": norm / float(t0.norm()),
            "mean_abs": float(d.abs().mean()),
            "max_abs": float(d.abs().max()),
            "sparsity": {f"{t:g}": int((d.abs() <= t).sum()) / d.numel() for t in taus},
            "numel": d.numel(),
        }

    def check(got: dict, names: list[str]) -> None:
        want = expected(names)
        for key in ("norm", "relative", "mean_abs", "max_abs"):
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-18), key
        assert got["sparsity"] == want["sparsity"] and got["numel"] == want["numel"]

    check(stats["global"], list(NAMES))
    assert stats["global"]["sparsity"] == {"1e-06": 29 / 33, "0.0001": 30 / 33}  # exact counts
    assert stats["global"]["norm"] == pytest.approx(math.sqrt(0.5**2 + 0.25**2 + 1e-6 + 9e-10 + 4e-14 + 25e-14), rel=1e-9)
    emb, q, ln, down, fnorm = NAMES
    check(stats["per_layer"]["embed"], [emb])
    check(stats["per_layer"]["layers.0"], [q, ln])
    check(stats["per_layer"]["layers.1"], [down])
    check(stats["per_layer"]["final_norm"], [fnorm])
    check(stats["per_module"]["attn_q"], [q])
    check(stats["per_module"]["mlp_down"], [down])
    check(stats["per_module"]["norm"], [ln, fnorm])
    check(stats["per_group"]["attention"], [q])
    check(stats["per_group"]["norm"], [ln, fnorm])
    assert list(stats["per_layer"]) == ["embed", "layers.0", "layers.1", "final_norm"]
    assert stats["per_layer"]["layers.0"]["sparsity"]["1e-06"] == 10 / 12
    table = format_drift_table([{"iteration": 3, **stats}])
    assert table.count("\n") == 2 and "attention" in table and "| 3 |" in table


def test_fast_paths_agree_with_the_full_computation(monkeypatch) -> None:
    import esft.evaluation.drift as drift

    theta0 = tiny_params()
    theta = {k: v.clone() for k, v in theta0.items()}
    theta["model.layers.1.mlp.down_proj.weight"] += 0.01 * torch.arange(6.0).view(3, 2)
    # fp64 copies of θ₀ defeat the bitwise-equal shortcut; a 4-element chunk forces chunking.
    full = drift_stats(theta.items(), lambda n: theta0[n].double())
    fast = drift_stats(theta.items(), theta0.__getitem__)
    monkeypatch.setattr(drift, "_CHUNK", 4)
    cache: dict[str, float] = {}
    chunked = [drift_stats(theta.items(), theta0.__getitem__, theta0_sq=cache) for _ in range(2)]
    assert set(cache) == set(NAMES)
    for got in (fast, *chunked):
        for part in ("per_layer", "per_module", "per_group"):
            assert got[part].keys() == full[part].keys()
        for a, b in [(got["global"], full["global"]), *zip(got["per_module"].values(), full["per_module"].values())]:
            assert a["sparsity"] == b["sparsity"] and a["max_abs"] == b["max_abs"] and a["numel"] == b["numel"]
            for key in ("norm", "relative", "mean_abs"):
                assert a[key] == pytest.approx(b[key], rel=1e-13, abs=1e-300), key


# ------------------------------------------------------------------ real ES run
@pytest.fixture(scope="module")
def es_run(tmp_path_factory, embedded_dir) -> Path:
    from esft.config import ESConfig
    from esft.trainer import ESTrainer

    out = tmp_path_factory.mktemp("drift") / "run"
    ESTrainer(args=ESConfig(**{**TINY, "max_steps": 2, "save_steps": 0}, output_dir=str(out))).train()
    return out


@pytest.mark.slow
def test_drift_over_an_es_run_through_the_cli(es_run: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="not in"):
        drift_report(es_run, iterations=[0, 3])
    out = tmp_path / "d" / "drift.json"
    assert main(["--run", str(es_run), "--output", str(out)]) == 0
    assert "| 2 |" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [r["iteration"] for r in report] == [0, 1, 2]
    base = report[0]
    for e in [base["global"], *base["per_layer"].values(), *base["per_module"].values()]:
        assert e["norm"] == 0 and e["max_abs"] == 0
        assert set(e["sparsity"].values()) == {1.0}

    metrics = [json.loads(line) for line in (es_run / "metrics.jsonl").read_text().splitlines()]
    last = report[-1]
    assert last["global"]["norm"] > 0, "tiny run made no update; adjust TINY"
    assert last["global"]["norm"] == pytest.approx(metrics[-1]["drift/norm"], rel=1e-5)
    assert report[1]["global"]["norm"] == pytest.approx(metrics[0]["drift/norm"], rel=1e-5, abs=1e-12)
    # Only layer 0 trains (TINY's trainable): every other tensor is bitwise the base.
    assert last["per_layer"]["layers.0"]["norm"] == pytest.approx(last["global"]["norm"], rel=1e-12)
    for key, e in last["per_layer"].items():
        if key != "layers.0":
            assert e["norm"] == 0 and e["sparsity"]["1e-06"] == 1.0, key
    assert last["per_module"]["embed"]["norm"] == 0
    assert set(last["per_group"]) == {"attention", "mlp", "norm", "embed"}
    assert last["global"]["theta0_norm"] == pytest.approx(base["global"]["theta0_norm"], rel=1e-12)
