"""A discovery run's configuration, in sections, each field with its help text.

:class:`DiscoverConfig` holds the task, model and method, and one section per concern:
:class:`Prompts` (which prompt pairs), :class:`CircuitSize` (what a circuit is and how large),
:class:`Attribution` and :class:`Search` (each method's own options: a method declares the
sections it reads, ``circuitfinder.methods.registry.Method.sections``, as auto-circuit binds each
algorithm's parameters to it), :class:`Execution` (device, precision, batches, workers, checks)
and :class:`Outputs`. Every field is declared once, here, with :func:`option`: the command line's
options (``circuits discover --help`` shows them in these groups) and ``discover(**options)``'s
flat keywords are generated from these declarations, and a checkpoint's key is made of the
sections its method declares (:meth:`DiscoverConfig.key`).

This module holds data only; ``circuitfinder.runs.pipeline.check_config`` checks values against the
tasks, methods and ablations that exist.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from circuitfinder.errors import UserError


def option(default: Any, help: str, flag: str | None = None) -> Any:  # noqa: A002 -- the CLI's word
    """A configuration field: its default, its help text, and its command-line flag when that is not
    ``--the-field-name`` (``n_pairs`` is ``--pairs``)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class Prompts:
    """Which prompt pairs a run uses."""

    title: ClassVar[str] = "Task and prompts"
    n_pairs: int = option(128, "Prompt pairs (half discovery, half held-out).", flag="--pairs")
    seed: int = option(0, "Seed for prompts and their split.")
    bos: str = option(
        "auto",
        "auto: the tokenizer's own rule (SmolLM2 adds no BOS token, Gemma does); always: "
        "prepend it, as the published EAP-IG code does.",
    )
    skip_bad_rows: bool = option(False, "Task files: drop invalid rows instead of refusing the file.")


@dataclass(frozen=True)
class CircuitSize:
    """What a removed edge carries, and how large the circuit is."""

    title: ClassVar[str] = "Circuit and size"
    ablation: str = option(
        "counterfactual",
        "What a removed edge carries: counterfactual (the corrupted prompt), mean (over the task's prompts) or zero.",
    )
    edges: int | None = option(None, "Keep the top N edges by |score|.")
    threshold: float | None = option(None, "Keep every edge with |score| ≥ T.")
    target_faithfulness: float = option(
        0.8,
        "Without --edges/--threshold: attribution keeps its smallest top N "
        "reaching this; a search keeps it on its prompts (the floor).",
    )


@dataclass(frozen=True)
class Attribution:
    """Options of the attribution methods (eap, eap-ig, eap-ig-activations), and of a search's seed."""

    title: ClassVar[str] = "Attribution (eap-ig, eap-ig-activations)"
    ig_steps: int = option(5, "Interpolation steps of EAP-IG.")
    ig_rule: str = option(
        "midpoint",
        "EAP-IG's interpolation points: midpoint ((k+½)/m), left (k/m, k<m: the "
        "published code on inputs) or right (k/m, k≥1: on activations).",
    )


@dataclass(frozen=True)
class Search:
    """Options of the patching searches (acdc-groups, acdc, minimize)."""

    title: ClassVar[str] = "Search (acdc-groups, acdc, minimize)"
    seed_method: str = option(
        "eap-ig",
        "The attribution that orders and bounds the search's candidates; none: "
        "every edge, in graph order (textbook ACDC).",
    )
    seed_faithfulness: float | None = option(
        None,
        "The seed is attribution's smallest top N reaching this on the "
        "discovery prompts (default: halfway from --target-faithfulness to "
        "1), which leaves the search room above the floor.",
    )
    tau: float | None = option(
        None, "Keep a removal when the distance grows by less than τ (default: 1% of the empty circuit's distance)."
    )
    acdc_metric: str = option(
        "task",
        "Distance from the clean run: task (|change of the mean metric|), prompt "
        "(mean per-prompt |change|, which cannot cancel across prompts) or kl (ACDC's own).",
    )
    floor: bool = option(
        True,
        "A removal also needs the circuit to keep --target-faithfulness on the search "
        "prompts (ACDC's rule alone bounds each removal's growth, not their sum); --no-floor: "
        "Conmy et al.'s rule alone.",
    )
    search_prompts: int = option(
        32, "Discovery prompts each candidate is evaluated on (held-out faithfulness is measured on the others)."
    )
    chain: int = option(16, "acdc, minimize: the most candidates evaluated together (speculatively) per chain.")


@dataclass(frozen=True)
class Execution:
    """Where and how a run computes, and the checks it makes."""

    title: ClassVar[str] = "Execution"
    device: str = option("auto", "auto (a GPU when there is one), cpu, cuda, cuda:N or mps.")
    dtype: str = option(
        "auto",
        "The model's dtype: auto (float32 for a search; for attribution alone bfloat16 "
        "where the device computes it natively, the circuit re-measured in float32), float32, "
        "bfloat16, float16 or float64.",
    )
    referee: bool = option(
        True,
        "A search in bfloat16/float16: float32 scores the seed, re-decides the removals "
        "within half precision's error of the threshold and measures the circuit.",
    )
    batch_size: int = option(16, "Prompts per forward pass.")
    workers: int = option(
        0,
        "Ray actors with a model replica each: attribution split by prompt batches, a "
        "search's circuits scored on them (0: in this process).",
    )
    address: str | None = option(None, "Join an existing Ray cluster at this address (with --workers).")
    check_model: bool = option(True, "Verify at load that patching is exact on the model (--no-check-model skips it).")
    force: bool = option(False, "Search even when the model does not show the behaviour.")


