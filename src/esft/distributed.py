"""Ray scale-out: population members scored by K actors, each a full model replica.

What travels per iteration is O(N) numbers: the driver plans the iteration once
(`es.plan_iteration`) and sends an actor (iteration, prompt subset, [(member index, seed,
sign)]) per group of the plan and gets back (reward, token count, timings) per member;
after the update it broadcasts the seed-log record (seeds, coefficients) and every actor
applies it with the same code as the driver (`seedlog.apply_record`), so no weights
move in the steady state. The driver keeps its own replica on the same device type: it
writes checkpoints and the seed log, and every `sync_check_steps` iterations it compares
the actors' weight checksums with its own.

Scheduling is dynamic (an idle actor takes the next member), each actor holds at most
two members so scoring one overlaps generating the next, and a lost actor's members are
re-queued while a replacement is started from the driver's weights. Ray does the
processes, placement and transport; nothing here is a scheduler of its own beyond the
member queue.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from esft import es
from esft.config import ESConfig
from esft.params import WeightState
from esft.population import (
    BatcherOwner,
    MemberResult,
    PopulationResult,
    generate_group,
    score_group,
)
from esft.rewards import RewardFailureError, RewardGuard
from esft.seedlog import IterationRecord, apply_record

log = logging.getLogger(__name__)

#: Members in flight per actor: one generating, one queued behind it (or being scored).
QUEUE_DEPTH = 2
#: How long a replacement actor may take to start before the run gives up on it.
WORKER_START_TIMEOUT_S = 600.0
#: Replacements allowed per configured actor before the run gives up (then: --resume).
MAX_RESTARTS_PER_WORKER = 3
#: Environment variables the actors need to find the same model cache and data.
FORWARDED_ENV = ("ESFT_CACHE", "ESFT_DATA_DIR", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class WorkerDivergedError(RuntimeError):
    """An actor's weights no longer match the driver's: never continue silently."""


class WorkersLostError(RuntimeError):
    """No actor is left to score members; the run can be resumed later."""


def require_ray():
    try:
        import ray
    except ImportError:
        raise ImportError(
            "--workers needs Ray, which is not installed: pip install 'esft[ray]'"
        ) from None
    return ray


# ---------------------------------------------------------------------- the actor
class ESWorker(BatcherOwner):
    """One Ray actor: a model replica that scores members and applies updates.

    Methods run on up to two threads (Ray `max_concurrency=2`): generation holds a lock,
    scoring does not, so a member's reward is computed while the next one generates.
    """

    def __init__(
        self, cfg_dict: dict[str, Any], model: Any, tokenizer: Any, task: Any, examples: list[Any],
        prompts: list[list[int]], device: str, threads: int | None, name: str, anchor_path: str | None = None,
    ) -> None:
        from esft.engine import HFEngine
        from esft.models import load_model

        if threads:
            torch.set_num_threads(threads)
        self.cfg = ESConfig.from_dict(cfg_dict)
        self.name = name
        # The same limits on user rewards as in-process (failures in a row count per actor);
        # its worker processes start before the model loads, so they never share its pages.
        self.guard = RewardGuard.from_config(self.cfg)
        self.guard.prepare(task)
        if isinstance(model, str):
            net, _ = load_model(model, self.cfg.torch_dtype, device)
        else:
            net = model.to(device).eval().requires_grad_(False)
        self.state = WeightState.from_config(net, self.cfg)
        from esft.seedlog import prepare_start

        # A stage: the previous stage's final weights; θ₀ from the driver's file when this node sees it.
        self._base_anchor = prepare_start(self.cfg, self.state, Path(anchor_path) if anchor_path else None)
        self.engine = HFEngine(net, tokenizer, self.cfg.max_new_tokens, self.cfg.generation_batch_size)
        self.task, self.examples, self.prompts = task, examples, prompts
        self.anchor = self._open_anchor(anchor_path) if self.cfg.awd_penalty != "none" else None
        self.iteration = 0
        self._lock = threading.Lock()
        self._batcher = None
        self._warned: set[str] = set()

    def _open_anchor(self, driver_path: str | None):
        """θ₀ for AWD: the driver's file when this node can see it intact, else written from
        the base weights this replica holds right now (the same bits, as the model loads the same)."""
        from pathlib import Path

        from esft.seedlog import checked_anchor, temporary_anchor

        anchor = checked_anchor(Path(driver_path), self.state) if driver_path else None
        return anchor if anchor is not None else (self._base_anchor or temporary_anchor(self.state))

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name, "pid": os.getpid(), "node": socket.gethostname(),
            "device": str(self.state.device), "threads": torch.get_num_threads(),
            "max_group": self.max_group(),
        }

    def run_members(self, iteration: int, subset: list[int] | None, items: list[tuple[int, int, int]]) -> list[MemberResult]:
        """Score one group of the driver's plan, members `(index, seed, sign)`, on the plan's
        prompt subset (None: every prompt): alone, or as one batched pass."""
        subset = list(range(len(self.prompts))) if subset is None else subset
        batch = [self.prompts[i] for i in subset]
        members = [es.Member(seed, sign) for _, seed, sign in items]
        with self._lock:
            t0 = time.perf_counter()  # busy time starts once this call holds the replica
            if self.iteration != iteration - 1:
                raise RuntimeError(
                    f"{self.name} holds the weights after iteration {self.iteration}, "
                    f"asked to score members of iteration {iteration}"
                )
            per_member, t_gen, t_perturb = generate_group(self.state, self.engine, self.batcher, members, self.cfg.sigma, batch)
        # Scoring runs outside the lock, so it overlaps the next group's generation.
        results = score_group(self.task, [i for i, _, _ in items], per_member, [self.examples[i] for i in subset],
                              t_gen, t_perturb, self.name, self._warned, self.guard)
        busy = time.perf_counter() - t0
        for r in results:
            r.t_busy = busy / len(results)
        return results

    def apply(self, record: dict[str, Any], want_checksum: bool) -> str | None:
        rec = IterationRecord.from_json(record)
        with self._lock:
            if rec.iteration != self.iteration + 1:
                raise RuntimeError(f"{self.name} is at iteration {self.iteration}, got the update of {rec.iteration}")
            apply_record(self.state, rec, self.cfg, self.anchor, compute_drift=False)
            self.iteration = rec.iteration
            return self.state.checksum() if want_checksum else None

    def load_state(self, masters: dict[str, torch.Tensor], iteration: int) -> str:
        """Take a healthy replica's weights (a replacement catching up); returns the checksum."""
        with self._lock:
            self.state.load_masters(masters)
            self.iteration = iteration
            return self.state.checksum()

    def checksum(self) -> str:
        with self._lock:
            return self.state.checksum()


