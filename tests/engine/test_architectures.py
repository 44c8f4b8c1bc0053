"""The architecture matrix: every decoder family of ``tests/architectures.py`` is exact or refused.

For each exact one (float64; Mixtral in float32, which its expert matmul needs): the bridge's
logits equal the Hugging Face model's; the check at load passes (full = clean, empty = corrupted,
one edge of every sender and receiver kind against a single plain hook, every receiver wired, the
block rule); edges into an MLP and into the logits equal a reference computed on the Hugging Face
modules alone (a forward pre-hook on the module that receiver reads, no engine, no
TransformerLens); EAP equals the derivative of exact patching. Each refused one is refused with
one line that names the architecture and what is missing. ``scripts/architectures.py`` writes
the table in docs/architectures.md from the same catalogue and the same check.
"""

from __future__ import annotations

import pytest
import torch
from architectures import ARCHITECTURES, EXPECTED_REFUSAL, FLOAT32_ONLY, build, load_dtype
from helpers import EXACT, FINAL_NORM, QKV, adapter_for, qkv_columns, submodule, tokenizer  # noqa: F401 (fixture)
from tiny_models import patching_derivative, random_pair, tiny_task

from circuitfinder.engine.adapter import ModelAdapter
from circuitfinder.engine.checks import check_model
from circuitfinder.engine.graph import EdgeGraph, expected_edge_count
from circuitfinder.engine.patching import patched_logits, run_recording_senders
from circuitfinder.engine.precision import exact_tolerance, tolerance_for
from circuitfinder.errors import UserError
from circuitfinder.methods.attribution import eap

PARALLEL = {"gpt-neox-parallel", "falcon", "phi", "cohere", "cohere2", "gptj"}

# The Hugging Face module whose input is the MLP's receiver: (decoder layers, attribute of a layer).
# OLMo-2's MLP reads the residual stream itself (no pre-MLP norm); parallel blocks with one shared
# norm are in SHARED_NORM (the layer's input, normalised by that norm, replaces the MLP's input).
# (decoder layers, the shared norm's attribute).
SHARED_NORM = {
    "phi": ("model.layers", "input_layernorm"),
    "falcon": ("transformer.h", "input_layernorm"),
    "cohere": ("model.layers", "input_layernorm"),
    "cohere2": ("model.layers", "input_layernorm"),
    "gptj": ("transformer.h", "ln_1"),
}
MLP_READS = {
    "gpt2": ("transformer.h", "ln_2"),
    "gpt-neox-parallel": ("gpt_neox.layers", "post_attention_layernorm"),
    "gpt-neox-sequential": ("gpt_neox.layers", "post_attention_layernorm"),
    "olmo2": ("model.layers", "mlp"),
    "bloom": ("transformer.h", "post_attention_layernorm"),
    "gemma2": ("model.layers", "pre_feedforward_layernorm"),
    "gemma3": ("model.layers", "pre_feedforward_layernorm"),
    "olmo3": ("model.layers", "mlp"),
    "flex-olmo": ("model.layers", "mlp"),
    "exaone4": ("model.layers", "mlp"),
    "apertus": ("model.layers", "feedforward_layernorm"),
    "vaultgemma": ("model.layers", "pre_feedforward_layernorm"),
    "gpt-bigcode": ("transformer.h", "ln_2"),
    "gpt-neo": ("transformer.h", "ln_2"),
    "opt": ("model.decoder.layers", "final_layer_norm"),
    "xglm": ("model.layers", "final_layer_norm"),
    "modernbert-decoder": ("model.layers", "mlp_norm"),
    "falcon-sequential": ("transformer.h", "post_attention_layernorm"),
}


