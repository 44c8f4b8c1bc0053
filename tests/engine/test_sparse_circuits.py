"""Random sparse circuits on every architecture of the matrix, through every pass that patches.

The product's circuits are sparse, and a shortcut can be exact on single edges and on the full
and empty circuits while wrong on everything between them (the running total ``Σ_removed =
Σ_all − Σ_kept`` was, on parallel blocks: there the MLP of layer l reads after its own layer's
heads have fired, and those heads are not its edges). So the engine is compared here with a slow
reference written for the test, which adds each removed edge's ``corrupted − current`` term to
its receiver one at a time (no running total, no stacking, no resumed blocks):

* circuits keeping 1 % to 99 % of the edges, several seeds, and per-receiver patterns in which
  half the receivers keep the smaller side and half the larger, so both ways of summing run;
* every path: one pass, stacked circuits, a pass resumed from an earlier one's blocks, and the
  differentiable pass of attribution (its metric values);
* and, with no engine code at all, receiver-level patches against plain Hugging Face hooks:
  every edge into a layer's MLP equals that MLP's input taken from the corrupted run; every edge
  into a head's query (a group's key, value) equals that head's (group's) projection output
  columns taken from the corrupted run; every edge into the logits equals the final norm's input
  taken from the corrupted run.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from architectures import build, load_dtype
from helpers import EXACT, QKV, adapter_for, qkv_columns, submodule
from tiny_models import random_pair, tiny_task, tiny_tokenizer

from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.patching import PassRecord, patched_logits, run_recording_senders, stacked_patched_logits
from circuitfinder.engine.precision import exact_tolerance, tolerance_for
from circuitfinder.methods.attribution import attribute_circuit_batch, score_matrix
from circuitfinder.tasks.base import logit_difference

KEPT = (0.01, 0.05, 0.2, 0.5, 0.8, 0.95, 0.99)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("sparse-tok"))


def random_circuit(graph: EdgeGraph, kept: float, seed: int, mixed: bool) -> torch.Tensor:
    """Patch weights ``[senders, receivers]`` (1 = removed) keeping about ``kept`` of the edges;
    ``mixed``: half the receivers, drawn at random, keep ``1 − kept`` instead."""
    g = torch.Generator().manual_seed(seed)
    density = torch.full((graph.n_receivers,), kept, dtype=torch.float64)
    if mixed:
        flip = torch.rand(graph.n_receivers, generator=g) < 0.5
        density[flip] = 1 - kept
    keep = torch.rand(graph.allowed.shape, generator=g, dtype=torch.float64) < density
    return ((~keep) & graph.allowed).double()


def slow_patched_logits(adapter, graph: EdgeGraph, clean, corrupted_senders, removed) -> torch.Tensor:
    """The reference: at each receiver, each removed edge's ``corrupted_s − current_s`` added on its
    own, ``current_s`` being sender s's value in this patched run, recorded as it fires."""
    current: dict[int, torch.Tensor] = {}

    def recorder(point):
        def record(values):
            per_sender = values.permute(2, 0, 1, 3) if values.dim() == 4 else values.unsqueeze(0)
            for i in range(point.stop - point.start):
                current[point.start + i] = per_sender[i].detach().clone()

        return record

    def patcher(point):
        def patch(x, hook=None):
            x = x.clone()
            for j in range(point.stop - point.start):
                for s in range(point.n_senders):
                    if removed[s, point.start + j]:
                        term = (corrupted_senders[s] - current[s]).to(x.dtype)  # KeyError: read before it fired
                        if point.per_head:
                            x[:, :, j] = x[:, :, j] + term
                        else:
                            x = x + term
            return x

        return patch

    hooks = [h for p in graph.sender_points for h in adapter.sender_hooks(p.kind, p.layer, recorder(p))]
    hooks += [(adapter.receiver_hook(p.kind, p.layer), patcher(p)) for p in graph.receiver_points]
    with torch.no_grad(), adapter.hooks(hooks):
        return adapter.logits(clean)


def _assert_close(adapter, got, want, what):
    tol = tolerance_for(adapter, want)
    diff = (got - want).abs().max().item()
    assert diff <= tol, f"{adapter.name} {what}: differs from the slow reference by {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", EXACT)
