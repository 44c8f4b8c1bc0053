"""Reference circuits (gpt2-ioi, gpt2-greater-than), grading measures, and `circuits grade`.

Everything runs on a GPT-2-small-shaped edge graph built from its sizes alone (no weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_in_process as _run
from tiny_models import circuit_of

from circuitfinder.engine.adapter import ModelShape
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.errors import UserError
from circuitfinder.graphs.grading import average_ranks, grade, node_scores, precision_recall, roc_auc, top_k
from circuitfinder.graphs.reference import load_reference, node_mask, reference_mask, reference_nodes
from circuitfinder.graphs.references import available

ROOT = Path(__file__).resolve().parents[2]
GPT2 = EdgeGraph(ModelShape(12, 12, 12, 768))


# ---------------------------------------------------------------------------------------------
# ROC-AUC, precision and recall
# ---------------------------------------------------------------------------------------------


def _pairwise_auc(scores, labels) -> float:
    """P(positive scores above a negative) + ½ P(tie), by counting every pair."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_average_ranks_share_ties():
    assert average_ranks([3.0, 1.0, 3.0, 2.0, 3.0]).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


def test_roc_auc_by_hand():
    # positives 0.35, 0.8 against negatives 0.1, 0.4: 0.35 beats 0.1 only, 0.8 beats both -> 3/4
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # positives 1, 2 against negatives 1, 0: 1~1 ties (½), 1>0, 2>1, 2>0 -> 3.5/4
    assert roc_auc([1.0, 1.0, 2.0, 0.0], [1, 0, 1, 0]) == 0.875


def test_roc_auc_equals_the_pairwise_count_with_many_ties():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(2, 60))
        scores = rng.integers(0, 4, n).astype(float)  # four values: ties everywhere
        labels = rng.random(n) < 0.3
        labels[:2] = [True, False]
        assert roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)


def test_roc_auc_perfect_reversed_random_and_degenerate():
    rng = np.random.default_rng(1)
    labels = rng.random(30_000) < 0.03
    assert roc_auc(labels + rng.random(30_000) * 0.5, labels) == 1.0
    assert roc_auc(-(labels + rng.random(30_000) * 0.5), labels) == 0.0
    assert roc_auc(rng.random(30_000), labels) == pytest.approx(0.5, abs=0.03)  # sd about 0.01 here
    assert roc_auc(np.ones(10), [1] * 3 + [0] * 7) == 0.5
    assert roc_auc([1.0, 2.0], [1, 1]) is None and roc_auc([1.0, 2.0], [0, 0]) is None
    with pytest.raises(ValueError, match="finite"):
        roc_auc([1.0, float("nan")], [1, 0])


