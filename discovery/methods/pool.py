"""Where stacks of circuits are scored: in this process, or on Ray actors holding model replicas.

Both pools cut a stack into the same fixed chunks of ``chunk`` circuits and score each chunk with
a :class:`~circuitfinder.engine.faithfulness.CircuitEvaluator` built from the same :class:`EvaluatorSpec`, so every
circuit is computed in the same company and a search finds the same circuit whatever the number
of workers. On Ray, each actor loads the model itself (from the local cache for bundled models),
runs the corrupted and clean prompts once, and then scores chunks; an actor that dies is
restarted by Ray and its chunk retried (``max_restarts``/``max_task_retries``), so a lost worker
costs time, not results. Ray (Moritz et al. 2018) starts in a few seconds per worker: the
in-process pool is the default for one machine's small jobs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from circuitfinder.engine.adapter import ModelAdapter
from circuitfinder.engine.faithfulness import CircuitEvaluator, Scores
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.tasks.base import Task


@dataclass(frozen=True)
class EvaluatorSpec:
    """What a worker needs to build its evaluator: a model loader and the prompts (all picklable):
    the first ``limit`` discovery prompts of ``task``, in batches of ``batch_size``."""

    load: Callable[[], ModelAdapter]
    task: Task
    batch_size: int
    limit: int | None = None
    distance: str = "kl"
    max_rows: int = 32
    reuse: int = 0  # passes kept per batch for circuits evaluated alone (CircuitEvaluator ``reuse``)

    def build(self, adapter: ModelAdapter | None = None) -> CircuitEvaluator:
        adapter = adapter if adapter is not None else self.load()
        return CircuitEvaluator(
            adapter,
            EdgeGraph(adapter.shape),
            self.task,
            "discovery",
            self.batch_size,
            limit=self.limit,
            distance=self.distance,
            max_rows=self.max_rows,
            reuse=self.reuse,
        )


def _concat(parts: list[Scores]) -> Scores:
    return Scores(torch.cat([p.metric for p in parts]), torch.cat([p.distance for p in parts]))


class InProcessPool:
    """Scores chunks one after another with a scorer in this process."""

    workers = 0

    def __init__(self, scorer: CircuitEvaluator, chunk: int):
        self.scorer, self.chunk = scorer, chunk

    @property
    def forward_passes(self) -> int:
        return self.scorer.forward_passes

    def __call__(self, circuits: torch.Tensor) -> Scores:
        return _concat(
            [self.scorer.evaluate(circuits[i : i + self.chunk]) for i in range(0, len(circuits), self.chunk)]
        )

    def close(self) -> None:
        pass


class _Actor:
    def __init__(self, spec: EvaluatorSpec, threads: int):
        torch.set_num_threads(threads)
        self.scorer = spec.build()

    def pid(self) -> int:
        return os.getpid()

    def score(self, packed: torch.Tensor, shape: tuple[int, ...]) -> tuple[Scores, int]:
        before = self.scorer.forward_passes
        circuits = _unpack(packed, shape)
        return self.scorer.evaluate(circuits), self.scorer.forward_passes - before


def _pack(circuits: torch.Tensor) -> torch.Tensor:
    """Bool circuits as bytes, 8 edges a byte (a chunk of SmolLM2 circuits is a few hundred kB)."""
    flat = circuits.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-len(flat)) % 8)]).view(-1, 8)
    return (flat << torch.arange(8, dtype=torch.uint8, device="cpu")).sum(1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device="cpu")) & 1
    n = 1
    for s in shape:
        n *= s
    return bits.flatten()[:n].view(shape).bool()


class RayPool:
    """Scores chunks on ``workers`` Ray actors, each with its own model replica.

    Args:
        spec: how each actor builds its scorer.
        workers: actors to start.
        address: an existing Ray cluster to join (``ray://…`` or ``host:port``); None starts a
            local instance with ``workers`` CPUs.
        threads: torch threads per actor.
    """

    def __init__(self, spec: EvaluatorSpec, workers: int, chunk: int, address: str | None = None, threads: int = 1):
        import ray

        self.chunk, self.workers = chunk, workers
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            kwargs = (
                {"address": address}
                if address
                else {"address": "local", "num_cpus": workers, "include_dashboard": False}
            )
            ray.init(log_to_driver=False, configure_logging=False, **kwargs)
        actor = ray.remote(num_cpus=threads, max_restarts=-1, max_task_retries=-1)(_Actor)
        self.actors = [actor.remote(spec, threads) for _ in range(workers)]
        self.pids = ray.get([a.pid.remote() for a in self.actors])  # wait until every replica is ready
        self.forward_passes = 0

    def __call__(self, circuits: torch.Tensor) -> Scores:
        import ray

        chunks = [circuits[i : i + self.chunk] for i in range(0, len(circuits), self.chunk)]
        futures = [self.actors[i % self.workers].score.remote(_pack(c), tuple(c.shape)) for i, c in enumerate(chunks)]
        results = ray.get(futures)
        self.forward_passes += sum(passes for _, passes in results)
        return _concat([scores for scores, _ in results])

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        if self._started_ray:
            ray.shutdown()


class _Replica:
    """A Ray actor holding one model replica, for work split by prompt batches."""

    def __init__(self, load: Callable[[], ModelAdapter], threads: int):
        torch.set_num_threads(threads)
        self.adapter = load()

    def scores(self, method: Callable, task: Task, batch_size: int, shard: tuple[int, int], **options) -> torch.Tensor:
        return method(self.adapter, EdgeGraph(self.adapter.shape), task, batch_size, shard=shard, **options)

    def metrics(
        self,
        task: Task,
        split: str,
        batch_size: int,
        ablation: str,
        shard: tuple[int, int],
        packed: torch.Tensor,
        shape: tuple[int, ...],
    ) -> tuple[list[float], int]:
        """Each circuit's mean metric on this shard's prompts, and how many prompts that is."""
        graph = EdgeGraph(self.adapter.shape)
        evaluator = CircuitEvaluator(self.adapter, graph, task, split, batch_size, ablation, shard=shard)
        return evaluator.metrics(list(_unpack(packed, shape))), evaluator.n


def _on_replicas(
    load: Callable[[], ModelAdapter], workers: int, address: str | None, threads: int, call: Callable
) -> list:
    """``call(actor, k)`` on each of ``workers`` :class:`_Replica` actors (one GPU each where the
    cluster has a GPU for each), their results in order; Ray is started here unless it runs."""
    import ray

    started = not ray.is_initialized()
    if started:
        kwargs = (
            {"address": address}
            if address
            else {"address": "local", "num_cpus": workers * threads, "include_dashboard": False}
        )
        ray.init(log_to_driver=False, configure_logging=False, **kwargs)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= workers else 0
    actor = ray.remote(num_cpus=threads, num_gpus=gpus)(_Replica)
    actors = [actor.remote(load, threads) for _ in range(workers)]
    try:
        return ray.get([call(a, k) for k, a in enumerate(actors)])
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()


def ray_scores(
    load: Callable[[], ModelAdapter],
    method: Callable,
    task: Task,
    batch_size: int,
    workers: int,
    address: str | None = None,
    threads: int = 1,
    **options,
) -> torch.Tensor:
    """Attribution split by prompt batches over ``workers`` Ray actors (each loads its own model
    replica): actor k sums batches k, k + workers, … (``shard``), and their scores are added here.
    ``method`` is an attribution function (``eap``, ``eap_ig``, ...); ``options`` its keywords
    (``steps``, ``ablation`` by name, ``ig_rule``)."""
    parts = _on_replicas(
        load, workers, address, threads, lambda a, k: a.scores.remote(method, task, batch_size, (k, workers), **options)
    )
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


def ray_metrics(
    load: Callable[[], ModelAdapter],
    task: Task,
    split: str,
    batch_size: int,
    workers: int,
    address: str | None,
    ablation: str,
    circuits: list[torch.Tensor],
    threads: int = 1,
) -> list[float]:
    """Each circuit's mean metric on ``split``'s prompts, split by prompt batches over ``workers``
    Ray actors as :func:`ray_scores` splits attribution: actor k evaluates every circuit on batches
    k, k + workers, …, and the shares' means are weighted by their prompt counts here (the
    faithfulness curve over workers)."""
    workers = min(workers, len(list(task.batches(split, batch_size))))  # no actor without prompts
    stack = torch.stack([c.to("cpu", torch.bool) for c in circuits])
    packed, shape = _pack(stack), tuple(stack.shape)
    parts = _on_replicas(
        load,
        workers,
        address,
        threads,
        lambda a, k: a.metrics.remote(task, split, batch_size, ablation, (k, workers), packed, shape),
    )
    n = sum(count for _, count in parts)
    return [sum(means[i] * count for means, count in parts) / n for i in range(len(circuits))]