def test_random_circuits_in_one_pass_equal_the_slow_reference(name, tokenizer):
    adapter = adapter_for(name, tokenizer)
    graph = EdgeGraph(adapter.shape)
    clean, corrupted = random_pair(batch=2, pos=5, seed=11)
    corr, _ = run_recording_senders(adapter, graph, corrupted)
    for kept in KEPT:
        for seed, mixed in ((0, False), (1, True), (2, True)):
            removed = random_circuit(graph, kept, seed, mixed)
            want = slow_patched_logits(adapter, graph, clean, corr, removed)
            got = patched_logits(adapter, graph, clean, corr, removed)
            _assert_close(adapter, got, want, f"one pass, {kept:.0%} kept, seed {seed}")


@pytest.mark.parametrize("name", EXACT)
def test_random_circuits_stacked_and_resumed_equal_the_slow_reference(name, tokenizer):
    """Stacked: three circuits that agree before layer l and differ from it on (l = 0, 1, 2).
    Resumed: a chain of passes, each from the previous one's record, re-drawing the receivers
    from layer l on."""
    adapter = adapter_for(name, tokenizer)
    graph = EdgeGraph(adapter.shape)
    clean, corrupted = random_pair(batch=2, pos=5, seed=12)
    corr, _ = run_recording_senders(adapter, graph, corrupted)
    layer_of = torch.tensor([p.layer for p in graph.receiver_points for _ in range(p.start, p.stop)])
    for i, kept in enumerate(KEPT):
        base = random_circuit(graph, kept, 10 + i, mixed=i % 2 == 1)
        for layer in range(adapter.shape.n_layers):
            late = layer_of >= layer
            circuits = [base]
            for j in (1, 2):
                other = random_circuit(graph, KEPT[(i + 2 * j) % len(KEPT)], 100 * i + 10 * layer + j, mixed=True)
                circuits.append(torch.where(late, other, base))
            stacked = stacked_patched_logits(adapter, graph, clean, corr, torch.stack(circuits))
            for j, circuit in enumerate(circuits):
                want = slow_patched_logits(adapter, graph, clean, corr, circuit)
                _assert_close(
                    adapter,
                    stacked[j * 2 : (j + 1) * 2],
                    want,
                    f"stacked circuit {j}, {kept:.0%} kept, parting at layer {layer}",
                )
        record: PassRecord | None = None
        circuit = base
        for layer in (0, 2, 1, adapter.shape.n_layers):  # n_layers: only the logits' edges re-drawn
            circuit = torch.where(layer_of >= layer, random_circuit(graph, kept, 1000 + layer, mixed=True), circuit)
            got, record = patched_logits(adapter, graph, clean, corr, circuit, resume=record, record=True)
            want = slow_patched_logits(adapter, graph, clean, corr, circuit)
            _assert_close(adapter, got, want, f"resumed at layer {layer}, {kept:.0%} kept")


@pytest.mark.parametrize("name", EXACT)
def test_the_differentiable_pass_of_attribution_patches_random_circuits_exactly(name, tokenizer):
    adapter = adapter_for(name, tokenizer)
    graph = EdgeGraph(adapter.shape)
    task = tiny_task(n=4)
    (batch,) = task.batches("discovery", batch_size=len(task))
    corr, _ = run_recording_senders(adapter, graph, batch.corrupted)
    rows = torch.arange(batch.size)
    for kept in (0.05, 0.5, 0.95):
        removed = random_circuit(graph, kept, 7, mixed=True)
        values = attribute_circuit_batch(adapter, graph, task, batch, removed, score_matrix(adapter, graph), 1.0, corr)
        logits = slow_patched_logits(adapter, graph, batch.clean, corr, removed)
        want = logit_difference(logits[rows, batch.last], batch)
        _assert_close(adapter, values, want, f"differentiable pass, {kept:.0%} kept")


# ---- receiver-level patches against plain Hugging Face hooks (no engine code) ----------------


def _decoder_layers(hf, name: str):
    return submodule(hf, QKV.get(name, ("model.layers",))[0])


def _mlp_of(layer_module):
    """The module whose input is the MLP's (OPT and XGLM have no MLP module: their MLP norm's input)."""
    names = ("mlp", "feed_forward", "block_sparse_moe", "final_layer_norm")
    return next(getattr(layer_module, n) for n in names if hasattr(layer_module, n))


def _final_norm(hf):
    from helpers import FINAL_NORM

    for path in (*FINAL_NORM.values(), "model.norm", "model.final_layernorm"):
        try:
            return submodule(hf, path)
        except AttributeError:
            continue
    raise AttributeError("no final norm")


