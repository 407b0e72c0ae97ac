"""Which tensors train, their fp32 master copy, and exact perturb / restore / update.

Exactness (DESIGN.md, principle 2): a perturbed member is written into a separate work
buffer as master + σ·ε and the model's parameter is pointed at it; restoring points the
parameter back at the untouched rest tensor. No +σε/−σε round trip ever happens, so a
whole population leaves the weights bitwise unchanged, at any dtype.

With `noise_rank` r set, every matrix gets low-rank noise ε = A·Bᵀ/√r (`esft.lowrank`) and
the update is one matmul per matrix; other tensors keep full Gaussian noise.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from esft import lowrank
from esft.noise import NoiseMode, fill_noise


def select_parameters(
    model: torch.nn.Module, trainable: str | None = None, frozen: str | None = None
) -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters that train: matching `trainable` (all if None), not `frozen`.

    `named_parameters()` lists a tied tensor once (under its first name), so tied
    embeddings get one noise stream and one update, as they should.
    """
    try:
        keep = re.compile(trainable) if trainable else None
        drop = re.compile(frozen) if frozen else None
    except re.error as e:
        raise ValueError(f"invalid --trainable/--frozen regex: {e}") from None
    chosen = [
        (name, p)
        for name, p in model.named_parameters()
        if (keep is None or keep.search(name)) and not (drop and drop.search(name))
    ]
    if not chosen:
        raise ValueError(
            f"no parameter matches trainable={trainable!r} frozen={frozen!r}; "
            f"names look like {next(iter(dict(model.named_parameters())), '?')!r}"
        )
    return chosen