def _add_at_receiver(hf, name: str, receiver: str, delta: torch.Tensor) -> list:
    """Forward pre-hooks on Hugging Face modules that add ``delta`` to what ``receiver`` reads."""
    if receiver == "logits":
        module = submodule(hf, FINAL_NORM.get(name, "model.norm"))
        return [module.register_forward_pre_hook(lambda _m, args: (args[0] + delta.to(args[0].dtype), *args[1:]))]
    layer = int(receiver[1:])
    if name in SHARED_NORM:
        layers, norm = SHARED_NORM[name]
        decoder = submodule(hf, layers)[layer]
        kept = {}

        def keep(_m, args, kwargs):
            kept["x"] = args[0] if args else kwargs["hidden_states"]

        def replace(_m, args):
            return (getattr(decoder, norm)(kept["x"] + delta.to(kept["x"].dtype)), *args[1:])

        return [
            decoder.register_forward_pre_hook(keep, with_kwargs=True),
            decoder.mlp.register_forward_pre_hook(replace),
        ]
    layers, attribute = MLP_READS.get(name, ("model.layers", "post_attention_layernorm"))
    module = getattr(submodule(hf, layers)[layer], attribute)
    # OPT flattens [batch, pos, d] to [batch · pos, d] before its MLP's norm
    return [
        module.register_forward_pre_hook(
            lambda _m, args: (args[0] + delta.to(args[0].dtype).reshape(args[0].shape), *args[1:])
        )
    ]


@pytest.mark.parametrize("name", sorted(EXPECTED_REFUSAL))
def test_unsupported_architectures_are_refused_with_one_line(name, tokenizer):
    with pytest.raises(UserError) as refused:
        check_model(adapter_for(name, tokenizer))
    message = str(refused.value)
    assert "\n" not in message and EXPECTED_REFUSAL[name] in message
    assert type(build(name)).__name__ in message


@pytest.mark.parametrize("name", EXACT)
def test_bridge_equals_hugging_face_and_the_check_at_load_passes(name, tokenizer):
    adapter = adapter_for(name, tokenizer)
    hf = build(name, dtype=load_dtype(name))
    clean, _ = random_pair()
    with torch.no_grad():
        want = hf(clean).logits
    got = adapter.logits(clean)
    # Two implementations, not one: Hugging Face's own modules compute rotary tables, norms and
    # softmax in float32 even in a float64 model, so they are compared at float32's tolerance.
    working = torch.float32 if adapter.dtype == torch.float64 else adapter.dtype
    assert (got - want).abs().max().item() <= exact_tolerance(working, adapter.shape.n_layers, want.abs().max().item())
    assert adapter.shape.parallel == (name in PARALLEL)
    graph = EdgeGraph(adapter.shape)
    assert graph.n_edges == expected_edge_count(
        adapter.shape.n_layers, adapter.shape.n_heads, adapter.shape.n_kv_groups, adapter.shape.parallel
    )
    check_model(adapter)


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("edge", ["m0->m2", "a0.h1->m2", "input->m1", "a2.h3->logits", "m1->logits"])
def test_edges_into_mlps_and_logits_match_the_hugging_face_modules(name, edge, tokenizer):
    adapter = adapter_for(name, tokenizer)
    _one_edge_against_hugging_face(
        adapter, name, edge, lambda hf, receiver, delta: _add_at_receiver(hf, name, receiver, delta)
    )


def _one_edge_against_hugging_face(adapter, name: str, edge: str, hooks_for) -> None:
    """The engine's logits with ``edge`` patched equal the Hugging Face model's under ``hooks_for``
    (hf, receiver name, corrupted − clean value of the sender) → forward hook handles."""
    graph = EdgeGraph(adapter.shape)
    clean, corrupted = random_pair(seed=1)
    corr, _ = run_recording_senders(adapter, graph, corrupted)
    clean_senders, clean_logits = run_recording_senders(adapter, graph, clean)
    s, r = graph.edge_index(edge)
    removed = torch.zeros(graph.n_senders, graph.n_receivers)
    removed[s, r] = 1
    patched = patched_logits(adapter, graph, clean, corr, removed)
    assert (patched - clean_logits).abs().max() > 1e-4  # the edge matters: the test can fail

    hf = build(name, dtype=load_dtype(name))
    handles = hooks_for(hf, graph.receiver_names[r], corr[s] - clean_senders[s])
    try:
        with torch.no_grad():
            reference = hf(clean).logits
    finally:
        for handle in handles:
            handle.remove()
    working = torch.float32 if adapter.dtype == torch.float64 else adapter.dtype  # as above: two implementations
    assert (patched - reference).abs().max().item() <= exact_tolerance(
        working, adapter.shape.n_layers, reference.abs().max().item()
    )


