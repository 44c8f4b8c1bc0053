"""Matching the published EAP-IG code (hannamw/EAP-IG) when asked: the BOS token prepended and the
``left`` interpolation points give that code's formula, re-implemented here without the engine.

The published formula for EAP-IG on the inputs, per prompt i of N and m steps:

    score(s → r) = (1/N) Σ_i (1/m) Σ_{k=0}^{m-1} Σ_pos (corrupted_s − clean_s) · ∂metric_i/∂(input of r),
    gradient taken with the input embedding at corrupted + (k/m)(clean − corrupted)

(the code divides once more by N; this project reports the mean over prompts once). The reference
below runs the bridge directly, one unpadded prompt at a time, with plain ``retain_grad``: no
patching engine, no attribution module, no batching.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny, tiny_task  # noqa: F401 (fixture)

from circuitfinder.config import DiscoverConfig
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.methods.attribution import eap_ig, ig_alphas

BOS = 0  # the tiny tokenizer's BOS id ("w0")


def published_eap_ig(adapter, task, steps: int) -> dict[str, float]:
    """Every edge's score by the published formula (module docstring), keyed by edge name."""
    bridge, L, H, G = adapter.bridge, adapter.shape.n_layers, adapter.shape.n_heads, adapter.shape.n_kv_groups
    senders = ["blocks.0.hook_resid_pre"] + [
        n for l in range(L) for n in (f"blocks.{l}.attn.hook_result", f"blocks.{l}.hook_mlp_out")
    ]
    receivers = [
        n
        for l in range(L)
        for n in (
            f"blocks.{l}.hook_q_input",
            f"blocks.{l}.hook_k_input",
            f"blocks.{l}.hook_v_input",
            f"blocks.{l}.hook_mlp_in",
        )
    ] + ["ln_final.hook_in"]
    totals: dict[str, float] = {}
    n = len(task)
    for i in range(n):
        length = int(task.lengths[i])
        clean, corrupted = task.clean[i : i + 1, :length], task.corrupted[i : i + 1, :length]
        with torch.no_grad():
            _, c_cache = bridge.run_with_cache(clean, names_filter=lambda x: x in senders)
            _, x_cache = bridge.run_with_cache(corrupted, names_filter=lambda x: x in senders)
        diff = {name: x_cache[name] - c_cache[name] for name in senders}  # [1, pos, (heads,) d]
        grads = {name: 0.0 for name in receivers}
        for alpha in [k / steps for k in range(steps)]:
            kept = {}

            def interpolate(x, hook=None, alpha=alpha):
                return (x_cache[senders[0]] + alpha * (c_cache[senders[0]] - x_cache[senders[0]])).requires_grad_(True)

            def keep(name):
                def hook(x, hook=None):
                    x = x.clone()  # the receiver's own copy: its gradient comes from what reads it alone
                    x.retain_grad()
                    kept[name] = x
                    return x

                return hook

            hooks = [(senders[0], interpolate)] + [(name, keep(name)) for name in receivers]
            with bridge.hooks(fwd_hooks=hooks, reset_hooks_end=True):
                logits = bridge(clean, return_type="logits")[0, length - 1]
                (logits[task.answer[i]] - logits[task.wrong[i]]).backward()
            for name in receivers:
                grads[name] = grads[name] + kept[name].grad.detach() / steps
        for s_name in senders:
            values = diff[s_name][0]  # [pos, d] or [pos, heads, d]
            per_sender = [values] if values.dim() == 2 else [values[:, h] for h in range(values.shape[1])]
            s_labels = (
                ["input"]
                if s_name == senders[0]
                else [f"a{s_name.split('.')[1]}.h{h}" for h in range(H)]
                if "attn" in s_name
                else [f"m{s_name.split('.')[1]}"]
            )
            for label, v in zip(s_labels, per_sender):
                for r_name in receivers:
                    g = grads[r_name][0]  # [pos, d] or [pos, k, d]
                    layer = r_name.split(".")[1]
                    if r_name == "ln_final.hook_in":
                        r_labels, columns = ["logits"], [g]
                    elif r_name.endswith("mlp_in"):
                        r_labels, columns = [f"m{layer}"], [g]
                    elif r_name.endswith("q_input"):
                        r_labels, columns = [f"a{layer}.h{h}<q>" for h in range(H)], [g[:, h] for h in range(H)]
                    else:
                        kind = "k" if "k_input" in r_name else "v"
                        r_labels, columns = [f"a{layer}.g{j}<{kind}>" for j in range(G)], [g[:, j] for j in range(G)]
                    for r_label, column in zip(r_labels, columns):
                        edge = f"{label}->{r_label}"
                        totals[edge] = totals.get(edge, 0.0) + float((v * column).sum()) / n
    return totals


