"""circuitfinder: edge-level circuit discovery for transformer language models.

The dozen names a notebook needs, from model to diagram::

    import circuitfinder as cf

    model = cf.load_model("smollm2-135m")      # checked at load: patching must be exact on it
    run = cf.discover(model, "ioi")             # attribution, circuit, exact held-out faithfulness
    run.circuit                                 # a notebook draws it
    run.save("outputs/ioi")

Layers, bottom to top (a module imports only from its own layer or those below; a test checks):

1. ``circuitfinder.errors``, ``.config``, ``.folders``, ``.checkpoint``: errors, the run's
   configuration, and files written whole;
2. ``circuitfinder.tasks``: prompt pairs and metrics (the folder ``tasks/``);
3. ``circuitfinder.engine``: the model adapter (the only code that calls TransformerLens), the
   edge graph, exact patching, the circuit evaluator, the check at load;
4. ``circuitfinder.methods``: attribution (EAP, EAP-IG) and the patching searches (ACDC);
5. ``circuitfinder.graphs``: the :class:`Circuit` object, its files, tables, roles, comparison
   and diagrams (the folder ``graphs/``);
6. ``circuitfinder.runs`` and ``circuitfinder.cli``: runs as objects, sweeps, the command line.

Names are imported when first used, so ``import circuitfinder`` is cheap and has no side effects.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "load_model": "circuitfinder.engine.checks:load_model",
    "ModelAdapter": "circuitfinder.engine.adapter:ModelAdapter",
    "EdgeGraph": "circuitfinder.engine.graph:EdgeGraph",
    "CircuitEvaluator": "circuitfinder.engine.faithfulness:CircuitEvaluator",
    "Task": "circuitfinder.tasks:Task",
    "TASKS": "circuitfinder.tasks:TASKS",
    "build_task": "circuitfinder.tasks:build_task",
    "METHODS": "circuitfinder.methods.registry:METHODS",
    "Circuit": "circuitfinder.graphs.circuit:Circuit",
    "load_circuit": "circuitfinder.graphs.circuit:load_circuit",
    "compare_circuits": "circuitfinder.graphs.compare:compare_circuits",
    "discover": "circuitfinder.runs.run:discover",
    "Run": "circuitfinder.runs.run:Run",
    "DiscoverConfig": "circuitfinder.config:DiscoverConfig",
    "Summary": "circuitfinder.runs.summary:Summary",
    "UserError": "circuitfinder.errors:UserError",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'circuitfinder' has no attribute {name!r}")
    module, _, attribute = _EXPORTS[name].partition(":")
    value = getattr(import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