def _add_at_qkv(hf, name: str, receiver: str, delta: torch.Tensor, n_heads: int, n_groups: int) -> list:
    """Hooks on Hugging Face modules: the receiver's head (q) or group (k, v) computed from its layer's
    input plus ``delta``, every other head and group as before."""
    layers, norm_name, attn_name, projections, layout = QKV[name]
    layer = int(receiver[1:].split(".")[0])
    decoder = submodule(hf, layers)[layer]
    attn = submodule(decoder, attn_name)
    kind = receiver[-2]
    index = int(receiver.split(".")[1][1:].split("<")[0])
    module = getattr(attn, projections if isinstance(projections, str) else projections["qkv".index(kind)])
    linear = isinstance(module, torch.nn.Linear)  # else GPT-2's Conv1D: x @ weight + bias
    cols = qkv_columns(layout, kind, index, n_heads, n_groups, module.weight.shape[0 if linear else 1])
    kept = {}

    def keep(_m, args, kwargs):
        kept["x"] = args[0] if args else kwargs["hidden_states"]

    def replace(_m, _args, out):
        x = kept["x"] + delta.to(kept["x"].dtype)
        x = getattr(decoder, norm_name)(x) if norm_name else x
        full = torch.nn.functional.linear(x, module.weight, module.bias) if linear else x @ module.weight + module.bias
        out = out.clone()
        out[..., cols] = full[..., cols]
        return out

    return [decoder.register_forward_pre_hook(keep, with_kwargs=True), module.register_forward_hook(replace)]


@pytest.mark.parametrize("name", sorted(n for n in QKV if n in EXACT))
@pytest.mark.parametrize("edge", ["input->a1.h2<q>", "a0.h1->a2.g0<k>", "m0->a1.g-1<v>", "a1.h3->a2.h0<q>"])
def test_edges_into_queries_keys_and_values_match_the_hugging_face_modules(name, edge, tokenizer):
    adapter = adapter_for(name, tokenizer)
    edge = edge.replace("g-1", f"g{adapter.shape.n_kv_groups - 1}")
    H, G = adapter.shape.n_heads, adapter.shape.n_kv_groups
    _one_edge_against_hugging_face(
        adapter, name, edge, lambda hf, receiver, delta: _add_at_qkv(hf, name, receiver, delta, H, G)
    )


@pytest.mark.parametrize("name", EXACT)
def test_stacked_circuits_equal_one_copy_per_circuit(name, tokenizer):
    """Circuits that share a prefix of layers run it once (the batch grows as the residual enters the
    layer where they part), including the MLP receivers the adapter supplies itself."""
    from circuitfinder.engine.patching import stacked_patched_logits

    adapter = adapter_for(name, tokenizer)
    graph = EdgeGraph(adapter.shape)
    clean, corrupted = random_pair(batch=2, pos=5)
    corr, _ = run_recording_senders(adapter, graph, corrupted)
    g = torch.Generator().manual_seed(3)
    masks = (torch.rand(graph.allowed.shape, generator=g) < 0.5).double().repeat(3, 1, 1)
    mlp2 = next(p for p in graph.receiver_points if p.kind == "mlp" and p.layer == 2)
    q1 = next(p for p in graph.receiver_points if p.kind == "q" and p.layer == 1)
    masks[1, :, mlp2.start] = 1 - masks[0, :, mlp2.start]  # parts at layer 2, on an MLP receiver
    masks[2, :, q1.start] = 1 - masks[0, :, q1.start]  # parts at layer 1
    stacked = stacked_patched_logits(adapter, graph, clean, corr, masks)
    copies = patched_logits(adapter, graph, clean.repeat(3, 1), corr.repeat(1, 3, 1, 1), masks)
    assert (stacked - copies).abs().max().item() <= tolerance_for(adapter, copies)
    assert (stacked.view(3, -1)[1:] - stacked.view(3, -1)[0]).abs().max() > 1e-4  # the circuits differ


