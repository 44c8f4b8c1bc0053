"""Every method a run can use, by name, behind one signature: ``METHODS[name].find(problem) -> Found``.

* **Attribution** (EAP, Syed et al. 2023; EAP-IG, Hanna et al. 2024) scores every edge in a few
  passes and keeps the top N by |score|, every edge above a threshold, or the smallest top N whose
  exact faithfulness on the discovery prompts reaches the target (:func:`select`); the selection is
  then pruned to input → logits paths.
* **Patching searches** start from an attribution's selection (``config.search.seed_method``) and
  decide edges by exact patching on the discovery prompts (``circuitfinder.methods.search``): ACDC
  (Conmy et al. 2023) keeps a removal when the distance from the clean run grows by less than τ;
  ACDC on groups applies that rule to groups of weak edges, bisected when a group's removal does
  not stand (fewer passes); minimisation removes edges while the circuit keeps the
  target faithfulness.

Each entry says what it supports (ablations, models whose heads share a post-attention norm) and
what it costs, so a run refuses an unsupported combination in one line without branching on a
method's name, and a new method is one entry.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch

from circuitfinder.checkpoint import Checkpoint
from circuitfinder.config import DiscoverConfig
from circuitfinder.engine.ablation import ABLATIONS, Ablation
from circuitfinder.engine.adapter import ModelAdapter
from circuitfinder.engine.faithfulness import CircuitEvaluator, SizeSearch, search_size
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.masks import Mask, edges_above, prune, top_edges
from circuitfinder.engine.precision import PrecisionPlan, dtype_name
from circuitfinder.errors import UserError
from circuitfinder.methods.attribution import AttributionMethod, eap, eap_ig, eap_ig_activations
from circuitfinder.methods.search import SearchOutcome, run_search
from circuitfinder.tasks.base import Task

UNSEEDED = "none"  # seed_method of ACDC over the whole graph, as Conmy et al. ran it


class Reporter:
    """Where a run and its method report: one-line messages and counted progress. Silent by default."""

    def log(self, message: str) -> None:
        pass

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda _n=1: None


@dataclass
class Problem:
    """What a method is given: the model, its edge graph, the task, the run's configuration, the ablation.

    A method reads the sections of ``config`` it declares (:attr:`Method.sections`): ``size``,
    ``attribution``, ``search``, and ``execution`` for batches and workers.
    ``checkpoints`` is the folder under which a search keeps its ``.checkpoints``.
    ``precision``: with ``precision.referee``, the search's passes run in ``precision.passes`` on a
    copy of the model loaded for them, with ``adapter`` (float32) scoring the seed and refereeing
    the search (``circuitfinder.methods.search``); otherwise everything runs on ``adapter``.
    """

    adapter: ModelAdapter
    graph: EdgeGraph
    task: Task
    config: DiscoverConfig
    ablation: Ablation
    reporter: Reporter = dataclasses.field(default_factory=Reporter)
    checkpoints: Path = Path("outputs")
    precision: PrecisionPlan | None = None

    def key(self, sections: tuple[str, ...], **extra) -> dict:
        """What decides a result computed from ``sections`` of the configuration, in this precision."""
        p = self.precision or PrecisionPlan(self.adapter.dtype, self.adapter.dtype)
        return self.config.key(sections, passes=dtype_name(p.passes), referee=p.referee, **extra)


@dataclass(frozen=True)
class Found:
    """What a method found: the scores that rank the edges, the selection and the final circuit."""

    scores: torch.Tensor  # [senders, receivers]; zeros for unseeded ACDC
    selected: Mask  # the selection before pruning or search
    circuit: Mask  # the circuit, pruned
    forward_passes: int
    size_search: SizeSearch | None = None
    search: SearchOutcome | None = None
    ranked: bool = True  # the scores rank the edges (a faithfulness curve over them means something)
    checkpoint: Checkpoint | None = None  # a search's, for the run to clear once its results are saved


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        find: the method, ``(problem) -> Found``.
        description: one line for the help text.
        cost: what it costs, in words (forward passes).
        ablations: the ablations it is defined for.
        post_norm: whether it is defined on models whose heads share a post-attention norm.
        seeded: it starts from the selection of the attribution ``config.search.seed_method``.
        sections: the sections of the configuration it reads (besides the task's and the
            execution's): its options, and what its checkpoint's key is made of.
        score: for attribution, the scoring function ``(adapter, graph, task, batch_size, ...)``.
        forwards_per_batch: for attribution, ``(ig_steps, graph) -> passes`` per batch of prompts.
    """

    find: Callable[[Problem], Found]
    description: str
    cost: str
    ablations: tuple[str, ...] = tuple(ABLATIONS)
    post_norm: bool = True
    seeded: bool = False
    score: AttributionMethod | None = None
    forwards_per_batch: Callable[[int, EdgeGraph], int] | None = None
    sections: tuple[str, ...] = ("size",)

    def refusal(self, name: str, ablation: str, post_norm: bool) -> str | None:
        """Why this method cannot run with ``ablation`` on a model with/without a shared post-norm, or None."""
        if ablation not in self.ablations:
            return (
                f"method {name!r} patches from the {' or '.join(self.ablations)} run only, not the {ablation} "
                f"ablation: use `ablation={self.ablations[0]!r}`"
            )
        if post_norm and not self.post_norm:
            return f"method {name!r} is not defined yet for models whose heads share a post-attention norm"
        return None