def tensors_checksum(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A digest of the exact bits of fp32 tensors, computed where the tensors live.

    Integer sums of the raw bits are exact and order-independent on any device, so only a
    few scalars per tensor leave the GPU; a weighted second sum also catches values that
    moved between positions. Ray sync checks, checkpoints and θ₀ all record this digest.
    """
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    chunk = 1 << 22  # bounded int64 temporaries whatever the tensor size
    for name, tensor in named:
        if tensor.dtype != torch.float32:
            raise TypeError(f"checksums are over fp32 bits; {name} is {tensor.dtype}")
        flat = tensor.reshape(-1).view(torch.int32)
        plain = weighted = 0
        for start in range(0, flat.numel(), chunk):
            bits = flat[start : start + chunk].to(torch.int64)
            pos = torch.arange(start, start + bits.numel(), device=bits.device, dtype=torch.int64)
            plain += int(bits.sum())
            weighted += int(((bits >> 8) * (pos % 251 + 1)).sum())
        digest.update(f"{name}:{plain}:{weighted};".encode())
    return digest.hexdigest()


def resolve_master_device(master_device: str, device: torch.device, dtype: torch.dtype) -> str:
    """"cpu" (a host master) or "device". `auto`: the host on CUDA when the weights are not
    fp32 (there the master is a second copy, 4 bytes per weight of GPU memory saved), else
    the device (an fp32 model's parameters are their own master)."""
    if master_device not in ("auto", "cpu", "device"):
        raise ValueError(f"master_device must be auto, cpu or device (got {master_device!r})")
    if master_device == "auto":
        return "cpu" if device.type == "cuda" and dtype != torch.float32 else "device"
    return master_device


class WeightState:
    """The trainable tensors of a model with an fp32 master and exact perturbations."""

    def __init__(
        self,
        model: torch.nn.Module,
        trainable: str | None = None,
        frozen: str | None = None,
        noise_mode: NoiseMode = "iid",
        noise_rank: int | None = None,
        master_device: str = "auto",
    ) -> None:
        if noise_rank is not None and noise_rank < 1:
            raise ValueError(f"noise_rank must be >= 1 or None (got {noise_rank})")
        self.model = model
        self.noise_mode = noise_mode
        self.noise_rank = noise_rank
        self.named = select_parameters(model, trainable, frozen)
        self.names = [n for n, _ in self.named]
        self.params = [p for _, p in self.named]
        self.device = self.params[0].device  # where members are computed
        self.devices = [p.device for p in self.params]  # each tensor's (a model may span devices)
        self.host_master = resolve_master_device(master_device, self.device, self.params[0].dtype) == "cpu"
        # fp32 models: the parameter's own storage is the master. Lower precision models
        # keep an fp32 master beside the at-rest copy in the model's dtype. A host master
        # (`master_device="cpu"`) lives in (pinned) host memory and is streamed to the device
        # tensor by tensor: the device then holds the at-rest weights and the work buffers.
        self.masters: list[torch.Tensor] = []
        self.rest: list[torch.Tensor] = []
        for p in self.params:
            if self.host_master:
                master = p.data.detach().to("cpu", torch.float32, copy=True)
                self.masters.append(master.pin_memory() if self.device.type == "cuda" else master)
            elif p.dtype == torch.float32:
                self.masters.append(p.data)
            else:
                self.masters.append(p.data.float())
            self.rest.append(p.data)
        # Which tensors get low-rank noise (matrices, when a rank is set).
        self.lowrank = [lowrank.is_lowrank(m.shape, noise_rank) for m in self.masters]
        self._work: list[torch.Tensor | None] = [None] * len(self.params)
        self._local = threading.local()  # per-thread fp32 scratch buffers
        self._scratch_bytes = 0  # all threads' scratch, for `memory()`
        self._scratch_lock = threading.Lock()
        self._largest = max(m.numel() for m in self.masters)
        # torch's CPU Gaussian sampler is single-threaded, so noise for different tensors
        # is drawn in parallel (measured 2.0x on 2 cores). Each tensor's arithmetic is the
        # same whichever thread runs it, so results stay bitwise identical.
        on_cpu = self.device.type == "cpu"
        workers = torch.get_num_threads() if on_cpu else 1
        # Pool threads run their ops single-threaded: an OpenMP team started from a pool
        # thread slowed the main thread's generation by a third (measured 1.95 s -> 2.6 s).
        self._pool = (
            ThreadPoolExecutor(workers, thread_name_prefix="esft-noise", initializer=torch.set_num_threads, initargs=(1,))
            if workers > 1
            else None
        )
        self.perturbed = False

    @classmethod
    def from_config(cls, model: torch.nn.Module, cfg) -> WeightState:
        """The weight state an ESConfig describes (trainer, replay and Ray workers alike)."""
        return cls(model, cfg.trainable, cfg.frozen, cfg.noise_mode, cfg.noise_rank,
                   getattr(cfg, "master_device", "auto"))

    # ------------------------------------------------------------------ helpers
    @property
    def num_parameters(self) -> int:
        return sum(m.numel() for m in self.masters)

    def _fp32_scratch(self, like: torch.Tensor, slot: int = 0, device: torch.device | None = None) -> torch.Tensor:
        """A reusable fp32 buffer shaped like `like` on `device` (default: where members are
        computed), one per thread, device and slot."""
        device = self.device if device is None else device
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = {}
        key = (device, slot)
        buf = scratch.get(key)
        if buf is None:
            buf = scratch[key] = torch.empty(self._largest, dtype=torch.float32, device=device)
            with self._scratch_lock:
                self._scratch_bytes += buf.numel() * 4
        return buf[: like.numel()].view(like.shape)

    def master_on_device(self, i: int) -> torch.Tensor:
        """Tensor i's fp32 master where the members are computed: itself, or for a host
        master a copy streamed into a device scratch (non-blocking from pinned memory; the
        copy and the arithmetic after it share a stream, so they stay in order)."""
        master = self.masters[i]
        if not self.host_master:
            return master
        staged = self._fp32_scratch(master, slot=2, device=self.devices[i])
        staged.copy_(master, non_blocking=True)
        return staged

    def _flat_scratch(self, numel: int, device: torch.device, slot: str) -> torch.Tensor:
        """A reusable flat fp32 buffer of at least `numel` values (per thread, device, slot)."""
        scratch = getattr(self._local, "flat", None)
        if scratch is None:
            scratch = self._local.flat = {}
        buf = scratch.get((device, slot))
        if buf is None or buf.numel() < numel:
            with self._scratch_lock:
                self._scratch_bytes += numel * 4 - (0 if buf is None else buf.numel() * 4)
            buf = scratch[(device, slot)] = torch.empty(numel, dtype=torch.float32, device=device)
        return buf

    def for_each_tensor(self, fn: Callable[[int], float | None]) -> list[float | None]:
        """Run fn(i) for every trainable tensor on the noise pool (see `_for_each_tensor`)."""
        return self._for_each_tensor(fn)

    def _for_each_tensor(self, fn: Callable[[int], float | None]) -> list[float | None]:
        """Run fn(i) for every trainable tensor, in parallel on CPU; results in order."""
        if self._pool is None:
            return [fn(i) for i in range(len(self.names))]
        # Largest tensors first keeps both threads busy until the end.
        order = sorted(range(len(self.names)), key=lambda i: -self.masters[i].numel())
        results = dict(zip(order, self._pool.map(fn, order)))
        return [results[i] for i in range(len(self.names))]

    def _work_buffer(self, i: int) -> torch.Tensor:
        buf = self._work[i]
        if buf is None:
            buf = torch.empty_like(self.rest[i])
            self._work[i] = buf
        return buf

    # --------------------------------------------------------------- perturbation
    def factors(self, i: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank factors (A, B) of tensor i for `seed`, in a per-thread fp32 scratch."""
        master, rank = self.masters[i], self.noise_rank
        assert rank is not None and self.lowrank[i], f"{self.names[i]} has no low-rank noise"
        rows, _ = lowrank.factor_shape(master.shape, rank)
        buf = self._flat_scratch(rows * rank, self.devices[i], "factors")[: rows * rank].view(rows, rank)
        return lowrank.fill_factors(buf, seed, self.names[i], master.shape[0], self.noise_mode)

    def write_member(self, i: int, seed: int, sign: int, sigma: float, out: torch.Tensor,
                     master: torch.Tensor | None = None) -> None:
        """Write tensor i of member (seed, sign), master + sign·σ·ε, into `out` (the model's dtype).

        `perturb` and the batched forward (`esft.batched`) both call this, so a member's
        weights have the same bits whichever way it is evaluated. `master`: tensor i's master
        already on the device (a streamed host master), else it is taken or staged here.
        """
        name = self.names[i]
        master = self.master_on_device(i) if master is None else master
        if self.lowrank[i]:
            a, b = self.factors(i, seed)
            alpha = sign * sigma * lowrank.scale(self.noise_rank)  # type: ignore[arg-type]
            dest = out if out.dtype == torch.float32 else self._fp32_scratch(master, device=self.devices[i])
            torch.addmm(master, a, b.T, alpha=alpha, out=dest)
        elif out.dtype == torch.float32:
            fill_noise(out, seed, name, self.noise_mode)
            torch.add(master, out, alpha=sign * sigma, out=out)
            return
        else:
            dest = fill_noise(self._fp32_scratch(master, device=self.devices[i]), seed, name, self.noise_mode)
            torch.add(master, dest, alpha=sign * sigma, out=dest)
        if dest is not out:
            out.copy_(dest)

    def perturb(self, seed: int, sign: int, sigma: float) -> None:
        """Point every trainable parameter at master + sign·σ·ε(seed)."""
        if self.perturbed:
            raise RuntimeError("perturb() called twice without restore()")
        if self.host_master and self.device.type == "cuda" and len(set(self.devices)) == 1:
            for i, master in self.streamed_masters():
                self.write_member(i, seed, sign, sigma, self._work_buffer(i), master)
        else:
            self._for_each_tensor(lambda i: self.write_member(i, seed, sign, sigma, self._work_buffer(i)))
        for p, work in zip(self.params, self._work):
            p.data = work
        self.perturbed = True

    def streamed_masters(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(i, tensor i's host master on the device) in order, double-buffered: tensor i+1 is
        copied on a side stream while the caller computes with tensor i (CUDA, host master).
        Each staging buffer is refilled only once the work that read it has run."""
        copy_stream = getattr(self, "_copy_stream", None)
        if copy_stream is None:
            copy_stream = self._copy_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        # Work queued before this call may still read the staging slots (the last member's
        # tensors, a batched group's master): no copy starts before it has run.
        copy_stream.wait_stream(compute)
        freed: list[torch.cuda.Event | None] = [None, None]  # the compute work that last read each slot

        def stage(i: int) -> tuple[torch.Tensor, torch.cuda.Event]:
            slot = i % 2
            buf = self._fp32_scratch(self.masters[i], slot=2 + slot)
            with torch.cuda.stream(copy_stream):
                if freed[slot] is not None:
                    copy_stream.wait_event(freed[slot])
                buf.copy_(self.masters[i], non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(copy_stream)
            return buf, ready

        n = len(self.names)
        upcoming = stage(0) if n else None
        for i in range(n):
            buf, ready = upcoming
            if i + 1 < n:
                upcoming = stage(i + 1)
            compute.wait_event(ready)
            yield i, buf
            done = torch.cuda.Event()
            done.record(compute)
            freed[i % 2] = done

    @contextmanager
    def weights_from(self, source: Callable[[str], torch.Tensor]) -> Iterator[None]:
        """Inside the context the model computes with `source(name)` (e.g. θ₀) in place of
        every trainable tensor; the at-rest weights are untouched and come back bitwise.

        Uses the members' work buffers, so it costs no memory a population does not.
        """
        if self.perturbed:
            raise RuntimeError("weights_from() while a member is perturbed")
        for i, (name, p) in enumerate(self.named):
            work = self._work_buffer(i)
            work.copy_(source(name))
            p.data = work
        self.perturbed = True
        try:
            yield
        finally:
            self.restore()

    def restore(self) -> None:
        """Point every parameter back at its untouched at-rest tensor (bitwise, O(1))."""
        for p, rest in zip(self.params, self.rest):
            p.data = rest
        self.perturbed = False

    # ---------------------------------------------------------------------- update
    def apply_update(self, seeds: list[int], coefficients: list[float], scale: float) -> float:
        """θ ← θ + scale·Σⱼ cⱼ·ε(seedⱼ), accumulated in fp32; returns ‖Δθ‖ (float64).

        The sum is formed per tensor in a fp32 accumulator before touching the master,
        and always in seed order, so a replay or another process gets the same bits. With
        low-rank noise a matrix's sum is one matmul of the stacked factors.
        """
        if self.perturbed:
            raise RuntimeError("apply_update() while a member is perturbed")
        if len(seeds) != len(coefficients):
            raise ValueError("one coefficient per seed is needed")

        def one(i: int) -> float:
            name, master = self.names[i], self.masters[i]
            acc = self._fp32_scratch(master, slot=1, device=self.devices[i])
            if self.lowrank[i]:
                rows, rank = lowrank.factor_shape(master.shape, self.noise_rank)  # type: ignore[arg-type]
                flat = self._flat_scratch(len(seeds) * rows * rank, self.devices[i], "update")
                lowrank.combined_update(acc, seeds, coefficients, name, rank, self.noise_mode, flat)
            else:
                acc.zero_()
                eps = self._fp32_scratch(master, slot=0, device=self.devices[i])
                for seed, c in zip(seeds, coefficients):
                    fill_noise(eps, seed, name, self.noise_mode)
                    acc.add_(eps, alpha=c)
            acc.mul_(scale)
            # A host master adds the update on the host: fp32 addition is correctly rounded
            # on either side, so the bits equal a device master's.
            master.add_(acc if not self.host_master else acc.to("cpu"))
            return float(torch.linalg.vector_norm(acc, dtype=torch.float64)) ** 2

        sq = sum(self._for_each_tensor(one))  # type: ignore[arg-type]
        self.sync_rest()
        return sq**0.5

    def sync_rest(self) -> None:
        """Refresh the at-rest copies (the model's dtype, on its device) from the fp32 master."""
        for master, rest in zip(self.masters, self.rest):
            if rest.data_ptr() != master.data_ptr():  # an fp32 parameter on the device is its own master
                rest.copy_(master, non_blocking=self.host_master)
        if self.host_master and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the pinned sources may change next

    def memory(self) -> dict[str, float]:
        """Bytes the trainable tensors hold, where: the at-rest weights and the work buffers
        on the device, the fp32 master on the device or the host, and the fp32 scratch (a few
        buffers of the largest tensor, however many tensors there are); per trained weight too."""
        d = self.num_parameters
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        weights = sum(size(r) for r in self.rest)
        work = sum(size(w) for w in self._work if w is not None)
        separate = [m for m, r in zip(self.masters, self.rest) if m.data_ptr() != r.data_ptr()]
        master = sum(size(m) for m in separate)
        scratch = self._scratch_bytes
        device_state = weights + work + (0 if self.host_master else master)
        return {
            "trained_weights": d, "weights_bytes": weights, "work_bytes": work,
            "master_device_bytes": 0 if self.host_master else master, "master_host_bytes": master if self.host_master else 0,
            "scratch_bytes": scratch, "device_state_bytes_per_weight": device_state / d,
        }

    def checksum(self) -> str:
        """A digest of the exact bits of every fp32 master (`tensors_checksum`)."""
        return tensors_checksum(self.items())

    # --------------------------------------------------------------- state access
    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, fp32 master) pairs, in a fixed order."""
        return zip(self.names, self.masters)

    def load_masters(self, tensors: dict[str, torch.Tensor]) -> None:
        """Overwrite the masters (e.g. from a checkpoint), then the at-rest copies."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"checkpoint lacks trainable tensors: {missing[:5]}")
        for name, master in self.items():
            master.copy_(tensors[name].to(master.device, torch.float32))
        self.sync_rest()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full state with the fp32 masters in place of trainable tensors."""
        state = dict(self.model.state_dict())
        state.update(dict(self.items()))
        return state