@pytest.mark.parametrize("name", EXACT)
def test_a_pass_resumed_from_an_earlier_ones_blocks_is_the_same_bit_for_bit(name, tokenizer):
    """A circuit that agrees with an earlier pass's on every receiver before layer l skips blocks
    0 … l−1 (their outputs, sender entries and running total come from that pass's record) and
    gives the logits of a full pass exactly; a chain of resumed passes too."""
    adapter = adapter_for(name, tokenizer)
    graph = EdgeGraph(adapter.shape)
    clean, corrupted = random_pair(batch=2, pos=5)
    corr, _ = run_recording_senders(adapter, graph, corrupted)
    g = torch.Generator().manual_seed(5)
    first = (torch.rand(graph.allowed.shape, generator=g) < 0.3).double()
    first[:, graph.receiver_points[-1].start] = 0  # every sender reaches the logits: each change below shows
    ran = []
    handles = [
        block.original_component.register_forward_hook(lambda *_a, l=l: ran.append(l))
        for l, block in enumerate(adapter.bridge.blocks)
    ]
    try:
        logits, record = patched_logits(adapter, graph, clean, corr, first, record=True)
        assert torch.equal(logits, patched_logits(adapter, graph, clean, corr, first))
        previous = first
        for kind, layer in [("mlp", 2), ("q", 1), ("k", 2), ("logits", 3)]:  # the logits last: it cuts every path
            point = next(p for p in graph.receiver_points if p.kind == kind and p.layer == layer)
            trial = previous.clone()
            trial[: point.n_senders, point.start] = 1 - trial[: point.n_senders, point.start]
            ran.clear()
            resumed, record = patched_logits(adapter, graph, clean, corr, trial, resume=record, record=True)
            assert sorted(set(ran)) == list(range(layer, adapter.shape.n_layers)), kind  # blocks before it skipped
            full = patched_logits(adapter, graph, clean, corr, trial)
            assert torch.equal(resumed, full), (kind, layer)
            assert (full - patched_logits(adapter, graph, clean, corr, previous)).abs().max() > 1e-6, kind  # it changed
            previous = trial
    finally:
        for handle in handles:
            handle.remove()


def test_hooks_the_adapter_supplies_are_removed_after_an_exception(tokenizer):
    adapter = adapter_for("phi", tokenizer)  # its MLP receivers are the adapter's own hooks
    assert adapter.own_mlp_input == "shared-norm"

    def boom(x, hook=None):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        with adapter.hooks([("blocks.1.hook_mlp_in", boom)]):
            adapter.logits(torch.zeros((1, 4), dtype=torch.long))
    assert adapter.hook_count() == 0
    assert all(not block.mlp._forward_pre_hooks for block in adapter.bridge.blocks)


def _step(name: str, adapter) -> float:
    """The finite difference's step: 1e-4 in float64; 1e-2 where Hugging Face rounds norms and softmax
    to float32; 3e-3 for a mixture of experts (float32), where 1e-2 can switch an expert's routing
    (EAP is the derivative with the routing held) and 1e-3 drowns in float32's rounding."""
    if name in FLOAT32_ONLY:
        return 3e-3
    return 1e-2 if adapter.working_dtype == torch.float32 else 1e-4