def select(problem: Problem, scores: torch.Tensor, target: float | None = None) -> tuple[Mask, SizeSearch | None, int]:
    """The edges to keep before pruning: ``size.edges`` (top N), ``size.threshold``, or the
    smallest top N reaching ``target`` (``size.target_faithfulness`` unless given) on the
    discovery prompts.

    Returns:
        ``(mask, the size search or None, forward passes it used)``.
    """
    s, graph, reporter = problem.config.size, problem.graph, problem.reporter
    target = s.target_faithfulness if target is None else target
    if s.edges is not None:
        return top_edges(graph, scores, s.edges), None, 0
    if s.threshold is not None:
        return edges_above(graph, scores, s.threshold), None, 0
    discovery = CircuitEvaluator(
        problem.adapter, graph, problem.task, "discovery", problem.config.execution.batch_size, problem.ablation
    )
    with reporter.progress(f"size search (target faithfulness {target})", 0) as advance:

        def step(n, kept, f):
            reporter.log(f"  top {n:>6,} edges → {kept:>6,} after pruning: faithfulness {f:.3f} (discovery)")
            advance(1)

        search = search_size(discovery, scores, target, progress=step)
    if not search.reached:
        reporter.log(f"no circuit reached faithfulness {target}; keeping the best size found")
    return top_edges(graph, scores, search.n_edges), search, discovery.forward_passes


def _scores(problem: Problem, name: str) -> tuple[torch.Tensor, int]:
    """Attribution ``name``'s scores on the discovery prompts, and the forward passes they took."""
    e, a, method = problem.config.execution, problem.config.attribution, METHODS[name]
    n_batches = len(list(problem.task.batches("discovery", e.batch_size)))
    if e.workers:  # split by prompt batches over Ray actors, each with its own replica
        from circuitfinder.engine.checks import load_model
        from circuitfinder.methods.pool import ray_scores

        problem.reporter.log(f"{name} scores on {e.workers} Ray worker(s)" + (f" at {e.address}" if e.address else ""))
        load = partial(load_model, problem.config.model, check=False, dtype=problem.adapter.dtype, device=e.device)
        scores = ray_scores(
            load,
            method.score,
            problem.task,
            e.batch_size,
            e.workers,
            e.address,
            steps=a.ig_steps,
            ablation=problem.config.size.ablation,
            ig_rule=a.ig_rule,
        )
        return scores, method.forwards_per_batch(a.ig_steps, problem.graph) * n_batches
    with problem.reporter.progress(f"{name} scores", len(problem.task.indices("discovery"))) as advance:
        scores = method.score(
            problem.adapter,
            problem.graph,
            problem.task,
            e.batch_size,
            progress=advance,
            steps=a.ig_steps,
            ablation=problem.ablation,
            ig_rule=a.ig_rule,
        )
    return scores, method.forwards_per_batch(a.ig_steps, problem.graph) * n_batches


def _attribution(problem: Problem, name: str) -> Found:
    scores, passes = _scores(problem, name)
    selected, size_search, search_passes = select(problem, scores)
    circuit = prune(problem.graph, selected, problem.ablation.is_run)
    return Found(scores, selected, circuit, passes + search_passes, size_search)


def search_key(problem: Problem) -> dict:
    """What decides a search's result (its checkpoint's key): the sections its method declares,
    the method and the precision of its passes."""
    return problem.key(METHODS[problem.config.method].sections, method=problem.config.method)


def seed_key(problem: Problem) -> dict:
    """What decides a search's seed (scores and start circuit): kept in ``.checkpoints`` after the
    run, so a search with another τ or prompt count reuses them."""
    s = problem.config.search
    return problem.key(
        METHODS[s.seed_method].sections if s.seed_method in METHODS else ("size",),
        seed_method=s.seed_method,
        seed_faithfulness=s.seed_faithfulness,
    )


def seed_target(config: DiscoverConfig) -> float:
    """The faithfulness a search's seed reaches on the discovery prompts: ``search.seed_faithfulness``,
    or halfway from the target to 1. A seed at the target itself leaves the search no room above its
    floor (measured: Gemma-3 induction kept 514 edges from a seed at 0.8, 212 from one at 0.9)."""
    chosen = config.search.seed_faithfulness
    return (1 + config.size.target_faithfulness) / 2 if chosen is None else chosen