def _run_swapping(hf, clean, corrupted, module, take: Callable | None = None, pre: bool = True):
    """Hugging Face logits of ``clean`` with ``module``'s input (``pre``) or output replaced by the
    corrupted run's (all of it, or the columns ``take`` selects)."""
    seen = {}

    def keep_pre(_m, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def keep_out(_m, _args, out):
        seen["x"] = out.detach().clone()

    def put_pre(_m, args, kwargs):
        if args:
            return (seen["x"], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": seen["x"]}

    def put_out(_m, _args, out):
        out = out.clone()
        cols = take(out.shape[-1])
        out[..., cols] = seen["x"][..., cols]
        return out

    with torch.no_grad():
        handle = (
            module.register_forward_pre_hook(keep_pre, with_kwargs=True)
            if pre
            else module.register_forward_hook(keep_out)
        )
        try:
            hf(corrupted)
        finally:
            handle.remove()
        handle = (
            module.register_forward_pre_hook(put_pre, with_kwargs=True)
            if pre
            else module.register_forward_hook(put_out)
        )
        try:
            return hf(clean).logits
        finally:
            handle.remove()


def _receiver_patch(adapter, graph, clean, corr, receiver: str) -> torch.Tensor:
    removed = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64)
    r = graph._receiver_index[receiver]
    removed[:, r] = 1
    return patched_logits(adapter, graph, clean, corr, removed * graph.allowed)


def _assert_hf(adapter, got, want, clean_logits, what):
    assert (want - clean_logits).abs().max() > 1e-4, f"{what}: the patch moves nothing, the test could not fail"
    working = torch.float32 if adapter.dtype == torch.float64 else adapter.dtype  # two implementations
    tol = exact_tolerance(working, adapter.shape.n_layers, want.abs().max().item())
    diff = (got - want).abs().max().item()
    assert diff <= tol, f"{adapter.name} {what}: engine and Hugging Face differ by {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", EXACT)
def test_every_edge_into_a_receiver_equals_the_hugging_face_input_from_the_corrupted_run(name, tokenizer):
    adapter = adapter_for(name, tokenizer)
    graph = EdgeGraph(adapter.shape)
    clean, corrupted = random_pair(batch=2, pos=5, seed=13)
    corr, clean_logits = run_recording_senders(adapter, graph, corrupted)[0], adapter.logits(clean)
    hf = build(name, dtype=load_dtype(name))
    layers = _decoder_layers(hf, name)
    for layer in range(adapter.shape.n_layers):
        got = _receiver_patch(adapter, graph, clean, corr, f"m{layer}")
        want = _run_swapping(hf, clean, corrupted, _mlp_of(layers[layer]))
        _assert_hf(adapter, got, want, clean_logits, f"every edge into m{layer}")
    got = _receiver_patch(adapter, graph, clean, corr, "logits")
    want = _run_swapping(hf, clean, corrupted, _final_norm(hf))
    _assert_hf(adapter, got, want, clean_logits, "every edge into the logits")
    if name not in QKV:
        return
    _, _, attn_name, projections, layout = QKV[name]
    H, G = adapter.shape.n_heads, adapter.shape.n_kv_groups
    for receiver in ("a0.h1<q>", f"a1.g{G - 1}<k>", "a2.g0<v>", f"a2.h{H - 1}<q>"):
        layer, kind = int(receiver[1]), receiver[-2]
        index = int(receiver.split(".")[1][1:].split("<")[0])
        attn = submodule(layers[layer], attn_name)
        module = getattr(attn, projections if isinstance(projections, str) else projections["qkv".index(kind)])
        cols = lambda width, kind=kind, index=index: qkv_columns(layout, kind, index, H, G, width)  # noqa: E731
        got = _receiver_patch(adapter, graph, clean, corr, receiver)
        want = _run_swapping(hf, clean, corrupted, module, take=cols, pre=False)
        _assert_hf(adapter, got, want, clean_logits, f"every edge into {receiver}")


def test_a_query_key_norm_over_all_heads_makes_each_q_and_k_input_feed_its_whole_layer(tokenizer):
    """OLMo-2 normalises the whole query (key) projection at once: one head's input moves every
    query of its layer, so pruning must follow q/k inputs to all the layer's heads (not v)."""
    from circuitfinder.engine.adapter import ModelShape

    assert (
        adapter_for("olmo2", tokenizer).shape.shared_qk_norm
        and not adapter_for("llama", tokenizer).shape.shared_qk_norm
    )
    graph = EdgeGraph(ModelShape(3, 4, 2, d_model=16, shared_qk_norm=True))
    heads_of_layer1 = tuple(range(1 + 5, 1 + 5 + 4))
    for receiver in ("a1.h0<q>", "a1.g1<k>"):
        assert graph.receiver_feeds[graph._receiver_index[receiver]] == heads_of_layer1
    v = graph._receiver_index["a1.g1<v>"]
    assert graph.receiver_feeds[v] == graph.receiver_node[v] == (8, 9)


