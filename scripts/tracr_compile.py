"""Compile the tracr programs, convert them to GPT-2 models, and derive their true circuits (issue 20).

Run in a venv of its own (tracr needs jax, which the lock does not hold; its jax 0.10.2 and dm-haiku
0.0.17 sit with the lock's numpy 2.4.6 and networkx 3.6.1):

    python3 -m venv /tmp/tracr && /tmp/tracr/bin/pip install tracr-pypi==1.0.0 torch==2.13.0 transformers==5.24.0
    /tmp/tracr/bin/python scripts/tracr_compile.py [PROGRAM ...]

It writes,
for each program of ``PROGRAMS``, the files the package reads without tracr:

* ``discovery/compiled/<program>/``: the converted model (``config.json``, ``model.safetensors`` in
  float64, a word-level tokenizer over tracr's input vocabulary) and ``program.json``: the
  vocabulary, the output's logit ids, and tracr's own outputs on every input of the program's
  vocabulary (the reference the package's tests compare the converted model against);
* ``graphs/references/tracr-<program>.json``: the true circuit, in the reference format.

**Conversion** (tracr: no norm, ReLU MLPs, attention scaled by 1/sqrt(key_size)). tracr's
residual x (width d, basis ``residual_labels``) is carried as r = [x, −x, 0…] of width
D = heads × head_dim ≥ 2d: every writer (embeddings, W_O, the MLP's output, their biases) writes
+w and −w, every reader (W_Q, W_K, W_V, the MLP's input, the unembedding) reads the + half. Every
sender's contribution then has mean exactly 0 over the D dimensions, so GPT-2's LayerNorm
subtracts nothing, and with ε = E and γ = sqrt(E) it computes r / sqrt(1 + var(r)/E): the identity
up to a relative var(r)/(2E) ≈ |x|²/(D·E), below 1e-11 for E = 1e12. This holds for any
combination of senders, patched, zeroed or averaged, so every ablation sees tracr's function.
The MLPs use ``relu``; W_Q and b_Q carry tracr's 1/sqrt(key_size) times sqrt(head_dim), undoing
GPT-2's own 1/sqrt(head_dim) (with ``scale_attn_weights`` off and the scale in W_Q alone, the
model matched tracr but ran differently through TransformerLens's bridge; see
docs/measurements/ground-truth.md); heads are zero-padded to head_dim; the unembedding is untied:
the logit of output token t reads tracr's output dimension for t (categorical), and the logit of the
token ``=`` reads a numerical output. Causal attention (tracr's ``causal=True``).

**True circuit** (the rule, applied to tracr's weights in its residual basis): a sender writes the
residual dimensions where its output weights are non-zero; a receiver slot reads the dimensions
where its input weights are non-zero: for a head's query and key, the rows and the columns of the
bilinear form W_Q W_Kᵀ that sets its scores; for its value, W_V; for an MLP, its first layer; for
the logits, the output dimensions. The
embedding's dimensions that are the same on every input of the task's length are constant: tracr's
``one``, ``tokens:BOS`` (always position 0), ``tokens:compiler_pad`` and ``indices:*``; its
``tokens:<v>`` dimensions vary. A head or MLP *varies* when any slot reads a varying dimension, and
then all it writes varies. An edge s → r (slot) is true when r's slot reads a varying dimension
that s writes, and it lies on a path to the logits. A categorical variable (one-hot over its
values) whose value rows in a reader's weights are all equal is not read: its read is the same
whatever the value (reverse's ``length`` selector, Select(tokens, tokens, TRUE), reads tokens so).
This keeps the edges that carry the input, the circuit that patching and attribution can see; the
edges of attention patterns fixed by
position alone (e.g. frac_prevs' query and key, reading ``one``, ``indices`` and ``tokens:BOS``)
are left out. ACDC's tracr references (Conmy et al. 2023, from zero-ablation runs) keep them;
auto-circuit's (Miller et al. 2024) leave them out, as here. The count of edges without the
varying filter is written beside it (``weights_only_edges``), and those edges as a second
reference, ``tracr-<program>-weights``, to grade against ACDC's kind of reference.

Programs (max_seq_len 5, BOS, causal; tasks read the output at the last position, where the
causal programs compute the bidirectional program's value):

* ``frac_prevs``: the fraction of the tokens so far that are ``x`` (tracr's ``make_frac_prevs``,
  ACDC's tracr-proportion), vocabulary {w, x, y, z}.
* ``reverse``: ``Aggregate(Select(indices, length − indices − 1, EQ), tokens)`` with ``length``
  a SelectorWidth (ACDC's tracr-reverse), vocabulary {1, 2, 3}. Under a causal mask, ``length``
  at position i is i + 1, so only the last position holds the reversed sequence's value there (the
  first token); ACDC compiled it with bidirectional attention and read every position.
* ``pair_balance``: frac_prevs of ``(`` minus frac_prevs of ``)`` (tracr's ``make_pair_balance``),
  vocabulary {(, ), a}: two heads in one layer whose outputs an MLP subtracts.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from tracr.compiler import compiling, lib  # noqa: E402
from tracr.rasp import rasp  # noqa: E402
from transformers import GPT2Config, PreTrainedTokenizerFast  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_SEQ_LEN = 5
EPSILON = 1e12  # LayerNorm's ε; γ = sqrt(ε)
NUMERICAL_TOKEN = "="  # the token whose logit reads a numerical output
CONSTANT = ("one", "tokens:BOS", "tokens:compiler_pad")  # and indices:*: the same on every input of one length


def _reverse():
    length = rasp.SelectorWidth(rasp.Select(rasp.tokens, rasp.tokens, rasp.Comparison.TRUE)).named("length")
    opp = ((length - rasp.indices).named("opp_idx") - 1).named("opp_idx-1")
    return rasp.Aggregate(rasp.Select(rasp.indices, opp, rasp.Comparison.EQ), rasp.tokens).named("reverse")


PROGRAMS = {
    "frac_prevs": (
        lambda: lib.make_frac_prevs(rasp.tokens == "x"),
        ["w", "x", "y", "z"],
        "tracr make_frac_prevs(tokens == 'x'): the fraction of the tokens so far that are x (ACDC's tracr-proportion)",
    ),
    "reverse": (
        _reverse,
        [1, 2, 3],
        "Aggregate(Select(indices, length - indices - 1, EQ), tokens), length = SelectorWidth (ACDC's tracr-reverse); "
        "causal",
    ),
    "pair_balance": (
        lambda: lib.make_pair_balance(rasp.tokens, "(", ")"),
        ["(", ")", "a"],
        "tracr make_pair_balance(tokens, '(', ')'): frac_prevs of '(' minus frac_prevs of ')'",
    ),
}


def compile_program(name: str):
    make, vocab, _ = PROGRAMS[name]
    program = make()
    model = compiling.compile_rasp_to_model(
        program, vocab=set(vocab), max_seq_len=MAX_SEQ_LEN, compiler_bos="BOS", causal=True
    )
    model.output_space_label = program.label  # the output's residual labels are named after it
    return model


def _params(model) -> dict:
    return {k: {kk: np.asarray(vv, dtype=np.float64) for kk, vv in v.items()} for k, v in model.params.items()}


def output_dims(model) -> tuple[str, dict]:
    """The output's kind and {output token: residual index}: the program's output space, read
    from the residual labels (``label`` for a numerical output, ``label:value`` for categorical)."""
    labels = [str(label) for label in model.residual_labels]
    space = model.output_space_label
    encoding = getattr(model.output_encoder, "encoding_map", None)
    if encoding is None:
        return "numerical", {NUMERICAL_TOKEN: labels.index(space)}
    return "categorical", {str(value): labels.index(f"{space}:{value}") for value in encoding}


def convert(model) -> tuple[GPT2Config, dict, dict]:
    """The GPT-2 config and state dict computing ``model``'s function, and the token vocabulary."""
    cfg, P = model.model_config, _params(model)
    d = P["token_embed"]["embeddings"].shape[1]
    H, dk, L, hidden = cfg.num_heads, cfg.key_size, cfg.num_layers, cfg.mlp_hidden_size
    head_dim = max(dk, math.ceil(2 * d / H))
    D = H * head_dim
    words = {str(token): i for token, i in model.input_encoder.encoding_map.items()}
    kind, outputs = output_dims(model)
    if kind == "numerical":
        words[NUMERICAL_TOKEN] = len(words)
    V = len(words)

    def write(w):  # a writer [.., d] -> [.., D]: [w, -w, 0]
        out = np.zeros(w.shape[:-1] + (D,))
        out[..., :d], out[..., d : 2 * d] = w, -w
        return out

    def read(w):  # a reader [d, k] -> [D, k]: the + half
        out = np.zeros((D,) + w.shape[1:])
        out[:d] = w
        return out

    def heads(w, b):  # [d, H*dk] -> [D, H*head_dim], zero-padded per head
        w2, b2 = np.zeros((d, H, head_dim)), np.zeros((H, head_dim))
        w2[:, :, :dk], b2[:, :dk] = w.reshape(d, H, dk), b.reshape(H, dk)
        return read(w2.reshape(d, D)), b2.reshape(D)

    sd = {}
    wte = np.zeros((V, D))
    wte[: P["token_embed"]["embeddings"].shape[0]] = write(P["token_embed"]["embeddings"])
    sd["transformer.wte.weight"] = wte
    sd["transformer.wpe.weight"] = write(P["pos_embed"]["embeddings"])
    gamma = math.sqrt(EPSILON)
    for l in range(L):
        a = f"transformer/layer_{l}/attn/"
        fold = math.sqrt(head_dim) / math.sqrt(dk)  # tracr's 1/sqrt(key_size), less GPT-2's 1/sqrt(head_dim)
        q, qb = heads(P[a + "query"]["w"] * fold, P[a + "query"]["b"] * fold)
        k, kb = heads(P[a + "key"]["w"], P[a + "key"]["b"])
        v, vb = heads(P[a + "value"]["w"], P[a + "value"]["b"])
        sd[f"transformer.h.{l}.attn.c_attn.weight"] = np.concatenate([q, k, v], 1)
        sd[f"transformer.h.{l}.attn.c_attn.bias"] = np.concatenate([qb, kb, vb])
        wo = np.zeros((H, head_dim, d))
        wo[:, :dk] = P[a + "linear"]["w"].reshape(H, dk, d)
        sd[f"transformer.h.{l}.attn.c_proj.weight"] = write(wo.reshape(D, d))
        sd[f"transformer.h.{l}.attn.c_proj.bias"] = write(P[a + "linear"]["b"])
        f = f"transformer/layer_{l}/mlp/"
        h1 = P[f + "linear_1"]["w"].shape[1]
        w1, b1, w2 = np.zeros((d, hidden)), np.zeros(hidden), np.zeros((hidden, d))
        w1[:, :h1], b1[:h1], w2[:h1] = P[f + "linear_1"]["w"], P[f + "linear_1"]["b"], P[f + "linear_2"]["w"]
        sd[f"transformer.h.{l}.mlp.c_fc.weight"], sd[f"transformer.h.{l}.mlp.c_fc.bias"] = read(w1), b1
        sd[f"transformer.h.{l}.mlp.c_proj.weight"] = write(w2)
        sd[f"transformer.h.{l}.mlp.c_proj.bias"] = write(P[f + "linear_2"]["b"])
        for ln in ("ln_1", "ln_2"):
            sd[f"transformer.h.{l}.{ln}.weight"], sd[f"transformer.h.{l}.{ln}.bias"] = np.full(D, gamma), np.zeros(D)
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = np.full(D, gamma), np.zeros(D)
    lm = np.zeros((V, D))
    for value, index in outputs.items():
        lm[words[value], index] = 1.0
    sd["lm_head.weight"] = lm
    config = GPT2Config(
        n_layer=L,
        n_head=H,
        n_embd=D,
        n_inner=hidden,
        n_positions=MAX_SEQ_LEN + 1,
        vocab_size=V,
        activation_function="relu",
        layer_norm_epsilon=EPSILON,
        tie_word_embeddings=False,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        bos_token_id=words["BOS"],
        eos_token_id=words["BOS"],
        pad_token_id=words["compiler_pad"],
        architectures=["GPT2LMHeadModel"],
        torch_dtype="float64",
    )
    return config, {k: torch.tensor(v, dtype=torch.float64) for k, v in sd.items()}, words