@pytest.mark.parametrize("name", EXACT)
def test_eap_is_the_derivative_of_exact_patching(name, tokenizer):
    adapter = adapter_for(name, tokenizer)
    graph = EdgeGraph(adapter.shape)
    task = tiny_task()
    scores = eap(adapter, graph, task, batch_size=4)
    for edge in (
        "input->a1.h0<q>",
        "a0.h1->a2.g0<k>",
        "m0->a1.g1<v>" if adapter.shape.n_kv_groups > 1 else "m0->a1.g0<v>",
        "a0.h2->m1",
        "m1->logits",
    ):
        s, r = graph.edge_index(edge)
        derivative = patching_derivative(adapter, graph, task, s, r, eps=_step(name, adapter))
        assert scores[s, r].item() == pytest.approx(derivative, rel=2e-2, abs=1e-4), edge


@pytest.mark.parametrize("edge", ["input->a1.h2<q>", "a0.h1->a2.g0<k>", "m0->a1.g3<v>"])
def test_bloom_is_refused_because_its_bridge_qkv_inputs_differ_from_the_model(edge, tokenizer):
    """The evidence behind BLOOM's refusal (circuitfinder.engine.checks.KNOWN_INEXACT): its MLP and logit edges
    match Hugging Face's modules, its q/k/v edges do not. When this fails, lift the refusal."""
    adapter = ModelAdapter.from_hf(build("bloom"), tokenizer, name="tiny-bloom", hf_id="bloom", dtype=torch.float64)
    with pytest.raises(AssertionError, match="<="):
        _one_edge_against_hugging_face(
            adapter, "bloom", edge, lambda hf, receiver, delta: _add_at_qkv(hf, "bloom", receiver, delta, 4, 4)
        )
    _one_edge_against_hugging_face(
        adapter, "bloom", "m0->m2", lambda hf, receiver, delta: _add_at_receiver(hf, "bloom", receiver, delta)
    )


def test_a_mixture_of_experts_in_float64_is_refused_with_one_line(tokenizer):
    with pytest.raises(UserError, match="fails in torch.float64") as refused:
        check_model(
            ModelAdapter.from_hf(build("mixtral"), tokenizer, name="tiny-mixtral", hf_id="mixtral", dtype=torch.float64)
        )
    assert "\n" not in str(refused.value) and "MixtralForCausalLM" in str(refused.value)


def test_the_check_at_load_refuses_a_bridge_that_computes_another_model(tokenizer):
    """Check 0: the bridge against the Hugging Face model's own logits, taken before booting. A
    weight changed afterwards stands for a bridge that runs the model differently: checks 1-4
    compare the engine with the bridge, so only check 0 can see it."""
    adapter = ModelAdapter.from_hf(build("gpt2"), tokenizer, name="tiny-gpt2", hf_id="gpt2", dtype=torch.float64)
    assert adapter.hf_reference is not None
    check_model(adapter)  # passes as booted
    with torch.no_grad():
        adapter.bridge.original_model.transformer.h[0].attn.c_attn.weight.mul_(1.5)
    with pytest.raises(UserError, match="the bridge's logits differ from the Hugging Face model's own"):
        check_model(adapter)


def test_the_check_at_load_accepts_components_with_all_zero_weights(tokenizer):
    """A compiled tracr model has attention layers and MLPs with all-zero weights: nothing added at
    their inputs moves anything, in the model as in the engine, so they are not asked to."""
    model = build("gpt2")
    with torch.no_grad():
        for p in [*model.transformer.h[0].attn.parameters(), *model.transformer.h[-1].mlp.parameters()]:
            p.zero_()
    check_model(ModelAdapter.from_hf(model, tokenizer, name="tiny-gpt2", hf_id="gpt2", dtype=torch.float64))


