"""What a run reports: :class:`Summary`, saved as ``summary.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class Summary:
    """A run's figures (``summary.json``): the circuit's size and exact held-out faithfulness, the
    baseline it is measured against, and what the run cost.

    Faithfulness is ``(m(circuit) − m(corrupted)) / (m(clean) − m(corrupted))`` of the task's metric
    ``m`` on the held-out prompts, by exact patching, in ``dtype``.
    """

    model: str
    task: str
    method: str
    ablation: str
    metric: str  # the task's metric, by name
    edges_total: int
    edges_selected: int  # before pruning (attribution's top N; a search's seed)
    edges_kept: int  # the circuit's edges, pruned to input → logits paths
    nodes_kept: int
    faithfulness: float  # held-out, exact, in ``dtype``
    metric_clean: float
    metric_corrupted: float
    metric_circuit: float
    accuracy_clean: float | None  # the clean run prefers the answer to the wrong one, share of held-out prompts
    prompts_discovery: int
    prompts_heldout: int
    target_faithfulness: float
    meets_target: bool
    dtype: str  # the dtype of the reported faithfulness and baseline
    device: str
    precision: dict = dataclasses.field(default_factory=dict)  # PrecisionPlan.to_json(), with what it measured
    forward_passes: int = 0
    seconds: float = 0.0
    size_search_target: float | None = None  # the faithfulness the size search aimed at
    size_search: list[dict] | None = None  # its steps: top_n, edges_kept, faithfulness_discovery
    curve: list[list[float]] | None = None  # [edge fraction, held-out faithfulness]
    cpr: float | None = None
    cmd: float | None = None
    search: dict | None = None  # a search's rule, cost and seed comparison
    heads_by_role: dict[str, list[str]] | None = None
    peak_memory_mb: float | None = None
    finished_at: str | None = None
    finished: bool = True
    out: str | None = None  # the folder it was saved to or loaded from (not saved)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "out"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Summary":
        """A summary read back from ``summary.json`` (fields it does not know are left out)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