@pytest.mark.parametrize("method", ["eap", "acdc-groups"])
def test_discover_on_a_pythia_style_folder_reports_the_slow_references_faithfulness(
    method, word_tokenizer, tmp_path, capsys
):
    """End to end on a parallel-block model saved to a folder: the held-out faithfulness a run
    reports for the circuit it found is the one the slow reference gives for that circuit."""
    import json

    from cli_runner import run_in_process
    from helpers import task_rows

    from circuitfinder.engine.adapter import ModelAdapter
    from circuitfinder.graphs.circuit import Circuit
    from circuitfinder.tasks.from_file import load_task_file

    rows = task_rows(10)
    task_path = tmp_path / "ioi-small.jsonl"
    task_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder, out = tmp_path / "pythia-tiny", tmp_path / "run"
    model = build("gpt-neox-parallel", dtype=torch.float32, vocab=len(word_tokenizer))
    model.save_pretrained(folder, safe_serialization=True)
    word_tokenizer.save_pretrained(folder)
    size = ["--edges", "40"] if method == "eap" else []
    code, _, err = run_in_process(
        capsys,
        "discover",
        "--task",
        str(task_path),
        "--model",
        str(folder),
        "--method",
        method,
        "--pairs",
        "10",
        "--batch-size",
        "10",
        *size,
        "--no-curve",
        "--force",
        "--out",
        str(out),
    )
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    circuit = Circuit.load(out / "circuit.json")
    assert circuit.parallel and 0 < circuit.n_edges < circuit.graph.n_edges

    adapter = ModelAdapter.from_hf(model, word_tokenizer, name="pythia-tiny", dtype=torch.float32)
    graph = EdgeGraph(adapter.shape)
    task = load_task_file(out / "prompts.jsonl", word_tokenizer)
    metric = {"full": 0.0, "empty": 0.0, "circuit": 0.0}
    removed = {
        "full": torch.zeros_like(graph.allowed, dtype=torch.float64),
        "empty": graph.allowed.double(),
        "circuit": (graph.allowed & ~circuit.mask).double(),
    }
    n = len(task.indices("heldout"))
    for batch in task.batches("heldout", batch_size=n):
        corr, _ = run_recording_senders(adapter, graph, batch.corrupted)
        rows_ = torch.arange(batch.size)
        for key, weights in removed.items():
            logits = slow_patched_logits(adapter, graph, batch.clean, corr, weights)
            metric[key] += float(task.metric(logits[rows_, batch.last], batch).double().sum()) / n
    want = (metric["circuit"] - metric["empty"]) / (metric["full"] - metric["empty"])
    assert summary["faithfulness"] == pytest.approx(want, abs=1e-4), (summary["faithfulness"], want)


def test_a_norm_over_all_heads_outputs_makes_each_head_depend_on_its_whole_layer(tokenizer):
    """BitNet normalises the heads' concatenated outputs (``attn_sub_norm``) before the output
    projection: a change to one head's input moves every head's value through that norm, so the
    graph treats the layer's heads as coupled, as under Gemma's post-attention norm."""
    adapter = adapter_for("bitnet", tokenizer)
    assert adapter.shape.post_norm and not adapter.post_norm  # the coupling rule; no post-norm head shares
    graph = EdgeGraph(adapter.shape)
    v = graph._receiver_index["a1.g1<v>"]
    assert graph.receiver_feeds[v] == tuple(range(6, 10))
    clean, corrupted = random_pair(batch=1, pos=5, seed=3)
    corr, _ = run_recording_senders(adapter, graph, corrupted)
    removed = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64)
    removed[0, v] = 1  # input -> a1.g1<v> moves heads 2 and 3 of layer 1 directly, heads 0 and 1 only through the norm
    seen = {}
    base, _ = run_recording_senders(adapter, graph, clean)
    with (
        torch.no_grad(),
        adapter.hooks(adapter.sender_hooks("attn", 1, lambda values: seen.update(v=values.detach().clone()))),
    ):
        patched_logits(adapter, graph, clean, corr, removed)
    moved = (seen["v"] - base[6:10].permute(1, 2, 0, 3)).abs().amax(dim=(0, 1, 3))  # per head of layer 1
    assert bool((moved[:2] > 1e-6).all()), moved
