"""The run's configuration: sections, the options generated from them, checkpoint keys, the precision plan."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import typer

from circuitfinder.cli import SWEEP_OWN, app
from circuitfinder.config import SECTIONS, DiscoverConfig, flat_fields
from circuitfinder.engine import precision
from circuitfinder.engine.precision import given_precision, plan_precision
from circuitfinder.errors import UserError
from circuitfinder.methods.registry import METHODS, Problem, search_key, seed_key


def _options(command: str) -> dict[str, object]:
    """The click parameters of a ``circuits`` subcommand, by name."""
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}


def test_every_field_is_an_option_of_discover_with_its_help_and_section():
    options = _options("discover")
    fields = flat_fields()
    missing = [name for name in fields if name not in options]
    assert missing == [], f"fields without a --option: {missing}"
    for name, (section, field) in fields.items():
        assert field.metadata["help"], name
        assert options[name].help == field.metadata["help"]
        panel = SECTIONS[section].title if section else "Task, model and method"
        assert options[name].rich_help_panel == panel
    assert "--pairs" in options["n_pairs"].opts and "--no-check-model" in options["check_model"].secondary_opts


def test_every_field_but_the_sweeps_own_is_an_option_of_sweep():
    options = _options("sweep")
    missing = [name for name in flat_fields() if name not in options and name not in SWEEP_OWN]
    assert missing == []
    assert options["workers"].help.startswith("Runs at once")  # the sweep's own --workers, not a run's Ray actors


def test_field_names_are_unique_across_sections_and_flat_keywords_round_trip():
    names = [f.name for section in SECTIONS.values() for f in dataclasses.fields(section)]
    assert len(names) == len(set(names)) and not set(names) & {"task", "model", "method"}
    config = DiscoverConfig.from_options(
        task="induction", tau=0.02, n_pairs=64, dtype="float64", curve=True, ig_steps=3
    )
    assert (
        config.search.tau,
        config.prompts.n_pairs,
        config.execution.dtype,
        config.outputs.curve,
        config.attribution.ig_steps,
    ) == (0.02, 64, "float64", True, 3)
    assert DiscoverConfig.from_options(**config.flat()) == config
    assert DiscoverConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert config.replace(tau=0.5).search.tau == 0.5 and config.replace(tau=0.5).prompts == config.prompts
    with pytest.raises(UserError, match="unknown option 'taus'"):
        DiscoverConfig.from_options(taus=1)


def test_a_flat_config_json_of_earlier_releases_still_loads():
    flat = {
        "task": "ioi",
        "model": "smollm2-135m",
        "method": "eap",
        "edges": 20,
        "n_pairs": 32,
        "minimize": False,
        "batch_size": 8,
        "check_model": False,
    }
    config = DiscoverConfig.from_json(flat)
    assert (config.size.edges, config.prompts.n_pairs, config.execution.batch_size, config.execution.check_model) == (
        20,
        32,
        8,
        False,
    )


def _problem(**options) -> Problem:
    config = DiscoverConfig.from_options(method="acdc-groups", **options)
    adapter = type("Loaded", (), {"dtype": torch.float32})()
    return Problem(adapter, None, None, config, None)


def test_checkpoint_keys_hold_what_the_method_declares_and_nothing_else():
    base = _problem()
    assert METHODS["acdc-groups"].sections == ("size", "attribution", "search")
    for where_it_runs in (
        {"workers": 2},
        {"curve": True},
        {"roles": False},
        {"device": "cpu"},
        {"force": True},
        {"check_model": False},
    ):
        assert search_key(_problem(**where_it_runs)) == search_key(base), where_it_runs
        assert seed_key(_problem(**where_it_runs)) == seed_key(base), where_it_runs
    for decides in ({"tau": 0.1}, {"search_prompts": 8}, {"chain": 4}, {"floor": False}):
        assert search_key(_problem(**decides)) != search_key(base), decides
        assert seed_key(_problem(**decides)) == seed_key(base), decides  # a new τ reuses the seed
    for decides in ({"ig_steps": 3}, {"n_pairs": 64}, {"edges": 40}, {"seed_method": "eap"}, {"batch_size": 8}):
        assert search_key(_problem(**decides)) != search_key(base) and seed_key(_problem(**decides)) != seed_key(base)


@pytest.mark.parametrize(
    "requested, native, searching, want",
    [
        ("auto", True, True, (torch.float32, torch.float32, False, False)),  # a search in float32
        ("auto", True, False, (torch.bfloat16, torch.bfloat16, False, True)),  # attribution in bfloat16, re-measured
        ("auto", False, False, (torch.float32, torch.float32, False, False)),
        ("bfloat16", False, True, (torch.float32, torch.bfloat16, True, False)),  # refereed by float32
        ("bfloat16", False, False, (torch.bfloat16, torch.bfloat16, False, False)),
        ("float64", False, True, (torch.float64, torch.float64, False, False)),
    ],
)
def test_the_precision_plan_is_decided_once_with_its_reason(requested, native, searching, want, monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: native)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "hidden_size": 16,
                "intermediate_size": 32,
                "vocab_size": 100,
            }
        )
    )
    plan = plan_precision(requested, torch.device("cpu"), str(tmp_path), searching, referee=True)
    assert (plan.model, plan.passes, plan.referee, plan.remeasure) == want
    assert bool(plan.why) == (plan.referee or plan.remeasure or requested == "auto" and native)  # a choice says why
    assert plan_precision("bfloat16", torch.device("cpu"), str(tmp_path), True, referee=False).referee is False
    alone = given_precision(torch.bfloat16, searching=True)
    assert not alone.referee and "alone" in alone.why