def test_left_rule_with_bos_equals_the_published_formula(tiny):
    if tiny.shape.post_norm:
        pytest.skip("the published code has no rule for a head's share of a post-attention norm")
    task = tiny_task().with_bos(BOS)
    assert bool((task.clean[:, 0] == BOS).all()) and task.with_bos(BOS) is task  # prepended once
    graph = EdgeGraph(tiny.shape)
    steps = 3
    scores = eap_ig(tiny, graph, task, batch_size=3, steps=steps, ig_rule="left")
    reference = published_eap_ig(tiny, task, steps)
    names = [graph.edge_name(s, r) for s, r in torch.nonzero(graph.allowed).tolist()]
    got = torch.tensor([float(scores[graph.edge_index(e)]) for e in names], dtype=torch.float64)
    want = torch.tensor([reference[e] for e in names], dtype=torch.float64)
    assert want.abs().max() > 1e-3  # the scores are not all zero: the comparison can fail
    rtol = (
        1e-9 if tiny.working_dtype == torch.float64 else 1e-5
    )  # Llama's float32 islands (circuitfinder.engine.precision)
    bad = [(e, float(a), float(b)) for e, a, b in zip(names, got, want) if abs(a - b) > rtol * float(want.abs().max())]
    assert not bad, bad[:8]
    # the default midpoint rule gives other scores, so the rule matters
    midpoint = eap_ig(tiny, graph, task, batch_size=3, steps=steps)
    assert (midpoint[graph.allowed] - scores[graph.allowed]).abs().max() > 1e-4


def test_the_rules_and_the_published_switch():
    assert ig_alphas(4) == (0.125, 0.375, 0.625, 0.875)
    assert ig_alphas(4, "left") == (0.0, 0.25, 0.5, 0.75)
    assert ig_alphas(4, "right") == (0.25, 0.5, 0.75, 1.0)
    with pytest.raises(ValueError, match="rule"):
        ig_alphas(4, "trapezoid")
    published = DiscoverConfig.from_options(method="eap-ig").matching_published()
    assert (published.prompts.bos, published.attribution.ig_rule) == ("always", "left")
    assert DiscoverConfig.from_options(method="eap-ig-activations").matching_published().attribution.ig_rule == "right"
    assert published.replace(bos="auto") == DiscoverConfig.from_options(method="eap-ig", ig_rule="left")


def test_match_published_on_the_command_line(tiny_model_dir, tmp_path, capsys):
    import json

    from cli_runner import run_in_process

    out = tmp_path / "run"
    code, _, err = run_in_process(
        capsys,
        "discover",
        "--task",
        "ioi",
        "--model",
        str(tiny_model_dir),
        "--method",
        "eap-ig",
        "--match-published",
        "--pairs",
        "8",
        "--batch-size",
        "8",
        "--edges",
        "20",
        "--no-curve",
        "--force",
        "--out",
        str(out),
    )
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert (config["prompts"]["bos"], config["attribution"]["ig_rule"], config["method"]) == (
        "always",
        "left",
        "eap-ig",
    )
    code, _, err = run_in_process(
        capsys,
        "discover",
        "--task",
        "ioi",
        "--model",
        str(tiny_model_dir),
        "--ig-rule",
        "simpson",
        "--out",
        str(tmp_path / "bad"),
    )
    assert code == 2 and "--ig-rule must be one of midpoint, left, right" in err
    code, _, err = run_in_process(
        capsys,
        "discover",
        "--task",
        "ioi",
        "--model",
        str(tiny_model_dir),
        "--bos",
        "sometimes",
        "--out",
        str(tmp_path / "bad-bos"),
    )
    assert code == 2 and "--bos must be auto or always" in err