def true_edges(model, vary_filter: bool = True) -> list[tuple[str, str, str]]:
    """The true circuit as (sender, receiver, slot) by the rule of the module docstring."""
    cfg, P = model.model_config, _params(model)
    labels = [str(label) for label in model.residual_labels]
    H, dk, L = cfg.num_heads, cfg.key_size, cfg.num_layers
    _, outputs = output_dims(model)

    def nonzero_rows(w):
        return set(np.flatnonzero(np.abs(w).sum(1) > 0).tolist())

    def nonzero_cols(w):
        return set(np.flatnonzero(np.abs(w).sum(0) > 0).tolist())

    categories: dict[str, list[int]] = {}  # a categorical variable's value dimensions (one-hot: one is 1)
    for i, label in enumerate(labels):
        if ":" in label and not label.startswith("indices:") and label not in CONSTANT:
            categories.setdefault(label.split(":")[0], []).append(i)

    def informative_rows(w):
        """The dimensions a reader reads, less a categorical variable whose value rows are all
        equal: on its one-hot values that read is the same whatever the value."""
        rows = nonzero_rows(w)
        for dims in categories.values():
            if len(dims) > 1 and all(np.allclose(w[dims[0]], w[i], rtol=0, atol=1e-12) for i in dims[1:]):
                rows -= set(dims)
        return rows

    embed_writes = nonzero_cols(P["token_embed"]["embeddings"]) | nonzero_cols(P["pos_embed"]["embeddings"])
    constant = {i for i, label in enumerate(labels) if label in CONSTANT or label.startswith("indices:")}
    varying_writes = {"input": embed_writes - constant if vary_filter else embed_writes}
    components = []  # (name, {slot: dims read}, dims written), in computation order
    for l in range(L):
        a = f"transformer/layer_{l}/attn/"
        for h in range(H):
            cols = slice(h * dk, (h + 1) * dk)
            qk = (
                P[a + "query"]["w"][:, cols] @ P[a + "key"]["w"][:, cols].T
            )  # [query dim, key dim]: the scores' bilinear form
            reads = {
                "q": informative_rows(qk),
                "k": informative_rows(qk.T),
                "v": informative_rows(P[a + "value"]["w"][:, cols]),
            }
            components.append((f"a{l}.h{h}", reads, nonzero_cols(P[a + "linear"]["w"][cols])))
        f = f"transformer/layer_{l}/mlp/"
        components.append(
            (f"m{l}", {"": informative_rows(P[f + "linear_1"]["w"])}, nonzero_cols(P[f + "linear_2"]["w"]))
        )
    components.append(("logits", {"": set(outputs.values())}, set()))
    edges = []
    for name, reads, writes in components:
        varies = False
        for slot, dims in reads.items():
            for sender, sent in varying_writes.items():
                if sent & dims:
                    edges.append((sender, name, slot))
                    varies = True
        if varies and writes:
            varying_writes[name] = writes
    useful, kept = {"logits"}, []  # only edges on a path to the logits
    for sender, receiver, slot in reversed(edges):
        if receiver in useful:
            useful.add(sender)
            kept.append((sender, receiver, slot))
    return sorted(kept, key=edges.index)