# --------------------------------------------------------------------- the driver
@dataclass
class WorkerHandle:
    name: str
    actor: Any
    info: dict[str, Any] = field(default_factory=dict)
    ready_ref: Any = None  # set while a (replacement) actor is starting
    info_ref: Any = None
    iteration: int = 0  # the iteration whose weights this replica holds
    expected: str | None = None  # the driver's checksum at that iteration (set while joining)
    members: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    gen_s: float = 0.0

    @property
    def label(self) -> str:
        where = f" pid {self.info['pid']} on {self.info['node']}" if self.info else ""
        return f"{self.name}{where}"


class RayPopulation:
    """Scores each iteration's plan on Ray actors; same rewards as `LocalPopulation`.

    `state` is the driver's own replica (checksums, and the weights a replacement actor
    starts from); `model` is what actors load: a name (`embedded`, a hub id, a directory
    every node sees) or a model object, shipped once.
    """

    def __init__(
        self, cfg: ESConfig, state: WeightState, model: str | torch.nn.Module, tokenizer: Any, task: Any,
        examples: list[Any], prompts: list[list[int]], anchor_path: str | os.PathLike[str] | None = None,
    ) -> None:
        ray = require_ray()
        self.ray = ray
        self.cfg, self.state = cfg, state
        self.anchor_path = str(anchor_path) if anchor_path is not None else None
        self.num_prompts = len(prompts)
        self.hooks: list[Callable[[RayPopulation, int, MemberResult], None]] = []
        self.failures = 0
        self.restarts = 0
        self._next_id = 0
        driver_device = state.device.type
        self.device = driver_device if cfg.worker_device == "auto" else cfg.worker_device
        if self.device != driver_device:
            raise ValueError(
                f"--worker_device {self.device} with the driver on {driver_device}: the driver keeps a "
                f"replica on the workers' device type (CPU and CUDA draw different noise), so pass "
                f"--device {self.device} too"
            )
        self._owns_ray = connect(cfg)
        try:
            self.options = actor_options(cfg, self.device, ray.cluster_resources())
        except ValueError:
            self.close()
            raise
        if not isinstance(model, str):  # a model object without a loadable name: ship a CPU copy once
            import copy

            model = self.ray.put(model if driver_device == "cpu" else copy.deepcopy(model).to("cpu"))
        self._refs = {
            "model": model,
            "tokenizer": ray.put(tokenizer),
            "task": ray.put(task),
            "examples": ray.put(examples),
            "prompts": ray.put(prompts),
        }
        self._snap: tuple[int, str | None, Any] | None = None
        self._update_refs: dict[Any, WorkerHandle] = {}
        self._update_wire = 0
        self._update_check = False
        self.workers: dict[str, WorkerHandle] = {}

    def start(self, iteration: int) -> None:
        """Start the actors once the driver holds the weights after `iteration` (0 or a resume)."""
        for _ in range(self.cfg.workers or 1):
            self._spawn(iteration)
        # Joining compares each replica's checksum with the driver's: same base model, same bits.
        self._await_joining(iteration)
        log.info("Ray workers: %s", ", ".join(w.label for w in self.workers.values()))

    # -------------------------------------------------------------- actor pool
    def live_workers(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.ready_ref is None]

    def _spawn(self, iteration: int) -> WorkerHandle:
        """Start an actor; it joins once it holds the driver's weights after `iteration`."""
        name = f"worker-{self._next_id}"
        self._next_id += 1
        cls = self.ray.remote(ESWorker).options(**self.options)
        actor = cls.remote(
            self.cfg.to_dict(), self._refs["model"], self._refs["tokenizer"], self._refs["task"],
            self._refs["examples"], self._refs["prompts"], self.device, self._threads, name, self.anchor_path,
        )
        handle = WorkerHandle(name, actor, iteration=iteration)
        handle.expected, weights = self._snapshot(iteration, weights=iteration > 0)
        # A fresh run's replica already holds the base weights; a replacement takes the driver's.
        handle.ready_ref = actor.load_state.remote(weights, iteration) if iteration else actor.checksum.remote()
        handle.info_ref = actor.info.remote()
        self.workers[name] = handle
        return handle

    @property
    def _threads(self) -> int | None:
        return self.options.get("num_cpus") if self.device == "cpu" else None

    def _snapshot(self, iteration: int, weights: bool) -> tuple[str | None, Any]:
        """The driver's checksum and (if asked) masters in the object store, while it holds `iteration`.

        Cached per iteration: weights are only shipped when a replica must catch up.
        """
        if self._snap is None or self._snap[0] != iteration:
            checksum = self.state.checksum() if self.cfg.sync_check_steps else None
            self._snap = (iteration, checksum, None)
        if weights and self._snap[2] is None:
            masters = {n: m.detach().to("cpu", copy=True) for n, m in self.state.items()}
            self._snap = (iteration, self._snap[1], self.ray.put(masters))
        return self._snap[1], self._snap[2]

    def _joined(self, handle: WorkerHandle) -> None:
        checksum = self.ray.get(handle.ready_ref)
        handle.info = self.ray.get(handle.info_ref)
        handle.ready_ref = None
        if handle.expected is not None:
            self._check_sync(handle.iteration, {handle.name: checksum}, handle.expected)

    def _await_joining(self, iteration: int, during: int | None = None) -> float:
        """Block until every starting actor is ready; returns the seconds waited.

        `iteration` is what the driver's weights hold now (a replacement of a replacement
        starts from them); `during` is the iteration under way, for messages (default: the
        next one).
        """
        t0 = time.perf_counter()
        while True:
            joining = [w for w in self.workers.values() if w.ready_ref is not None]
            if not joining:
                break
            w = joining[0]
            ready, _ = self.ray.wait([w.ready_ref], timeout=WORKER_START_TIMEOUT_S)
            try:
                if not ready:
                    raise TimeoutError(f"{w.name} did not start within {WORKER_START_TIMEOUT_S:.0f} s")
                self._joined(w)
            except (self.ray.exceptions.RayActorError, TimeoutError) as e:
                self._lose(w, e, during=during if during is not None else iteration + 1, weights_of=iteration)
        if not self.live_workers():
            raise WorkersLostError(self._lost_message(iteration + 1, "no Ray worker could be started"))
        return time.perf_counter() - t0

    def _lose(self, w: WorkerHandle, err: Exception, during: int, weights_of: int) -> None:
        """Forget an actor that died during iteration `during` and start a replacement (a
        bounded number of times) from the driver's weights after iteration `weights_of`."""
        self.failures += 1
        log.warning("Ray worker %s lost during iteration %d: %s", w.label, during, _short(err))
        self.workers.pop(w.name, None)
        try:
            self.ray.kill(w.actor)
        except Exception:  # already gone
            pass
        if self.restarts < MAX_RESTARTS_PER_WORKER * (self.cfg.workers or 1):
            self.restarts += 1
            self._spawn(weights_of)

    def _lost_message(self, iteration: int, why: str) -> str:
        return (
            f"all Ray workers were lost during iteration {iteration} ({why}). The seed log holds "
            f"iterations 1..{iteration - 1}; once the cluster is back, rerun the same command with --resume."
        )

    # --------------------------------------------------------------- iteration
    def max_group(self) -> int:
        """The smallest actor's memory-capped `members_per_batch`: the plan's groups then fit
        every actor, and are the groups in-process scoring would use on the same device."""
        if self.cfg.members_per_batch == 1:
            return 1
        return min(w.info.get("max_group", 1) for w in self.live_workers())

    def score(self, plan: es.IterationPlan) -> PopulationResult:
        ray = self.ray
        iteration, population = plan.iteration, plan.members
        # The full prompt list travels as None: a few bytes instead of one index per prompt.
        subset = None if plan.subset == list(range(self.num_prompts)) else plan.subset
        t_start = time.perf_counter()
        pending = deque(plan.groups)
        results: dict[int, MemberResult] = {}
        inflight: dict[Any, tuple[str, list[int], float]] = {}  # ref -> (worker, members, submitted at)
        wire = 0
        lost_s = 0.0
        for w in self.workers.values():
            w.members = w.tokens = 0
            w.busy_s = w.gen_s = 0.0
        while len(results) < len(population):
            # Dynamic scheduling: any actor with room takes the next group of members.
            for w in self.live_workers():
                while pending and sum(1 for v in inflight.values() if v[0] == w.name) < QUEUE_DEPTH:
                    group = pending.popleft()
                    items = [(i, population[i].seed, population[i].sign) for i in group]
                    wire += len(pickle.dumps((iteration, subset, items)))
                    inflight[w.actor.run_members.remote(iteration, subset, items)] = (w.name, group, time.perf_counter())
            joining = {w.ready_ref: w for w in self.workers.values() if w.ready_ref is not None}
            if not inflight and not joining:
                raise WorkersLostError(self._lost_message(iteration, "every actor died"))
            # Members may legitimately run for long (Ray reports a dead actor's calls as
            # failed), so only a wait on starting actors alone is bounded.
            timeout = None if inflight else WORKER_START_TIMEOUT_S
            ready, _ = ray.wait(list(inflight) + list(joining), num_returns=1, timeout=timeout)
            if not ready:
                raise WorkersLostError(self._lost_message(iteration, f"no actor started within {WORKER_START_TIMEOUT_S:.0f} s"))
            ref = ready[0]
            if ref in joining:
                w = joining[ref]
                try:
                    self._joined(w)
                except self.ray.exceptions.RayActorError as e:
                    self._lose(w, e, during=iteration, weights_of=iteration - 1)
                continue
            name, group, submitted = inflight.pop(ref)
            try:
                batch_results: list[MemberResult] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                # The actor is fine but its call raised: a reward that keeps failing
                # stops the run with its own message, not a Ray traceback.
                if isinstance(getattr(e, "cause", None), RewardFailureError):
                    raise e.cause from None
                raise
            except ray.exceptions.RayActorError as e:
                # Re-queue every group the lost actor held, in their original order.
                lost = [(group, submitted)] + [(g, t) for r, (n, g, t) in inflight.items() if n == name]
                for r in [r for r, v in inflight.items() if v[0] == name]:
                    del inflight[r]
                lost.sort(key=lambda gt: gt[0][0])
                lost_s += sum(time.perf_counter() - t for _, t in lost)
                pending.extendleft(reversed([g for g, _ in lost]))
                w = self.workers.get(name)
                if w is not None:
                    self._lose(w, e, during=iteration, weights_of=iteration - 1)
                continue
            wire += len(pickle.dumps(batch_results))
            w = self.workers.get(name)
            for res in batch_results:
                results[res.index] = res
                if w is not None:
                    w.members += 1
                    w.tokens += res.tokens
                    w.busy_s += res.t_busy
                    w.gen_s += res.t_generation
                for hook in self.hooks:
                    hook(self, iteration, res)
        wall = time.perf_counter() - t_start
        metrics: dict[str, Any] = {
            "workers/live": len(self.live_workers()),
            "workers/failures": self.failures,
            "workers/restarts": self.restarts,
            "time/population_wall": wall,
            "time/failure_lost": lost_s,
            "wire/member_bytes": wire,
        }
        for w in self.workers.values():
            if w.members:
                metrics[f"workers/{w.name}/members_per_s"] = w.members / wall
                metrics[f"workers/{w.name}/tokens_per_s"] = w.tokens / w.gen_s if w.gen_s else 0.0
                metrics[f"workers/{w.name}/idle_s"] = max(0.0, wall - w.busy_s)
                metrics[f"workers/{w.name}/busy_s"] = w.busy_s
                metrics[f"workers/{w.name}/generation_s"] = w.gen_s
        return PopulationResult.from_members(list(results.values()), metrics)

    def begin_update(self, record: IterationRecord) -> None:
        """Send the record to every replica now, so they update while the driver does."""
        it = record.iteration
        check = bool(self.cfg.sync_check_steps) and it % self.cfg.sync_check_steps == 0
        payload = record.to_json()
        stale = [w for w in self.live_workers() if w.iteration == it - 1]
        self._update_wire = len(pickle.dumps(payload)) * len(stale)
        self._update_refs = {w.actor.apply.remote(payload, check): w for w in stale}
        self._update_check = check

    def after_update(self, record: IterationRecord) -> dict[str, Any]:
        """Wait for the replicas' updates; compare checksums every sync_check_steps."""
        it = record.iteration
        t0 = time.perf_counter()
        checksums: dict[str, str] = {}
        self._collect_updates(self._update_refs, it, checksums)
        waited_update = time.perf_counter() - t0
        # Actors that were still starting held iteration it-1 weights: bring them up too.
        joined = self._await_joining(it, during=it)
        late = {w.actor.apply.remote(record.to_json(), self._update_check): w for w in self.live_workers() if w.iteration == it - 1}
        self._collect_updates(late, it, checksums)
        if self._update_check:
            self._check_sync(it, checksums)
        self._update_refs = {}
        return {"wire/update_bytes": self._update_wire, "time/worker_update_wait": waited_update, "time/worker_join": joined}

    def _collect_updates(self, refs: dict[Any, WorkerHandle], it: int, checksums: dict[str, str]) -> None:
        for ref, w in refs.items():
            try:
                checksums[w.name] = self.ray.get(ref)
                w.iteration = it
            except self.ray.exceptions.RayActorError as e:
                # Lost while applying iteration `it`: the replacement starts from the driver's updated weights.
                self._lose(w, e, during=it, weights_of=it)

    def _check_sync(self, iteration: int, checksums: dict[str, str | None], expected: str | None = None) -> None:
        if expected is None:
            expected = self.state.checksum()
        bad = [name for name, c in checksums.items() if c is not None and c != expected]
        if bad:
            labels = ", ".join(self.workers[n].label if n in self.workers else n for n in bad)
            raise WorkerDivergedError(
                f"Ray worker(s) {labels} hold different weights from the driver after iteration "
                f"{iteration} (checksum mismatch). The seed log up to iteration {iteration} is intact: "
                "rerun with --resume to rebuild every replica from it."
            )

    def close(self) -> None:
        for w in getattr(self, "workers", {}).values():
            try:
                self.ray.kill(w.actor)
            except Exception:
                pass
        self.workers = {}
        if self._owns_ray and self.ray.is_initialized():
            self.ray.shutdown()