def _seed(problem: Problem, store: Checkpoint) -> tuple[torch.Tensor, Mask, SizeSearch | None, int, bool]:
    """The search's scores and start circuit: saved earlier, every edge (unseeded), or attribution's."""
    graph, name, reporter = problem.graph, problem.config.search.seed_method, problem.reporter
    saved = store.load_tensors("seed")
    if saved is not None:
        reporter.log(f"reusing {name} scores and start circuit saved in {store.dir}")
        size_search = store.load_json("size_search")
        return (
            saved["scores"],
            saved["chosen"].bool(),
            SizeSearch(**size_search) if size_search else None,
            0,
            name != UNSEEDED,
        )
    if name == UNSEEDED:  # textbook ACDC: every edge a candidate, senders in graph order
        reporter.log("unseeded: every edge of the graph is a candidate, tried in the graph's order")
        return torch.zeros(graph.allowed.shape, device="cpu"), graph.allowed.clone(), None, 0, False
    scores, passes = _scores(problem, name)
    chosen, size_search, search_passes = select(problem, scores, seed_target(problem.config))
    if size_search is not None:
        store.save_json("size_search", dataclasses.asdict(size_search))
    store.save_tensors("seed", {"scores": scores, "chosen": chosen.to(torch.uint8)})
    return scores, chosen, size_search, passes + search_passes, True


def _search(problem: Problem, criterion: str) -> Found:
    """A patching search (``criterion``: ``"acdc"`` or ``"minimize"``), checkpointed after every chain
    (the run clears the checkpoint once its results are saved)."""
    checkpoint = Checkpoint(problem.checkpoints, search_key(problem))
    scores, chosen, size_search, passes, ranked = _seed(problem, Checkpoint(problem.checkpoints, seed_key(problem)))
    try:
        outcome = run_search(problem, criterion, scores, chosen, checkpoint)
    except KeyboardInterrupt:
        problem.reporter.log(f"interrupted: progress is saved in {checkpoint.dir}; rerun the same command to resume")
        raise
    return Found(
        scores, chosen, outcome.circuit, passes + outcome.forward_passes, size_search, outcome, ranked, checkpoint
    )


_IG = "--ig-steps m"
_ATTRIBUTION = ("size", "attribution")
_SEARCH = ("size", "attribution", "search")  # the seed's attribution options too
METHODS: dict[str, Method] = {
    "eap": Method(
        partial(_attribution, name="eap"),
        "EAP (Syed et al. 2023): gradient at the clean run",
        "2 forward passes and 1 backward per batch",
        score=eap,
        forwards_per_batch=lambda steps, graph: 2,
    ),
    "eap-ig": Method(
        partial(_attribution, name="eap-ig"),
        "EAP-IG on inputs (Hanna et al. 2024): gradient averaged over --ig-steps",
        f"2 + m forward passes and m backward per batch ({_IG})",
        score=eap_ig,
        forwards_per_batch=lambda steps, graph: 2 + steps,
        sections=_ATTRIBUTION,
    ),
    "eap-ig-activations": Method(
        partial(_attribution, name="eap-ig-activations"),
        "EAP-IG on activations (MIB): each layer's output interpolated in turn, --ig-steps each",
        f"2 + (2L + 1)·m forward passes and as many backward per batch ({_IG})",
        post_norm=False,
        score=eap_ig_activations,
        forwards_per_batch=lambda steps, graph: 2 + len(graph.sender_points) * steps,
        sections=_ATTRIBUTION,
    ),
    "acdc": Method(
        partial(_search, criterion="acdc"),
        "ACDC (Conmy et al. 2023), seeded by --seed-method: keep a removal when the distance grows by less than τ "
        "(and, with --floor, the default, the circuit keeps the target faithfulness)",
        "the seed's, then one patched forward per candidate edge (several stacked per pass)",
        ablations=("counterfactual",),
        seeded=True,
        sections=_SEARCH,
    ),
    "acdc-groups": Method(
        partial(_search, criterion="acdc-groups"),
        "ACDC on groups of edges, seeded by --seed-method: weak edges removed many at a time "
        "while the distance grows by less than τ and the circuit keeps the target (--floor), groups "
        "bisected when a removal does not stand: the minimal faithful circuit",
        "the seed's, then one patched forward per group tried (groups long among weak edges)",
        ablations=("counterfactual",),
        seeded=True,
        sections=_SEARCH,
    ),
    "minimize": Method(
        partial(_search, criterion="minimize"),
        "Minimisation, seeded by --seed-method: remove edges while the target faithfulness holds",
        "the seed's, then one patched forward per candidate edge (several stacked per pass)",
        ablations=("counterfactual",),
        seeded=True,
        sections=_SEARCH,
    ),
}
ATTRIBUTION = tuple(name for name, m in METHODS.items() if m.score is not None)


def check_method(name: str, seed_method: str, ablation: str) -> None:
    """Refuse an unknown method or seed, or an ablation the method is not defined for.

    Raises:
        UserError: naming the argument to fix.
    """
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}: use one of {', '.join(METHODS)}", "method")
    method = METHODS[name]
    if method.seeded and seed_method not in ATTRIBUTION + (UNSEEDED,):
        raise UserError(
            f"unknown `seed_method` {seed_method!r}: use one of {', '.join(ATTRIBUTION + (UNSEEDED,))}", "seed_method"
        )
    problem = method.refusal(name, ablation, post_norm=False)
    if problem:
        raise UserError(problem, "ablation")