@dataclass(frozen=True)
class Outputs:
    """What a run measures beyond its circuit."""

    title: ClassVar[str] = "Outputs"
    curve: bool | None = option(
        None,
        "Faithfulness at the MIB edge fractions (CPR, CMD); by default for "
        "attribution's top N, not after a search (the curve ranks by attribution).",
    )
    roles: bool = option(
        True, "Measure every head's role on the run's prompts (seconds): roles.csv, and the circuit's heads by role."
    )


SECTIONS: dict[str, type] = {
    "prompts": Prompts,
    "size": CircuitSize,
    "attribution": Attribution,
    "search": Search,
    "execution": Execution,
    "outputs": Outputs,
}
DEFAULT_METHOD = "acdc-groups"


@dataclass(frozen=True)
class DiscoverConfig:
    """Everything that decides a discovery run, saved as ``config.json`` beside its results.

    Build it from flat keywords with :meth:`from_options` (``discover(**options)`` does):
    ``DiscoverConfig.from_options(task="ioi", tau=0.01, batch_size=8)``.
    """

    task: str = option("ioi", "Task name (`circuits tasks list`), or a .jsonl/.csv task file.")
    model: str = option("smollm2-135m", "Bundled model name, Hugging Face id or local folder.")
    method: str = option(
        DEFAULT_METHOD,
        "acdc-groups (the minimal faithful circuit), acdc or minimize (patching "
        "searches seeded by --seed-method); eap-ig (attribution's top N: the quick look), eap, "
        "eap-ig-activations; see `circuits methods`.",
    )
    prompts: Prompts = field(default_factory=Prompts)
    size: CircuitSize = field(default_factory=CircuitSize)
    attribution: Attribution = field(default_factory=Attribution)
    search: Search = field(default_factory=Search)
    execution: Execution = field(default_factory=Execution)
    outputs: Outputs = field(default_factory=Outputs)

    @classmethod
    def from_options(cls, **options: Any) -> "DiscoverConfig":
        """A configuration from flat keywords, each a field of the top level or of one section.

        Raises:
            UserError: a keyword that is no field.
        """
        top = {k: options.pop(k) for k in ("task", "model", "method") if k in options}
        sections = {}
        for name, section in SECTIONS.items():
            own = {f.name for f in dataclasses.fields(section)}
            sections[name] = section(**{k: options.pop(k) for k in list(options) if k in own})
        if options:
            known = ", ".join(sorted(flat_fields()))
            raise UserError(f"unknown option {next(iter(options))!r}: use one of {known}", next(iter(options)))
        return cls(**top, **sections)

    @classmethod
    def from_json(cls, data: dict) -> "DiscoverConfig":
        """The configuration saved by :meth:`to_json` (or, flat, by earlier releases)."""
        if not any(isinstance(v, dict) for v in data.values()):
            return cls.from_options(**{k: v for k, v in data.items() if k != "minimize"})
        flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
        for name in SECTIONS:
            flat |= data.get(name, {})
        return cls.from_options(**flat)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Every field by its own name, sections flattened: what :meth:`from_options` takes."""
        out = {k: getattr(self, k) for k in ("task", "model", "method")}
        for name in SECTIONS:
            out |= dataclasses.asdict(getattr(self, name))
        return out

    def replace(self, **options: Any) -> "DiscoverConfig":
        """This configuration with some fields changed, by their flat names."""
        return DiscoverConfig.from_options(**(self.flat() | options))

    def key(self, sections: tuple[str, ...], **extra: Any) -> dict:
        """What decides a result that reads ``sections`` (a checkpoint's key): the task, the model,
        the prompts, the batch size (it moves float sums), those sections, and ``extra``."""
        if extra.keys() & (set(SECTIONS) | {"task", "model", "batch_size"}):
            raise ValueError(f"a key's extra names a part of the key: {sorted(extra)}")
        return {
            "task": self.task,
            "model": self.model,
            "prompts": dataclasses.asdict(self.prompts),
            "batch_size": self.execution.batch_size,
            **{name: dataclasses.asdict(getattr(self, name)) for name in sections},
            **extra,
        }

    def matching_published(self) -> "DiscoverConfig":
        """This configuration with every choice the published EAP-IG code makes (hannamw/EAP-IG):
        the BOS token always prepended, and its interpolation points (``left`` on the inputs,
        ``right`` on activations). Its scores then equal that code's (divided by the prompt count)."""
        rule = "right" if self.method == "eap-ig-activations" else "left"
        return dataclasses.replace(
            self,
            prompts=dataclasses.replace(self.prompts, bos="always"),
            attribution=dataclasses.replace(self.attribution, ig_rule=rule),
        )


def flat_fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Every field by its flat name: ``(its section's name, or None at the top level; the field)``."""
    out: dict[str, tuple[str | None, dataclasses.Field]] = {
        f.name: (None, f) for f in dataclasses.fields(DiscoverConfig) if f.name not in SECTIONS
    }
    for name, section in SECTIONS.items():
        out |= {f.name: (name, f) for f in dataclasses.fields(section)}
    return out