def reference_json(name: str, model, n_heads: int, by_weights: bool = False) -> dict:
    """The true circuit (``tracr-<name>``), or with ``by_weights`` every edge the weights connect,
    varying or not (``tracr-<name>-weights``: ACDC's kind of reference)."""
    edges, weights_only = true_edges(model), true_edges(model, vary_filter=False)
    shown = weights_only if by_weights else edges
    nodes = sorted({n for e in shown for n in e[:2]})
    rule = (
        "an edge connects a residual dimension its sender writes to one its receiver reads, on a path to the logits "
        "(varying or not: attention patterns fixed by position included, as in ACDC's references)"
        if by_weights
        else "an edge carries a residual dimension that varies between inputs of one length, on a path to the logits"
    )
    return {
        "schema": "circuits/reference",
        "version": 1,
        "name": f"tracr-{name}" + ("-weights" if by_weights else ""),
        "task": f"tracr-{name}",
        "model": f"tracr-{name}",
        "n_layers": model.model_config.num_layers,
        "n_heads": n_heads,
        "n_kv_groups": n_heads,
        "title": (
            f"tracr {name}: every edge its compiled weights connect ({len(shown)} edges)"
            if by_weights
            else f"tracr {name}: the circuit compiled from its RASP program ({len(shown)} edges)"
        ),
        "citation": (
            "Lindner et al. 2023, Tracr: Compiled Transformers as a Laboratory for Interpretability "
            "(arXiv:2301.05062); edges by the rule of scripts/tracr_compile.py"
            + (" without the varying filter" if by_weights else " (the edges that carry the input)")
        ),
        "classes": [],
        "groups": {n: [n] for n in nodes},
        "connections": [{"from": s, "to": r, "slots": slot or "qkv"} for s, r, slot in shown],
        "published": {
            "weights_only_edges": len(weights_only),
            "true_edges": len(edges),
            "program": PROGRAMS[name][2],
            "rule": rule,
        },
    }


