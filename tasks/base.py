"""The shape every task takes: clean/corrupted prompt pairs, answers and a metric.

A task is a set of prompt pairs. Each clean prompt has a corrupted twin of the same token
length that differs only where the behaviour's input differs (for IOI, the second subject's
name). Pairs of different lengths are stored right-padded in one tensor: with causal attention,
padding after a prompt's last token cannot change any earlier position, so the metric read at
`last` (the last real token) is exactly what the unpadded prompt gives. Batches are drawn from
pairs sorted by length, so little compute goes to padding.

Metrics take the logits at the read position and return one value per prompt; the score of a
circuit is their mean.

Some tasks have several correct answers (greater-than: every later year). Such a task also
carries ``answer_sets`` and ``wrong_sets``: token ids ``[n, k]`` padded with ``-1`` (a few
hundred bytes per prompt, never a ``[n, vocab]`` mask). ``answer`` and ``wrong`` stay the single
ids every task has (one member of each set), so code that needs one id per prompt, such as
accuracy (``logits[answer] > logits[wrong]``), works unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Callable, Iterator

import torch
from jaxtyping import Float, Int

from circuitfinder.errors import UserError

Metric = Callable[[Float[torch.Tensor, "batch vocab"], "TaskBatch"], Float[torch.Tensor, " batch"]]


class TaskError(UserError, ValueError):
    """A task that cannot be built from what was given; the message says what to fix."""


@dataclass(frozen=True)
class TaskBatch:
    """A slice of a task's pairs, all tensors on the same device."""

    clean: Int[torch.Tensor, "batch pos"]
    corrupted: Int[torch.Tensor, "batch pos"]
    last: Int[torch.Tensor, " batch"]  # position the metric reads (last real token)
    answer: Int[torch.Tensor, " batch"]
    wrong: Int[torch.Tensor, " batch"]
    answer_sets: Int[torch.Tensor, "batch k"] | None = None  # every correct answer, -1 padded
    wrong_sets: Int[torch.Tensor, "batch k"] | None = None  # every wrong answer, -1 padded

    @property
    def size(self) -> int:
        return self.clean.shape[0]

    def repeat(self, k: int) -> "TaskBatch":
        """The batch stacked ``k`` times along its first axis (to give each copy its own circuit)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return TaskBatch(**{n: None if v is None else v.repeat(k, *[1] * (v.dim() - 1)) for n, v in values.items()})

    def to(self, device: torch.device | str) -> "TaskBatch":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return TaskBatch(**{k: None if v is None else v.to(device) for k, v in values.items()})


def logit_difference(logits: Float[torch.Tensor, "batch vocab"], batch: TaskBatch) -> Float[torch.Tensor, " batch"]:
    """logit(answer) − logit(wrong answer), per prompt (Wang et al. 2022's IOI metric)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, batch.answer] - logits[rows, batch.wrong]


def _set_sum(values: Float[torch.Tensor, "batch vocab"], ids: torch.Tensor) -> Float[torch.Tensor, " batch"]:
    """Sum of ``values`` over each row's ids (``[batch, k]``, ``-1`` = padding, skipped)."""
    picked = values.gather(1, ids.clamp(min=0).to(values.device))  # [batch, k]
    return (picked * (ids >= 0).to(values.device, values.dtype)).sum(-1)


def probability_difference(
    logits: Float[torch.Tensor, "batch vocab"], batch: TaskBatch
) -> Float[torch.Tensor, " batch"]:
    """Σ p(correct answers) − Σ p(wrong answers), per prompt (Hanna et al. 2023's greater-than metric).

    Uses ``answer_sets``/``wrong_sets`` when the batch has them, else the single ``answer``/``wrong``.
    """
    probs = logits.softmax(-1)  # [batch, vocab]
    good = batch.answer[:, None] if batch.answer_sets is None else batch.answer_sets
    bad = batch.wrong[:, None] if batch.wrong_sets is None else batch.wrong_sets
    return _set_sum(probs, good) - _set_sum(probs, bad)


def answer_logprob(logits: Float[torch.Tensor, "batch vocab"], batch: TaskBatch) -> Float[torch.Tensor, " batch"]:
    """log p(answer), per prompt (the negative of the induction loss in Conmy et al. 2023's ACDC)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits.log_softmax(-1)[rows, batch.answer]


@dataclass(frozen=True, repr=False)
class Task:
    """Clean and corrupted prompts of equal shape, with answers, split and metric.

    Attributes:
        name: task name, e.g. ``"ioi"``.
        clean, corrupted: token ids ``[n, pos]``, right-padded with ``pad_id``.
        lengths: real token count of each pair (clean and corrupted agree).
        answer, wrong: the correct and the wrong answer token id of each pair (with answer sets,
            one member of each set).
        split: ``"discovery"`` or ``"heldout"`` for each pair.
        metric: per-prompt metric on logits at the read position.
        metric_name: how the metric is named in outputs.
        texts: the pairs as text (clean, corrupted, answer, wrong), for ``prompts.jsonl``.
        positions: named token positions per pair (e.g. IOI's ``IO``, ``S1``, ``S2``, ``END``).
        answer_sets, wrong_sets: every correct and every wrong answer id of each pair, ``[n, k]``
            padded with ``-1``, for tasks with several answers (both or neither).
        notes: remarks on how the task was built (e.g. rows of a task file that were dropped).
        ranks_answers: whether ``answer`` and ``wrong`` are two outputs the model chooses between,
            so that accuracy (``logits[answer] > logits[wrong]``) means something; False for a
            task whose metric reads a value (a compiled tracr program's numerical output).
    """

    name: str
    clean: Int[torch.Tensor, "n pos"]
    corrupted: Int[torch.Tensor, "n pos"]
    lengths: Int[torch.Tensor, " n"]
    answer: Int[torch.Tensor, " n"]
    wrong: Int[torch.Tensor, " n"]
    split: tuple[str, ...]
    metric: Metric = logit_difference
    metric_name: str = "logit_difference"
    pad_id: int = 0
    texts: tuple[dict, ...] = ()
    positions: dict[str, torch.Tensor] = field(default_factory=dict)
    answer_sets: Int[torch.Tensor, "n k"] | None = None
    wrong_sets: Int[torch.Tensor, "n k"] | None = None
    notes: tuple[str, ...] = ()
    ranks_answers: bool = True

    def __post_init__(self) -> None:
        n = self.clean.shape[0]
        if n == 0:
            raise TaskError(f"task {self.name!r} has no prompt pairs")
        if self.clean.shape != self.corrupted.shape:
            raise TaskError(
                f"task {self.name!r}: clean {tuple(self.clean.shape)} and corrupted "
                f"{tuple(self.corrupted.shape)} token tensors differ in shape"
            )
        for label, t in (("lengths", self.lengths), ("answer", self.answer), ("wrong", self.wrong)):
            if t.shape != (n,):
                raise TaskError(f"task {self.name!r}: {label} has shape {tuple(t.shape)}, expected ({n},)")
        if len(self.split) != n or not set(self.split) <= {"discovery", "heldout"}:
            raise TaskError(f"task {self.name!r}: split must give 'discovery' or 'heldout' for each of {n} pairs")
        if self.texts and len(self.texts) != n:
            raise TaskError(f"task {self.name!r}: {len(self.texts)} texts for {n} pairs")
        if int(self.lengths.min()) < 1 or int(self.lengths.max()) > self.clean.shape[1]:
            raise TaskError(f"task {self.name!r}: prompt lengths out of range")
        if (self.answer_sets is None) != (self.wrong_sets is None):
            raise TaskError(f"task {self.name!r}: give both answer_sets and wrong_sets, or neither")
        for label, single in (("answer_sets", self.answer), ("wrong_sets", self.wrong)):
            sets = getattr(self, label)
            if sets is None:
                continue
            if sets.dim() != 2 or sets.shape[0] != n or sets.dtype != torch.long:
                raise TaskError(
                    f"task {self.name!r}: {label} must be a LongTensor [{n}, k]; got {tuple(sets.shape)} {sets.dtype}"
                )
            if int(sets.min()) < -1 or not bool((sets == single[:, None]).any(1).all()):
                raise TaskError(f"task {self.name!r}: each row of {label} must hold its single id (padding is -1)")

    def __len__(self) -> int:
        return self.clean.shape[0]

    def __repr__(self) -> str:
        n_disc = sum(s == "discovery" for s in self.split)
        example = f", e.g. {self.texts[0]['clean']!r} → {self.texts[0]['answer']!r}" if self.texts else ""
        return (
            f"Task({self.name}: {len(self)} prompt pairs ({n_disc} discovery, {len(self) - n_disc} held-out) "
            f"of {self.clean.shape[1]} tokens, metric {self.metric_name}{example})"
        )

    def with_bos(self, bos_id: int) -> "Task":
        """The same pairs with ``bos_id`` prepended to every prompt, unless every prompt starts with it.

        The published EAP-IG code always prepends the BOS token (TransformerLens's
        ``prepend_bos``); a tokenizer that adds none by default (SmolLM2's) gives different prompts.
        Named positions and lengths move by one; the texts are unchanged.
        """
        if bool((self.clean[:, 0] == bos_id).all() and (self.corrupted[:, 0] == bos_id).all()):
            return self
        column = torch.full((len(self), 1), bos_id, dtype=self.clean.dtype, device="cpu")
        return dataclasses.replace(
            self,
            clean=torch.cat([column, self.clean], 1),
            corrupted=torch.cat([column, self.corrupted], 1),
            lengths=self.lengths + 1,
            positions={k: v + 1 for k, v in self.positions.items()},
            notes=(*self.notes, f"BOS token {bos_id} prepended to every prompt"),
        )

    def indices(self, split: str | None = None) -> list[int]:
        """Indices of the pairs in ``split`` (all pairs when None)."""
        return [i for i, s in enumerate(self.split) if split is None or s == split]

    def batches(self, split: str | None = None, batch_size: int = 16, limit: int | None = None) -> Iterator[TaskBatch]:
        """Batches of the pairs in ``split`` (its first ``limit`` pairs if given; pairs are stored in
        random order), grouped by length and trimmed to their longest prompt."""
        idx = sorted(self.indices(split)[:limit], key=lambda i: (int(self.lengths[i]), i))
        for start in range(0, len(idx), batch_size):
            sel = torch.tensor(idx[start : start + batch_size], device="cpu")
            width = int(self.lengths[sel].max())
            yield TaskBatch(
                clean=self.clean[sel, :width],
                corrupted=self.corrupted[sel, :width],
                last=self.lengths[sel] - 1,
                answer=self.answer[sel],
                wrong=self.wrong[sel],
                answer_sets=None if self.answer_sets is None else self.answer_sets[sel],
                wrong_sets=None if self.wrong_sets is None else self.wrong_sets[sel],
            )


def pad_id_of(tokenizer) -> int:
    """The id that right-pads prompts: the tokenizer's pad token, else its end-of-text token, else 0."""
    return next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)


def stack_pairs(
    pairs: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad lists of (clean ids, corrupted ids) into two ``[n, pos]`` tensors and their lengths.

    Raises:
        TaskError: if a clean prompt and its corrupted twin differ in token length.
    """
    for k, (c, x) in enumerate(pairs):
        if len(c) != len(x):
            raise TaskError(f"pair {k}: clean has {len(c)} tokens, corrupted {len(x)}; they must be equal")
    width = max(len(c) for c, _ in pairs)
    clean = torch.full((len(pairs), width), pad_id, dtype=torch.long, device="cpu")
    corrupted = clean.clone()
    for k, (c, x) in enumerate(pairs):
        clean[k, : len(c)] = torch.tensor(c, device="cpu")
        corrupted[k, : len(x)] = torch.tensor(x, device="cpu")
    lengths = torch.tensor([len(c) for c, _ in pairs], device="cpu")
    return clean, corrupted, lengths


def split_labels(n: int, heldout_fraction: float, generator: torch.Generator) -> tuple[str, ...]:
    """A random discovery/held-out split of ``n`` pairs (at least one pair on each side when n ≥ 2)."""
    n_heldout = min(max(1, round(n * heldout_fraction)), n - 1) if n >= 2 else 0
    order = torch.randperm(n, generator=generator, device="cpu").tolist()
    heldout = set(order[:n_heldout])
    return tuple("heldout" if i in heldout else "discovery" for i in range(n))


def pad_sets(sets: list[list[int]]) -> torch.Tensor:
    """Lists of token ids as one ``[n, k]`` LongTensor, right-padded with ``-1``."""
    out = torch.full((len(sets), max(len(s) for s in sets)), -1, dtype=torch.long, device="cpu")
    for i, s in enumerate(sets):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long, device="cpu")
    return out
