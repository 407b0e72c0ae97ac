"""--members_per_batch: M members in one forward, bitwise the members alone (full-rank)."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY

from esft import es
from esft.batched import PopulationBatcher, default_memory_budget
from esft.config import ESConfig
from esft.es import balanced_groups
from esft.params import WeightState


class ScaleNorm(torch.nn.Module):
    """weight * f(x), like LlamaRMSNorm: takes the one-multiply-per-member path."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class OnePlusNorm(ScaleNorm):
    """(1 + weight) * f(x), like Gemma: the probe must reject the fast path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Mixer(torch.nn.Module):
    """A matrix that is not an nn.Linear: runs once per member."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.eye(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w)


class Toy(torch.nn.Module):
    """Every kind of trainable tensor a batched forward meets, with tied embeddings."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Embedding(11, 8)
        self.norm = ScaleNorm(8)
        self.gnorm = OnePlusNorm(8)
        self.up = torch.nn.Linear(8, 8)
        self.mix = Mixer(8)
        self.head = torch.nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.up(self.gnorm(self.norm(self.emb(ids))))))


def members_alone(state: WeightState, fn, members, sigma):
    out = []
    for m in members:
        state.perturb(m.seed, m.sign, sigma)
        try:
            out.append(fn())
        finally:
            state.restore()
    return out


# exact=False is the CUDA path (one bmm over stacked weights), run here on CPU.
@pytest.mark.parametrize(("rank", "exact"), [(None, None), (None, False), (2, None)])
def test_toy_batched_forward_equals_each_member_alone(rank, exact) -> None:
    model = Toy().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = WeightState(model, noise_rank=rank)
    batcher = PopulationBatcher(state, exact=exact)
    kinds = {type(mod).__name__: fn.__qualname__.split(".")[1] for mod, fn in batcher._patches}
    assert kinds["ScaleNorm"] == "_scale_forward" and kinds["OnePlusNorm"] == "_loop_forward", kinds
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    members = es.members([4, 8], mirror=True) + [es.Member(15, 1)]
    sigma = 0.1
    alone = members_alone(state, lambda: model(ids), members, sigma)
    with torch.inference_mode(), batcher.members(members, sigma):
        together = model(ids.repeat(len(members), 1))
    assert "forward" not in model.head.__dict__, "patches must not outlive the members() context"
    for m, ref in enumerate(alone):
        got = together[m * 3 : (m + 1) * 3]
        if batcher.exact:
            assert torch.equal(got, ref), f"member {m}: batched full-rank logits differ from the member alone"
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"member {m}: batched ≠ alone")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a batched forward"


def test_balanced_groups_respect_the_cap() -> None:
    assert balanced_groups(30, 7) == [6, 6, 6, 6, 6]
    assert balanced_groups(8, 8) == [8]
    assert balanced_groups(5, 2) == [2, 2, 1]
    assert balanced_groups(3, 100) == [3]


def test_memory_stays_bounded_when_members_per_batch_is_large() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    state = WeightState(model)
    per = PopulationBatcher(state).member_bytes()
    assert per == sum(p.numel() * 4 for p in model.parameters())
    budget = int(3.5 * per)
    batcher = PopulationBatcher(state, memory_budget=budget)
    sizes = batcher.group_sizes(64, members_per_batch=64)
    assert max(sizes) == 3 and sum(sizes) == 64, sizes
    x = torch.randn(2, 64)
    members = es.members(list(range(64)), mirror=False)
    start = 0
    for size in sizes:
        group = members[start : start + size]
        start += size
        with torch.inference_mode(), batcher.members(group, 0.01):
            model(x.repeat(size, 1))
        assert batcher.allocated_bytes() <= budget, "stacked member weights exceeded the memory budget"
    # A low-rank member holds factors only, so far more of them fit the same budget.
    assert PopulationBatcher(WeightState(model, noise_rank=1)).member_bytes() < per / 20


def test_memory_budget_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("ESFT_BATCH_MEMORY_GB", "0.5")
    assert default_memory_budget(torch.device("cpu")) == 1 << 29
    monkeypatch.delenv("ESFT_BATCH_MEMORY_GB")
    assert default_memory_budget(torch.device("cpu")) == 4 << 30


# ------------------------------------------------------------- embedded model
@pytest.fixture(scope="module")
def trainer(tmp_path_factory, embedded_dir):
    from esft.trainer import ESTrainer

    # σ = 0.1: members must score differently for the reward comparison to mean something.
    cfg = ESConfig(**{**TINY, "sigma": 0.1}, output_dir=str(tmp_path_factory.mktemp("batched") / "run"))
    return ESTrainer(args=cfg)


def test_batched_logits_of_the_embedded_model_are_bitwise_each_member_alone(trainer) -> None:
    engine = trainer.engine
    # The tied embedding (lookup and output head), layer 0 and the final norm train.
    state = WeightState(trainer.model, trainable=r"model\.(embed_tokens|layers\.0\.|norm)")
    prompts = engine.encode([trainer.task.messages(e) for e in trainer.train_examples[:2]])
    ids, mask = engine._batch_inputs(prompts)
    members = es.members([101, 202], mirror=True)
    with torch.inference_mode():
        alone = members_alone(state, lambda: trainer.model(input_ids=ids, attention_mask=mask).logits, members, 0.05)
        with PopulationBatcher(state).members(members, 0.05):
            together = trainer.model(input_ids=ids.repeat(4, 1), attention_mask=mask.repeat(4, 1)).logits
    for m, ref in enumerate(alone):
        assert torch.equal(together[2 * m : 2 * m + 2], ref), f"member {m}: batched logits differ from alone"


def test_batched_rewards_equal_one_at_a_time_rewards(trainer) -> None:
    prompts = trainer.engine.encode([trainer.task.messages(e) for e in trainer.train_examples])
    cfg = trainer.args
    results = {}
    for m in (1, 3):  # 3: two passes of 2 members (balanced groups)
        cfg.members_per_batch = m
        seeds, rewards, stats = trainer.evaluate_population(1, prompts)
        results[m] = (seeds, rewards, stats["tokens"])
    cfg.members_per_batch = 1
    assert len(set(map(str, results.values()))) == 1, f"rewards depend on members_per_batch: {results}"
    assert len(set(results[1][1])) > 1, "members should differ (else the check is empty)"


def test_static_cache_option_on_cpu_generates_the_same_tokens(trainer) -> None:
    from esft.engine import HFEngine

    engine = trainer.engine
    assert engine.generation_options() == {}, "CPU keeps the dynamic cache by default"
    static = HFEngine(trainer.model, trainer.tokenizer, 6, static_cache=True)
    assert static.generation_options() == {"cache_implementation": "static", "disable_compile": True}
    prompts = engine.encode([trainer.task.messages(e) for e in trainer.train_examples[:2]])
    assert [g.text for g in static.generate_ids(prompts)] == [g.text for g in engine.generate_ids(prompts)]


@pytest.mark.slow
def test_batched_run_ends_bitwise_equal_to_a_one_at_a_time_run(tmp_path, reference_run) -> None:
    from esft.seedlog import SeedLog, load_checkpoint_tensors
    from esft.trainer import ESTrainer

    # reference_run is the TINY run one member at a time (conftest.py).
    out = tmp_path / "m4"
    ESTrainer(args=ESConfig(**{**TINY, "save_steps": 0, "members_per_batch": 4}, output_dir=str(out))).train()
    logs1, w1 = SeedLog(reference_run).records(), load_checkpoint_tensors(reference_run / "final")
    logs4, w4 = SeedLog(out).records(), load_checkpoint_tensors(out / "final")
    assert [r.rewards for r in logs1] == [r.rewards for r in logs4], "batched rewards differ from one at a time"
    diff = [k for k in w1 if not torch.equal(w1[k], w4[k])]
    assert not diff, f"final weights differ in {diff[:3]}"
