"""KL(p_base ‖ p_iteration): zero on equal weights, matches torch by hand, cached samples."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import TINY

from esft.evaluation import kl
from esft.evaluation.kl import format_kl_table, kl_on_continuations, kl_report, sample_continuations

MAX_TOKENS = 8
STATS = ("kl_mc_prompt", "kl_mc_token", "kl_exact_prompt", "kl_exact_token")


@pytest.fixture(scope="module")
def base(embedded_dir):
    from esft.models import load_model

    return load_model("embedded", "float32", "cpu")


@pytest.fixture(scope="module")
def prompts(base) -> list[list[int]]:
    from esft.engine.hf import HFEngine
    from esft.tasks import get_task

    task = get_task("conciseness")
    return HFEngine(*base).encode([task.messages(e) for e in task.load("test", limit=2)])


@pytest.fixture(scope="module")
def continuations(base, prompts) -> list[list[int]]:
    model, tokenizer = base
    return sample_continuations(model, tokenizer, prompts, MAX_TOKENS, seed=0, batch_size=2)


@pytest.fixture(scope="module")
def perturbed(base) -> torch.nn.Module:
    model = copy.deepcopy(base[0])
    w = model.model.layers[0].mlp.up_proj.weight
    w.add_(0.02 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    return model


def test_samples_are_reproducible_and_end_at_eos(base, prompts, continuations) -> None:
    model, tokenizer = base
    eos = model.generation_config.eos_token_id
    assert all(1 <= len(c) <= MAX_TOKENS for c in continuations)
    assert all(eos not in c[:-1] for c in continuations), "tokens after EOS were kept"
    # One generator per prompt, one draw per step: the same samples whatever the batching,
    # and a shorter budget gives a prefix of the longer sample.
    short = sample_continuations(model, tokenizer, prompts, 3, seed=0, batch_size=1)
    assert short == [c[:3] for c in continuations]


@torch.inference_mode()
def test_samples_fed_through_the_kv_cache_equal_a_loop_without_it(base, prompts, continuations) -> None:
    """Each prompt alone, the whole sequence recomputed every step: no cache to get wrong."""
    model, _ = base
    for i, prompt in enumerate(prompts):
        gen, ids, drawn = kl._prompt_generator(0, i), list(prompt), []
        for _ in continuations[i]:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            cdf = torch.softmax(logits.double(), dim=-1).cumsum(-1)
            u = torch.rand((), generator=gen, dtype=torch.float64)
            drawn.append(int(torch.searchsorted(cdf, (u * cdf[-1]).reshape(1), right=True).clamp(max=len(cdf) - 1)))
            ids.append(drawn[-1])
        assert drawn == continuations[i], f"prompt {i}"


def test_kl_of_a_model_against_itself_is_exactly_zero(base, prompts, continuations) -> None:
    model = base[0]
    for other in (model, copy.deepcopy(model)):
        stats = kl_on_continuations(model, other, prompts, continuations, batch_size=2)
        assert all(stats[k] == 0.0 for k in STATS), stats
        assert stats["n_prompts"] == 2 and stats["n_tokens"] == sum(map(len, continuations))


def test_perturbed_copy_gives_positive_kl_and_the_estimators_agree(base, prompts, continuations, perturbed) -> None:
    stats = kl_on_continuations(base[0], perturbed, prompts, continuations, batch_size=2)
    for avg in ("prompt", "token"):
        exact, mc = stats[f"kl_exact_{avg}"], stats[f"kl_mc_{avg}"]
        assert exact > 0 and mc > 0, stats
        assert 0.1 < mc / exact < 10, stats


def test_matches_a_hand_computation_with_log_softmax(base, prompts, continuations, perturbed) -> None:
    prompt, cont = prompts[0], continuations[0]
    ids = torch.tensor([prompt + cont])
    with torch.inference_mode():
        lp = torch.log_softmax(base[0](ids).logits[0].float(), -1)[len(prompt) - 1 : -1]
        lq = torch.log_softmax(perturbed(ids).logits[0].float(), -1)[len(prompt) - 1 : -1]
    tok = torch.tensor(cont).unsqueeze(1)
    mc = (lp.gather(1, tok) - lq.gather(1, tok)).squeeze(1).double()
    exact = (lp.exp() * (lp - lq)).sum(-1).double()
    stats = kl_on_continuations(base[0], perturbed, [prompt], [cont], batch_size=1)
    assert stats["n_tokens"] == len(cont)
    assert stats["kl_mc_token"] == pytest.approx(mc.mean().item(), rel=1e-4, abs=1e-7)
    assert stats["kl_exact_token"] == pytest.approx(exact.mean().item(), rel=1e-4, abs=1e-7)
    assert stats["kl_mc_prompt"] == pytest.approx(stats["kl_mc_token"])


def test_format_kl_table() -> None:
    rows = [
        {"iteration": 0, "task": "a", "kl_exact_prompt": 0.0, "kl_mc_prompt": 0.0},
        {"iteration": 5, "task": "a", "kl_exact_prompt": 0.0123456, "kl_mc_prompt": -0.002},
    ]
    table = format_kl_table(rows)
    assert "| iter | a exact | a MC |" in table
    assert "| 5 | 0.01235 | -0.002 |" in table


# ------------------------------------------------------------------ on a real run
@pytest.fixture(scope="module")
def es_run(tmp_path_factory, embedded_dir) -> Path:
    from esft.config import ESConfig
    from esft.seedlog import SeedLog
    from esft.trainer import ESTrainer

    out = tmp_path_factory.mktemp("kl") / "run"
    ESTrainer(args=ESConfig(**{**TINY, "max_steps": 2, "save_steps": 0}, output_dir=str(out))).train()
    assert any(not r.skipped for r in SeedLog(out).records()), "both tiny updates were skipped"
    return out


@pytest.fixture(scope="module")
def report(es_run: Path) -> list[dict]:
    return kl_report(es_run, ["conciseness"], iterations=[0, 2], num_prompts=2, max_tokens=MAX_TOKENS)


@pytest.mark.slow
def test_report_is_zero_at_iteration_0_and_positive_later(report: list[dict]) -> None:
    assert [(r["iteration"], r["task"]) for r in report] == [(0, "conciseness"), (2, "conciseness")]
    first, last = report
    assert all(first[k] == 0.0 for k in STATS), first  # same weights, same batches
    assert last["kl_exact_token"] > 0 and last["kl_exact_prompt"] > 0
    assert first["n_prompts"] == last["n_prompts"] == 2


@pytest.mark.slow
def test_cache_is_written_once_and_reused_by_the_cli(es_run: Path, report: list[dict], tmp_path, monkeypatch, capsys) -> None:
    path = es_run / "kl_cache" / f"conciseness-n2-t{MAX_TOKENS}-s0.json"
    cached = json.loads(path.read_text())
    assert len(cached["prompts"]) == len(cached["continuations"]) == 2
    stamp = path.stat().st_mtime_ns

    def no_sampling(*args, **kwargs):
        raise AssertionError("continuations were sampled again instead of read from the cache")

    monkeypatch.setattr(kl, "sample_continuations", no_sampling)
    out = tmp_path / "kl.json"
    argv = ["--run", str(es_run), "--iterations", "2", "--tasks", "conciseness", "--num_prompts", "2",
            "--max_tokens", str(MAX_TOKENS), "--device", "cpu", "--output", str(out)]
    assert kl.main(argv) == 0
    assert "| iter | conciseness exact | conciseness MC |" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    assert {k: row[k] for k in STATS} == {k: report[1][k] for k in STATS}
    assert path.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_bad_iterations_and_tasks_raise_value_error(es_run: Path) -> None:
    with pytest.raises(ValueError, match=r"iterations \[3\]"):
        kl_report(es_run, ["conciseness"], iterations=[0, 3], num_prompts=2, max_tokens=MAX_TOKENS)
    with pytest.raises(ValueError, match="no_such_task"):
        kl_report(es_run, ["no_such_task"], iterations=[0], num_prompts=2, max_tokens=MAX_TOKENS)