# --------------------------------------------------------------------- set-up
def connect(cfg: ESConfig) -> bool:
    """Join the cluster at `ray_address`, or start a local one; True if we started it."""
    ray = require_ray()
    if cfg.ray_address and cfg.ray_address != "auto":
        _check_reachable(cfg.ray_address)
    if ray.is_initialized():  # the caller already chose a cluster (e.g. a notebook or a test)
        return False
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    if cfg.ray_address:
        try:
            ray.init(address=cfg.ray_address, runtime_env=runtime_env, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise ConnectionError(
                f"cannot join the Ray cluster at --ray_address {cfg.ray_address}: {e}. Start one with "
                "`ray start --head` (then `ray start --address=HEAD_IP:6379` on other nodes), or "
                "leave --ray_address out to start a local cluster."
            ) from None
        return False
    ray.init(runtime_env=runtime_env, include_dashboard=False, logging_level=logging.WARNING)
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with a clear message, instead of Ray's long connection retries."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray_address must be 'auto' or HOST:PORT (got {address!r})")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ConnectionError(
            f"cannot reach a Ray cluster at --ray_address {address} ({e}). Start the head node "
            "with `ray start --head`, check the address it prints, or use --ray_address auto on "
            "a node of the cluster."
        ) from None


def actor_options(cfg: ESConfig, device: str, resources: dict[str, float]) -> dict[str, Any]:
    """Ray resources per actor, refusing requests the cluster cannot meet (Ray would wait forever)."""
    k = cfg.workers or 1
    if device == "cuda":
        have = resources.get("GPU", 0.0)
        need = k * cfg.gpus_per_worker
        if need > have:
            raise ValueError(
                f"--workers {k} CUDA actors with --gpus_per_worker {cfg.gpus_per_worker:g} need {need:g} "
                f"GPUs, but the Ray cluster has {have:g}: lower --workers, or share GPUs with "
                f"--gpus_per_worker {have / k:.2g} if a replica fits"
            )
        return {"num_gpus": cfg.gpus_per_worker, "num_cpus": 1, "max_concurrency": 2, "max_restarts": 0}
    cpus = resources.get("CPU", float(os.cpu_count() or 1))
    threads = cfg.worker_threads or max(1, int(cpus // k))
    if k * threads > cpus:
        raise ValueError(
            f"--workers {k} CPU actors with {threads} thread(s) each need {k * threads} CPUs, but the "
            f"Ray cluster has {cpus:g}: lower --workers or --worker_threads"
        )
    return {"num_cpus": threads, "max_concurrency": 2, "max_restarts": 0}


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