def tracr_outputs(model, vocab) -> list[dict]:
    """tracr's final residual at the output dimensions, every position, for every input of every length."""
    _, outputs = output_dims(model)
    rows = []
    for length in range(1, MAX_SEQ_LEN):
        for seq in itertools.product(vocab, repeat=length):
            residual = np.asarray(model.apply(["BOS", *seq]).transformer_output, dtype=np.float64)[0]
            rows.append(
                {
                    "input": [str(t) for t in seq],
                    "outputs": {v: residual[:, i].tolist() for v, i in outputs.items()},
                    "decoded": [None if x is None else str(x) for x in model.apply(["BOS", *seq]).decoded[1:]],
                }
            )
    return rows


def tokenizer(words: dict, folder: Path) -> None:
    tk = Tokenizer(models.WordLevel(words, unk_token="compiler_pad"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="BOS", pad_token="compiler_pad", unk_token="compiler_pad"
    ).save_pretrained(folder)


def main(names: list[str]) -> None:
    for name in names or list(PROGRAMS):
        model = compile_program(name)
        config, state, words = convert(model)
        folder = ROOT / "discovery" / "compiled" / name
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        tokenizer(words, folder)
        kind, outputs = output_dims(model)
        vocab = PROGRAMS[name][1]
        program = {
            "program": name,
            "description": PROGRAMS[name][2],
            "vocabulary": [str(v) for v in vocab],
            "max_seq_len": MAX_SEQ_LEN,
            "output": kind,
            "output_tokens": list(outputs),
            "residual_labels": [str(label) for label in model.residual_labels],
            "layer_norm_epsilon": EPSILON,
            "tracr": tracr_outputs(model, vocab),
        }
        (folder / "program.json").write_text(json.dumps(program, indent=1) + "\n")
        ref = reference_json(name, model, model.model_config.num_heads)
        (ROOT / "graphs" / "references" / f"tracr-{name}.json").write_text(json.dumps(ref, indent=1) + "\n")
        by_weights = reference_json(name, model, model.model_config.num_heads, by_weights=True)
        (ROOT / "graphs" / "references" / f"tracr-{name}-weights.json").write_text(
            json.dumps(by_weights, indent=1) + "\n"
        )
        print(
            f"{name}: {config.n_layer} layers, {config.n_head} heads, d_model {config.n_embd}; "
            f"{len(program['tracr'])} inputs; true circuit {len(ref['connections'])} edges "
            f"({ref['published']['weights_only_edges']} by weights alone): "
            + ", ".join(
                f"{c['from']}->{c['to']}" + (f"<{c['slots']}>" if c["slots"] != "qkv" else "")
                for c in ref["connections"]
            )
        )


if __name__ == "__main__":
    main(sys.argv[1:])