def test_precision_recall_and_top_k_by_hand():
    assert precision_recall([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == {
        "precision": 2 / 3,
        "recall": 2 / 3,
        "f1": pytest.approx(2 / 3),
        "shared": 2,
    }
    assert precision_recall([0, 0], [1, 0])["precision"] is None
    assert precision_recall([1, 0], [0, 1])["f1"] == 0.0
    assert top_k([0.5, 0.9, 0.5, 0.1], 2).tolist() == [True, True, False, False]  # the tie goes to the earlier


# ---------------------------------------------------------------------------------------------
# A hand-worked grading on the smallest graph
# ---------------------------------------------------------------------------------------------


def test_grade_by_hand_on_a_one_layer_one_head_graph():
    g = EdgeGraph(ModelShape(1, 1, 1, 4))
    assert g.n_edges == 8  # input->q,k,v,m0,logits; a0.h0->m0,logits; m0->logits
    scores = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
    ref = torch.zeros_like(scores, dtype=torch.bool)
    circuit = torch.zeros_like(ref)
    values = {
        "input->a0.h0<q>": -0.9,
        "input->a0.g0<k>": 0.2,
        "input->a0.g0<v>": 0.1,
        "input->m0": 0.5,
        "a0.h0->m0": -0.3,
        "input->logits": 0.05,
        "a0.h0->logits": 0.4,
        "m0->logits": 0.6,
    }
    for name, v in values.items():
        scores[g.edge_index(name)] = v
    for name in ("input->a0.h0<q>", "a0.h0->logits"):
        ref[g.edge_index(name)] = True
    for name in ("input->m0", "m0->logits", "a0.h0->logits"):
        circuit[g.edge_index(name)] = True
    result = grade(g, ref, circuit, scores)
    e, n = result["edges"], result["nodes"]
    # |score| 0.9 (ref) beats all six others, 0.4 (ref) beats 0.3, 0.2, 0.1, 0.05: 10 of 12 pairs
    assert e["roc_auc"] == pytest.approx(10 / 12)
    assert (e["precision"], e["recall"], e["f1"]) == (pytest.approx(1 / 3), 0.5, pytest.approx(0.4))
    # top 3 by |score|: 0.9 (ref), 0.6, 0.5; top 2: 0.9, 0.6
    assert (e["top_k_precision"], e["top_k_recall"], e["r_precision"]) == (pytest.approx(1 / 3), 0.5, 0.5)
    # node scores: a0.h0 = 0.9+0.2+0.1 in, 0.3+0.4 out = 1.9; m0 = 0.5+0.3 in, 0.6 out = 1.4
    assert node_scores(g, scores).tolist() == pytest.approx([0.0, 1.9, 1.4])
    assert n["total"] == 2 and n["reference"] == 1 and n["roc_auc"] == 1.0  # a0.h0 (ref) above m0
    assert (n["circuit"], n["precision"], n["recall"]) == (2, 0.5, 1.0)  # circuit touches m0 and a0.h0


# ---------------------------------------------------------------------------------------------
# The reference circuits
# ---------------------------------------------------------------------------------------------


def test_ioi_heads_by_class_are_wang_et_al_s():
    ref = load_reference("gpt2-ioi")
    heads = {c: sorted(ref.groups[c]) for c in ref.classes}
    assert heads == {
        "name mover": sorted(["a9.h9", "a10.h0", "a9.h6"]),
        "backup name mover": sorted(["a10.h10", "a10.h6", "a10.h2", "a10.h1", "a11.h2", "a9.h7", "a9.h0", "a11.h9"]),
        "negative name mover": sorted(["a10.h7", "a11.h10"]),
        "S-inhibition": sorted(["a7.h3", "a7.h9", "a8.h6", "a8.h10"]),
        "induction": sorted(["a5.h5", "a5.h8", "a5.h9", "a6.h9"]),
        "duplicate token": sorted(["a0.h1", "a0.h10", "a3.h0"]),
        "previous token": sorted(["a2.h2", "a4.h11"]),
    }
    assert len(ref.node_classes()) == 26


def test_reference_edge_and_node_counts_for_gpt2_small():
    assert GPT2.n_edges == 32_491
    # gpt2-ioi, by hand. The layers of the 26 heads sum to 189 (movers 9+10+9, backup 4·10+11+9+9+11,
    # negative 10+11, S-inhibition 7+7+8+8, induction 5+5+5+6, duplicate 0+0+3, previous 2+4).
    #   input, 12 MLPs, logits fully connected: 12 input->MLP + 66 MLP->later MLP + 12 MLP->logits + 1 = 91
    #   every earlier MLP -> each circuit head's q, k, v: 3 · 189 = 567
    #   each circuit head -> every MLP of its layer and later: 26 · 12 − 189 = 123
    #   input -> previous (2 heads · qkv) 6, duplicate (3 · qkv) 9, S-inhibition q 4, 13 movers k, v 26 = 45
    #   previous -> induction k, v: 2·4·2 = 16; induction -> S-inh k, v: 4·4·2 = 32; duplicate -> S-inh k, v: 3·4·2 = 24
    #   S-inhibition -> 13 movers' q: 4·13 = 52; 13 movers -> logits: 13
    #   91 + 567 + 123 + 45 + 16 + 32 + 24 + 52 + 13 = 963
    ioi = load_reference("gpt2-ioi")
    assert int(reference_mask(ioi, GPT2).sum()) == 963
    assert len(reference_nodes(ioi, GPT2)) == 26 + 12  # every MLP is in the IOI reference
    # gpt2-greater-than, by hand (heads 0.1, 0.3, 0.5; mid heads at layers 5, 6, 6, 7, 8, 9):
    #   input -> 3 early heads' q, k, v and MLPs 0-3: 9 + 4 = 13;  6 mid heads + MLPs 8-11 -> logits: 10
    #   MLPs 0-3 among themselves 6, MLPs 8-11 among themselves 6: 12
    #   head 0.1 -> MLPs 0-3: 4;  3 early heads -> mid q, k, v: 3·6·3 = 54;  MLPs 0-3 -> mid q, k, v: 4·6·3 = 72
    #   mid heads -> MLPs 8-11 of their layer or later: 4+4+4+4+4+3 = 23
    #   MLPs 0-8 -> later MLPs 0-8: 36, of which the 6 among MLPs 0-3 are counted already: 30
    #   MLPs before each mid head -> its q: 5+6+6+7+8+9 = 41, of which MLPs 0-3 (6·4 = 24) already: 17
    #   13 + 10 + 12 + 4 + 54 + 72 + 23 + 30 + 17 = 235
    gt = load_reference("gpt2-greater-than")
    assert int(reference_mask(gt, GPT2).sum()) == 235
    assert len(reference_nodes(gt, GPT2)) == 9 + 12  # MLPs 4-7 only through ACDC's clean-query rule


def test_ioi_mask_is_what_acdc_s_procedure_gives():
    """ACDC's get_ioi_true_edges, replayed on this graph: keep the 26 heads, the MLPs, the input and the
    logits with all their edges; drop the circuit heads' edges from the input and other heads and to the
    logits; add the special connections, "INPUT" being the input and every MLP, "OUTPUT" the logits and
    every MLP, wherever the receiver comes later."""
    ref = load_reference("gpt2-ioi")
    heads = ref.node_classes()

    def head_of(receiver: str) -> str:
        return receiver.split("<")[0].replace(".g", ".h")  # 12 groups of one head each

    def layer(node: str) -> int:
        return -1 if node == "input" else 13 if node == "logits" else int(node[1:].split(".")[0])

    kept = set()
    for s, r in torch.nonzero(GPT2.allowed).tolist():
        sn, rn = GPT2.sender_names[s], GPT2.receiver_names[r]
        if any(n.startswith("a") and n not in heads for n in (sn, head_of(rn))):
            continue
        if head_of(rn) in heads and (sn == "input" or sn.startswith("a")) or sn in heads and rn == "logits":
            continue
        kept.add((sn, rn))
    movers = ("name mover", "backup name mover", "negative name mover")
    special = (
        [("INPUT", "previous token", "qkv"), ("INPUT", "duplicate token", "qkv"), ("INPUT", "S-inhibition", "q")]
        + [("INPUT", m, "kv") for m in movers]
        + [
            ("previous token", "induction", "kv"),
            ("induction", "S-inhibition", "kv"),
            ("duplicate token", "S-inhibition", "kv"),
        ]
        + [("S-inhibition", m, "q") for m in movers]
        + [(m, "OUTPUT", "") for m in movers]
    )
    mlps = [f"m{i}" for i in range(12)]
    for a, b, slots in special:
        senders = ["input", *mlps] if a == "INPUT" else list(ref.groups[a])
        receivers = (
            ["logits", *mlps]
            if b == "OUTPUT"
            else [f"{h}<q>" if x == "q" else f"{h.replace('.h', '.g')}<{x}>" for h in ref.groups[b] for x in slots]
        )
        kept |= {(s, r) for s in senders for r in receivers if layer(head_of(r)) > layer(s)}
    mask = reference_mask(ref, GPT2)
    assert {GPT2.edge_name(s, r) for s, r in torch.nonzero(mask).tolist()} == {f"{s}->{r}" for s, r in kept}


@pytest.mark.parametrize(
    "name, edge, present",
    [
        ("gpt2-ioi", "a2.h2->a5.g5<k>", True),  # previous token -> induction key
        ("gpt2-ioi", "a2.h2->a5.h5<q>", False),  # ... but not its query
        ("gpt2-ioi", "input->a9.h9<q>", False),  # a name mover's query reads S-inhibition, not the input
        ("gpt2-ioi", "input->a9.g9<k>", True),
        ("gpt2-ioi", "m3->a9.h9<q>", True),  # MLPs feed every circuit head
        ("gpt2-ioi", "a9.h9->logits", True),
        ("gpt2-ioi", "a7.h3->logits", False),  # S-inhibition heads act through the movers
        ("gpt2-ioi", "a7.h3->a9.h9<q>", True),
        ("gpt2-ioi", "a0.h0->m5", False),  # a head outside the circuit
        ("gpt2-ioi", "input->logits", True),
        ("gpt2-greater-than", "a0.h1->m0", True),  # a head feeds the MLP of its own layer
        ("gpt2-greater-than", "a0.h3->m0", False),  # only head 0.1 feeds the early MLPs
        ("gpt2-greater-than", "m6->a7.h10<q>", True),  # every earlier MLP -> mid heads' queries
        ("gpt2-greater-than", "m6->a7.g10<k>", False),
        ("gpt2-greater-than", "a9.h1->m8", False),  # not computed before m8
        ("gpt2-greater-than", "input->logits", False),
    ],
)
def test_reference_edges(name, edge, present):
    mask = reference_mask(load_reference(name), GPT2)
    assert bool(mask[GPT2.edge_index(edge)]) is present


def test_a_model_of_another_shape_is_refused():
    for shape in (ModelShape(30, 9, 3, 576), ModelShape(12, 12, 4, 768), ModelShape(3, 4, 4, 16)):
        with pytest.raises(
            UserError, match=r"reference gpt2-ioi is for gpt2 \(12 layers, 12 heads, 12 key/value groups\)"
        ):
            reference_mask(load_reference("gpt2-ioi"), shape)


def test_an_unknown_reference_names_the_available_ones():
    names = [
        "gpt2-greater-than",
        "gpt2-ioi",
        "tracr-frac_prevs",
        "tracr-frac_prevs-weights",
        "tracr-pair_balance",
        "tracr-pair_balance-weights",
        "tracr-reverse",
        "tracr-reverse-weights",
    ]
    assert available() == names
    with pytest.raises(UserError, match=f"unknown reference 'gpt2-docstring'; available: {', '.join(names)}"):
        load_reference("gpt2-docstring")


def test_a_wheel_holds_every_module_and_the_references(tmp_path):
    """A non-editable install gets the whole ``circuitfinder`` namespace: every module of the three
    folders under its import name, and the reference circuits as package data."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # a copy: setuptools writes build/ into the folder it builds
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("discovery", "tasks", "graphs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("circuitfinder-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    prefix = {"discovery": "circuitfinder", "tasks": "circuitfinder/tasks", "graphs": "circuitfinder/graphs"}
    want = {
        f"{prefix[folder]}/{p.relative_to(ROOT / folder).as_posix()}"
        for folder in prefix
        for p in (ROOT / folder).rglob("*")
        if p.suffix in (".py", ".json")
    }
    assert want - names == set()
    assert {p.stem for p in (ROOT / "graphs" / "references").glob("*.json")} == set(available())


# ---------------------------------------------------------------------------------------------
# Grading on GPT-2 small's graph
# ---------------------------------------------------------------------------------------------

REF = reference_mask(load_reference("gpt2-ioi"), GPT2)


def _signed(values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The values with random signs (grading ranks |score|)."""
    g = torch.Generator().manual_seed(seed)
    return values * (torch.randint(0, 2, values.shape, generator=g) * 2 - 1)


def test_perfect_scores_grade_one():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(REF.shape, generator=g, dtype=torch.float64)
    result = grade(GPT2, REF, REF, _signed(REF + 0.9 * noise))  # every reference edge above every other
    e = result["edges"]
    assert e["roc_auc"] == 1.0 and e["r_precision"] == 1.0
    assert (e["precision"], e["recall"], e["f1"], e["top_k_precision"], e["top_k_recall"]) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert (e["total"], e["reference"], e["circuit"]) == (32_491, 963, 963)
    n = grade(GPT2, REF, REF, _signed(REF.double()))["nodes"]  # nodes outside the reference touch no scored edge
    assert n["roc_auc"] == 1.0 and (n["precision"], n["recall"], n["total"], n["reference"]) == (1.0, 1.0, 156, 38)


def test_reversed_and_random_scores():
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(REF.shape, generator=g, dtype=torch.float64)
    reversed_ = grade(GPT2, REF, scores=_signed((~REF) + 0.9 * noise))["edges"]
    assert reversed_["roc_auc"] == 0.0 and reversed_["r_precision"] == 0.0
    assert "precision" not in reversed_  # no circuit given
    random = grade(GPT2, REF, scores=_signed(noise))["edges"]
    assert random["roc_auc"] == pytest.approx(0.5, abs=0.03)  # sd about 0.01 with 963 of 32,491
    assert random["r_precision"] == pytest.approx(963 / 32_491, abs=0.02)


def test_a_partial_circuit_and_no_scores():
    ref_edges = torch.nonzero(REF).tolist()
    others = torch.nonzero(GPT2.allowed & ~REF).tolist()[:37]
    circuit = torch.zeros_like(REF)
    for s, r in ref_edges[:300] + others:
        circuit[s, r] = True
    e = grade(GPT2, REF, circuit)["edges"]
    assert (e["circuit"], e["shared"]) == (337, 300)
    assert e["precision"] == 300 / 337 and e["recall"] == 300 / 963
    assert e["roc_auc"] is None and e["top_k_precision"] is None
    assert node_mask(GPT2, circuit)[0].item() is False  # the input is never a graded node


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def _fake_run(
    folder: Path,
    circuit: torch.Tensor,
    scores: torch.Tensor | None,
    graph: EdgeGraph = GPT2,
    task: str = "ioi",
    model: str = "gpt2",
) -> Path:
    """A run folder as `circuits discover` writes it (the files grade reads)."""
    from circuitfinder.graphs.tables import scores_table

    folder.mkdir(parents=True)
    s = graph.shape
    found = circuit_of(
        model=model,
        task=task,
        method="eap-ig",
        n_layers=s.n_layers,
        n_heads=s.n_heads,
        n_kv_groups=s.n_kv_groups,
        edges=[
            {"sender": graph.sender_names[i], "receiver": graph.receiver_names[j], "score": 1.0}
            for i, j in torch.nonzero(circuit).tolist()
        ],
    )
    found.save(folder / "circuit.json")
    if scores is not None:
        scores_table(found.replace(scores=scores)).to_parquet(folder / "scores.parquet", index=False)
    (folder / "config.json").write_text(json.dumps({"task": task, "model": model, "method": "eap-ig"}))
    return folder


def test_cli_grade_writes_json_and_csv_once(tmp_path, capsys):
    run = _fake_run(tmp_path / "run", REF, _signed(REF + 0.5 * torch.rand(REF.shape, dtype=torch.float64)))
    code, out, err = _run(capsys, "grade", str(run), "--reference", "gpt2-ioi")
    assert code == 0, err
    assert "963 of 32,491 edges" in out and "ACDC edge ROC-AUC 0.868" in out
    result = json.loads((run / "grade-gpt2-ioi.json").read_text())
    head, edges, nodes = out.splitlines()[1:4]
    n = result["nodes"]
    assert head.split() == [
        "level",
        "reference",
        "circuit",
        "shared",
        "precision",
        "recall",
        "F1",
        "ROC-AUC",
        "top-k",
        "P",
        "top-k",
        "R",
        "R-prec",
    ]
    assert edges.split() == ["edges", "963", "963", "963"] + ["1.000"] * 7
    assert nodes.split() == ["nodes", "38", "38", "38"] + [
        f"{n[k]:.3f}"
        for k in ("precision", "recall", "f1", "roc_auc", "top_k_precision", "top_k_recall", "r_precision")
    ]
    assert result["edges"]["roc_auc"] == 1.0 and result["scores"] == "scores.parquet (eap-ig)" and result["notes"] == []
    import pandas as pd

    table = pd.read_csv(run / "grade-gpt2-ioi.csv")
    assert list(table.level) == ["edges", "nodes"] and table.roc_auc[0] == 1.0
    assert table.roc_auc[1] == result["nodes"]["roc_auc"] < 1  # non-reference heads sum many small scores
    code, _, err = _run(capsys, "grade", str(run), "--reference", "gpt2-ioi")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert _run(capsys, "grade", str(run), "--overwrite")[0] == 0  # the run's task picks gpt2-ioi


def test_cli_grade_without_scores_grades_the_circuit(tmp_path, capsys):
    circuit = REF.clone()
    circuit[GPT2.edge_index("a0.h0->logits")] = True
    run = _fake_run(tmp_path / "run", circuit, None, task="greater-than")
    code, out, err = _run(capsys, "grade", str(run), "--reference", "gpt2-ioi")
    assert code == 0, err
    result = json.loads((run / "grade-gpt2-ioi.json").read_text())
    assert result["edges"]["precision"] == 963 / 964 and result["edges"]["recall"] == 1.0
    assert result["edges"]["roc_auc"] is None and result["scores"] is None
    assert any("no scores.parquet" in n for n in result["notes"]) and any(
        "task is 'greater-than'" in n for n in result["notes"]
    )
    assert "note: no scores.parquet" in out


def test_cli_grade_list_and_bad_input(tmp_path, capsys):
    code, out, _ = _run(capsys, "grade", "--list")
    assert code == 0 and out.startswith("gpt2-greater-than: ") and "gpt2-ioi: " in out and "0.868" in out
    run = _fake_run(tmp_path / "run", REF, None)
    small = EdgeGraph(ModelShape(30, 9, 3, 576))
    other = _fake_run(
        tmp_path / "smollm",
        torch.zeros(small.n_senders, small.n_receivers, dtype=torch.bool),
        None,
        graph=small,
        model="smollm2-135m",
    )
    for args, message in [
        (
            ("grade", str(run), "--reference", "docstring"),
            "unknown reference 'docstring'; available: gpt2-greater-than, gpt2-ioi",
        ),
        (("grade", str(other), "--reference", "gpt2-ioi"), "this model has 30 layers, 9 heads, 3 key/value groups"),
        (("grade", str(tmp_path / "nowhere")), "no circuit file"),
        (("grade",), "give a run folder"),
    ]:
        code, _, err = _run(capsys, *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
        assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    assert not list(other.glob("grade-*"))
