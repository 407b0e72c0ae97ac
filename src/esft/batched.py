"""One forward pass for M population members (`--members_per_batch M`).

The batch is member-major: member m owns rows [m·P, (m+1)·P) of every activation, and
all members see the same prompts, so padding and attention masks are shared and every
op that works row by row (attention, norms, rotary, sampling) runs once for the whole
population. Only the modules that hold trainable weights need to know about members;
while a group is active they are patched so that:

- full-rank noise (exact, the default algorithm): every member's perturbed weights,
  master + σε written by `WeightState.write_member` (the same bits `perturb` writes), are
  stacked in per-tensor buffers (M, *shape), chunked so the stack fits a memory budget.
  Every matmul, frozen ones included, runs per member on exactly the (P, ...) slice the
  one-at-a-time path would see: a GEMM's rounding can depend on its row count, so this
  keeps each member's logits bitwise equal to evaluating it alone (tested on CPU).
- low-rank noise (`--noise_rank r`): matrices are never materialised per member; a linear
  layer computes xWᵀ once for all M·P rows and adds (σ/√r)·(xBₘ)Aₘᵀ per member with two
  thin batched matmuls; an embedding adds row t of (σ/√r)·AₘBₘᵀ. Tied embeddings use one
  (A, B) for the lookup and the output head. Vectors (norm scales, biases) are stacked.

Norm-like modules whose output is `weight * f(x)` (checked bitwise on a probe input, so
e.g. Gemma's `(1 + weight)` falls back) compute f(x) once and multiply by each member's
weight; any other module with trainable weights runs once per member on its rows.
It lives beside the population code, not in the engine (engines only generate): it writes
member weights, though never the at-rest ones, and nothing it patches survives the
`members(...)` context.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from esft import lowrank
from esft.es import Member, balanced_groups
from esft.params import WeightState

_GIB = 1 << 30
#: Default budget for stacked full-rank weight copies; `ESFT_BATCH_MEMORY_GB` overrides it.
DEFAULT_CPU_BUDGET_GB = 4.0
DEFAULT_CUDA_BUDGET_FRACTION = 0.4  # of the device's total memory (deterministic per GPU model)


def default_memory_budget(device: torch.device) -> int:
    """Bytes that stacked member weights may take: `ESFT_BATCH_MEMORY_GB`, else a fixed default.

    The default depends only on the device model, never on free memory at start-up, so a
    run chunks its population the same way every time it is replayed or resumed.
    """
    env = os.environ.get("ESFT_BATCH_MEMORY_GB")
    if env:
        return int(float(env) * _GIB)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * DEFAULT_CUDA_BUDGET_FRACTION)
    return int(DEFAULT_CPU_BUDGET_GB * _GIB)


@dataclass
class _Group:
    """The members of the active pass."""

    count: int
    coef: torch.Tensor  # (M, 1, 1): sign·σ/√r per member (low-rank term), model dtype


class PopulationBatcher:
    """Evaluates groups of population members in one batched forward of `state.model`."""

    def __init__(self, state: WeightState, memory_budget: int | None = None, exact: bool | None = None) -> None:
        self.state = state
        self.model = state.model
        self.device = state.device
        self.dtype = state.rest[0].dtype
        self.rank = state.noise_rank
        # Full-rank on CPU: per-member matmuls with one-at-a-time shapes, so rewards are
        # bitwise those of evaluating members alone. Low-rank: the point is one shared
        # matmul. CUDA: attention kernels pick their splits by batch size, so bitwise parity
        # is out of reach anyway, and one bmm over the stacked weights is the fast choice.
        self.exact = self.rank is None and (self.device.type == "cpu" if exact is None else exact)
        self.memory_budget = default_memory_budget(self.device) if memory_budget is None else int(memory_budget)
        self.index = {id(p): i for i, p in enumerate(state.params)}
        self._factored = self._factorable_tensors()
        self._stacked = [i for i in range(len(state.params)) if i not in self._factored]
        self._patches = self._plan_patches()
        self._capacity = 0
        self._stack: dict[int, torch.Tensor] = {}  # i -> (capacity, *shape), model dtype
        self._factors: dict[int, torch.Tensor] = {}  # i -> (capacity, out + in, r), fp32
        self._factors_cast: dict[int, torch.Tensor] = {}  # the same in the model's dtype
        self._ones: dict[tuple, torch.Tensor] = {}
        self.group: _Group | None = None

    # ------------------------------------------------------------------ planning
    def _owners(self) -> dict[int, list[tuple[torch.nn.Module, str]]]:
        owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
        for mod in self.model.modules():
            for pname, p in mod._parameters.items():
                if p is not None and id(p) in self.index:
                    owners.setdefault(self.index[id(p)], []).append((mod, pname))
        return owners

    def _factorable_tensors(self) -> set[int]:
        """Low-rank matrices used only as the weight of Linear/Embedding modules."""
        if self.rank is None:
            return set()
        out = set()
        for i, uses in self._owners().items():
            if self.state.lowrank[i] and all(
                isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) and pname == "weight" for mod, pname in uses
            ):
                out.add(i)
        return out

    def _plan_patches(self) -> list[tuple[torch.nn.Module, Callable[..., Any]]]:
        patches = []
        for mod in self.model.modules():
            owned = [(n, p) for n, p in mod._parameters.items() if p is not None]
            trainable = [(n, p) for n, p in owned if id(p) in self.index]
            if isinstance(mod, torch.nn.Linear) and (trainable or self.exact):
                patches.append((mod, self._linear_forward(mod)))
            elif isinstance(mod, torch.nn.Embedding) and trainable:
                patches.append((mod, self._embedding_forward(mod)))
            elif trainable:
                scale = self._scale_forward(mod, trainable)
                patches.append((mod, scale or self._loop_forward(mod, trainable)))
        return patches

    def member_bytes(self) -> int:
        """Bytes of the per-member buffers (stacked tensors and low-rank factors)."""
        total = 0
        for i in self._stacked:
            total += self.state.rest[i].numel() * self.state.rest[i].element_size()
        for i in self._factored:
            rows, r = lowrank.factor_shape(self.state.masters[i].shape, self.rank)  # type: ignore[arg-type]
            total += rows * r * (4 + (self.state.rest[i].element_size() if self.dtype != torch.float32 else 0))
        return total

    def max_group(self, members_per_batch: int) -> int:
        """Members one pass may hold: `members_per_batch`, capped by the memory budget."""
        per = max(1, self.member_bytes())
        return max(1, min(members_per_batch, self.memory_budget // per))

    def group_sizes(self, n_members: int, members_per_batch: int) -> list[int]:
        """Sizes of the passes that evaluate `n_members` (balanced, each within budget)."""
        return balanced_groups(n_members, self.max_group(members_per_batch))

    def allocated_bytes(self) -> int:
        """Bytes held in per-member buffers right now (for the memory tests)."""
        bufs = [*self._stack.values(), *self._factors.values(), *self._factors_cast.values()]
        return sum(b.numel() * b.element_size() for b in bufs)

    def release(self) -> None:
        """Free the per-member buffers (they are kept between passes to avoid re-allocating)."""
        self._stack.clear()
        self._factors.clear()
        self._factors_cast.clear()
        self._capacity = 0

    # ------------------------------------------------------------------- buffers
    def _ensure_capacity(self, m: int) -> None:
        if m <= self._capacity:
            return
        self.release()  # free the old stack before the larger one is allocated
        # Normal (not inference-mode) tensors: the noise pool's threads fill them, and
        # inference mode does not reach other threads.
        with torch.inference_mode(False):
            self._allocate(m)
        self._capacity = m

    def _allocate(self, m: int) -> None:
        st = self.state
        for i in self._stacked:
            self._stack[i] = torch.empty((m, *st.rest[i].shape), dtype=self.dtype, device=self.device)
        for i in self._factored:
            shape = lowrank.factor_shape(st.masters[i].shape, self.rank)  # type: ignore[arg-type]
            self._factors[i] = torch.empty((m, *shape), dtype=torch.float32, device=self.device)
            if self.dtype != torch.float32:
                self._factors_cast[i] = torch.empty((m, *shape), dtype=self.dtype, device=self.device)

    def _fill(self, members: Sequence[Member], sigma: float) -> None:
        st = self.state

        def one(i: int) -> None:
            if i in self._factored:
                buf = self._factors[i]
                for m, member in enumerate(members):
                    lowrank.fill_factors(buf[m], member.seed, st.names[i], st.masters[i].shape[0], st.noise_mode)
                if i in self._factors_cast:
                    self._factors_cast[i][: len(members)].copy_(buf[: len(members)])
            else:
                master = st.master_on_device(i)  # a host master crosses once per group, not per member
                for m, member in enumerate(members):
                    st.write_member(i, member.seed, member.sign, sigma, self._stack[i][m], master)

        st.for_each_tensor(one)

    def _stacked_of(self, i: int) -> torch.Tensor:
        assert self.group is not None
        return self._stack[i][: self.group.count]

    def _factors_of(self, i: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of tensor i for the active members: (M, out, r) and (M, in, r)."""
        assert self.group is not None
        buf = (self._factors_cast or self._factors)[i][: self.group.count]
        return buf[:, :n_out], buf[:, n_out:]

    # ------------------------------------------------------------------- context
    @contextmanager
    def members(self, members: Sequence[Member], sigma: float) -> Iterator[None]:
        """Inside the context, a forward over M·P member-major rows evaluates `members`."""
        if not members:
            raise ValueError("members() needs at least one member")
        if self.group is not None:
            raise RuntimeError("a member group is already active")
        self._ensure_capacity(len(members))
        with torch.inference_mode(False):  # scratch buffers must stay usable outside it
            self._fill(members, sigma)
        r = self.rank or 1
        coef = torch.tensor(
            [m.sign * sigma * lowrank.scale(r) for m in members], dtype=self.dtype, device=self.device
        ).view(-1, 1, 1)
        self.group = _Group(len(members), coef)
        saved = []
        try:
            for mod, fn in self._patches:
                saved.append((mod, mod.__dict__.get("forward")))
                mod.forward = fn
            yield
        finally:
            for mod, prev in saved:
                if prev is None:
                    del mod.forward
                else:
                    mod.forward = prev
            self.group = None

    # ---------------------------------------------------------- patched forwards
    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(M·P, ...) -> (M, P, ...) without copying (member-major rows)."""
        assert self.group is not None
        m = self.group.count
        if x.shape[0] % m:
            raise RuntimeError(f"batch of {x.shape[0]} rows is not member-major for {m} members")
        return x.unflatten(0, (m, x.shape[0] // m))

    def _linear_forward(self, mod: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        iw = self.index.get(id(mod.weight))
        ib = self.index.get(id(mod.bias)) if mod.bias is not None else None
        w_factored = iw is not None and iw in self._factored
        w_stacked = iw is not None and not w_factored
        n_out = mod.weight.shape[0]

        def forward(x: torch.Tensor) -> torch.Tensor:
            g = self.group
            assert g is not None
            if w_stacked and not self.exact:
                # (M, P·T, in) @ (M, in, out): one kernel for all members (CUDA).
                ws = self._stacked_of(iw)  # type: ignore[arg-type]
                y = torch.bmm(x.reshape(g.count, -1, x.shape[-1]), ws.transpose(1, 2))
                if mod.bias is not None:
                    y += (mod.bias if ib is None else self._stacked_of(ib).unsqueeze(1))
                return y.view(*x.shape[:-1], n_out)
            if self.exact:
                xs = self._split(x)
                ws = self._stacked_of(iw) if w_stacked else None
                if mod.bias is None:
                    # The mm `F.linear` runs for a bias-free layer (same operands, same
                    # kernel), each member writing straight into its rows of the output.
                    y = x.new_empty((*x.shape[:-1], n_out))
                    ys = y.view(g.count, -1, n_out)
                    for m in range(g.count):
                        w = mod.weight if ws is None else ws[m]
                        torch.mm(xs[m].reshape(-1, x.shape[-1]), w.t(), out=ys[m])
                    return y
                bs = self._stacked_of(ib) if ib is not None else None
                return torch.cat([
                    F.linear(xs[m], mod.weight if ws is None else ws[m], mod.bias if bs is None else bs[m])
                    for m in range(g.count)
                ])
            y = F.linear(x, mod.weight, mod.bias if ib is None else None)
            y3 = y.view(g.count, -1, y.shape[-1])
            if w_factored:
                a, b = self._factors_of(iw, n_out)  # type: ignore[arg-type]
                u = torch.bmm(x.reshape(g.count, -1, x.shape[-1]), b).mul_(g.coef)
                y3.baddbmm_(u, a.transpose(1, 2))
            if ib is not None:
                y3.add_(self._stacked_of(ib).unsqueeze(1))
            return y

        return forward

    def _embedding_forward(self, mod: torch.nn.Embedding) -> Callable[[torch.Tensor], torch.Tensor]:
        i = self.index[id(mod.weight)]
        factored = i in self._factored
        n_out = mod.weight.shape[0]

        def lookup(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return F.embedding(ids, weight, mod.padding_idx, mod.max_norm, mod.norm_type, mod.scale_grad_by_freq, mod.sparse)

        def forward(ids: torch.Tensor) -> torch.Tensor:
            g = self.group
            assert g is not None
            if not factored:
                ws, idss = self._stacked_of(i), self._split(ids)
                return torch.cat([lookup(idss[m], ws[m]) for m in range(g.count)])
            e = lookup(ids, mod.weight)
            a, b = self._factors_of(i, n_out)
            rows = ids.reshape(g.count, -1)
            picked = torch.gather(a, 1, rows.unsqueeze(-1).expand(-1, -1, a.shape[-1])).mul_(g.coef)
            e.view(g.count, -1, e.shape[-1]).baddbmm_(picked, b.transpose(1, 2))
            return e

        return forward

    def _scale_forward(
        self, mod: torch.nn.Module, trainable: list[tuple[str, torch.nn.Parameter]]
    ) -> Callable[..., torch.Tensor] | None:
        """For y = weight * f(x) modules (RMSNorm): f(x) once, then one multiply per member.

        Accepted only when a probe shows forward(x) == weight * (forward(x) with weight 1)
        bitwise, so the result is what the module computes for each member alone.
        """
        if len(trainable) != 1 or len(list(mod.parameters(recurse=True))) != 1:
            return None
        pname, p = trainable[0]
        if pname != "weight" or p.dim() != 1:
            return None
        orig = mod.forward
        ones = torch.ones_like(p.data)
        rest = p.data
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn((2, 3, p.numel()), generator=gen).to(device=p.device, dtype=p.dtype)
        w = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
        try:
            with torch.inference_mode():
                p.data = w
                ref = orig(x)
                p.data = ones
                unit = orig(x)
        except Exception:
            return None
        finally:
            p.data = rest
        if not (isinstance(ref, torch.Tensor) and ref.shape == unit.shape and torch.equal(ref, w * unit)):
            return None
        i = self.index[id(p)]

        def forward(x: torch.Tensor) -> torch.Tensor:
            g = self.group
            assert g is not None
            saved = p.data
            p.data = ones
            try:
                y = orig(x)
            finally:
                p.data = saved
            w = self._stacked_of(i)
            ys = self._split(y)
            return (w.view(g.count, *([1] * (ys.dim() - 2)), -1) * ys).flatten(0, 1)

        return forward

    def _loop_forward(
        self, mod: torch.nn.Module, trainable: list[tuple[str, torch.nn.Parameter]]
    ) -> Callable[..., Any]:
        """Any other module with trainable weights: run it once per member on its rows."""
        orig = mod.forward
        owned = [(p, self.index[id(p)]) for _, p in trainable]

        def forward(*args: Any, **kwargs: Any) -> Any:
            g = self.group
            assert g is not None
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if first is None:
                raise RuntimeError(f"{type(mod).__name__}: no tensor input to split by member")
            n = first.shape[0]

            def part(a: Any, m: int) -> Any:
                return self._split(a)[m] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == n else a

            saved = [p.data for p, _ in owned]
            outs = []
            try:
                for m in range(g.count):
                    for p, i in owned:
                        p.data = self._stacked_of(i)[m]
                    outs.append(orig(*(part(a, m) for a in args), **{k: part(v, m) for k, v in kwargs.items()}))
            finally:
                for (p, _), data in zip(owned, saved):
                    p.data = data
            if isinstance(outs[0], torch.Tensor):
                return torch.cat(outs)
            if isinstance(outs[0], (tuple, list)) and all(isinstance(t, torch.Tensor) for t in outs[0]):
                return type(outs[0])(torch.cat(parts) for parts in zip(*outs))
            raise RuntimeError(f"{type(mod).__name__}: cannot batch members over an output of type {type(outs[0])}")

        return forward


__all__ = ["PopulationBatcher", "default_memory_budget"]