def test_the_check_at_load_refuses_a_receiver_hook_the_model_does_not_read(tokenizer, monkeypatch):
    """Check 1 on a hook that fires but is not read (with split q/k/v inputs the block's own ln1
    output feeds nothing): neither the logits nor the attention scores move, so it is refused."""
    adapter = ModelAdapter.from_hf(build("gpt2"), tokenizer, name="tiny-gpt2", hf_id="gpt2", dtype=torch.float64)
    wired = adapter.receiver_hook
    monkeypatch.setattr(
        adapter,
        "receiver_hook",
        lambda kind, layer: f"blocks.{layer}.ln1.hook_out" if kind == "q" else wired(kind, layer),
    )
    with pytest.raises(UserError, match=r"the q input of layer 0 \(blocks.0.ln1.hook_out\) changes nothing"):
        check_model(adapter)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    """A task file in the IOI form whose words the word tokenizer holds as single tokens."""
    import json

    from helpers import task_rows  # rows that tests/runs/test_tasks_files.py checks load

    rows = task_rows(8)
    path = tmp_path_factory.mktemp("task") / "ioi-small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_discover_on_a_saved_folder_runs_or_exits_2_with_one_line(name, word_tokenizer, task_file, tmp_path, capsys):
    import json

    from cli_runner import run_in_process

    folder = tmp_path / name
    build(name, dtype=torch.float32, vocab=len(word_tokenizer)).save_pretrained(folder, safe_serialization=True)
    word_tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    code, _, err = run_in_process(
        capsys,
        "discover",
        "--task",
        str(task_file),
        "--model",
        str(folder),
        "--method",
        "eap",
        "--pairs",
        "8",
        "--batch-size",
        "8",
        "--edges",
        "40",
        "--no-curve",
        "--force",
        "--out",
        str(out),
    )
    if name in EXPECTED_REFUSAL:
        assert code == 2 and EXPECTED_REFUSAL[name] in err
        assert "Traceback" not in err and len([l for l in err.splitlines() if "error" in l.lower()]) == 1
        assert not out.exists()
        return
    assert code == 0, err
    circuit = json.loads((out / "circuit.json").read_text())
    assert circuit.get("parallel", False) == (name in PARALLEL)
    same_layer = [
        e
        for e in circuit["edges"]
        if e["receiver"].startswith("m")
        and e["sender"].startswith("a")
        and e["sender"][1:].split(".")[0] == e["receiver"][1:]
    ]
    assert not (name in PARALLEL and same_layer)


def test_an_error_inside_the_check_at_load_refuses_the_model_in_one_line(tokenizer, monkeypatch):
    """A hook point the architecture lacks (what GPT-1's missing final norm did) ends in one line."""
    adapter = ModelAdapter.from_hf(build("gpt2"), tokenizer, name="tiny-gpt2", hf_id="gpt2", dtype=torch.float64)
    wired = adapter.receiver_hook
    monkeypatch.setattr(
        adapter, "receiver_hook", lambda kind, layer: "no.such.hook" if kind == "logits" else wired(kind, layer)
    )
    with pytest.raises(UserError, match=r"the check at load failed \(KeyError") as refused:
        check_model(adapter)
    assert "\n" not in str(refused.value) and "GPT2LMHeadModel" in str(refused.value)


def test_an_error_while_wrapping_a_model_refuses_it_in_one_line(tokenizer, monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    def fails(*_args, **_kwargs):
        raise AttributeError("'SomeBlockBridge' object has no attribute 'attn'\nmore lines")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", fails)
    with pytest.raises(
        UserError,
        match=r"GPT2LMHeadModel is not supported: wrapping it in TransformerLens's bridge "
        r"failed \(AttributeError: 'SomeBlockBridge' object has no attribute 'attn'\)$",
    ):
        ModelAdapter.from_hf(build("gpt2"), tokenizer, name="tiny-gpt2", hf_id="gpt2", dtype=torch.float64)
