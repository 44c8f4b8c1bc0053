"""Comparing two circuits: of one model (two tasks, methods or seeds), or of two models.

Between circuits of **one model shape** (same layers, heads and key/value groups), names match:

* **node Jaccard** |A ∩ B| / |A ∪ B| over the heads and MLPs of the two circuits (the nodes of
  ``Circuit.nodes``; input and logits, in every circuit, are left out);
* **edge Jaccard** over the circuits' edges (``a0.h3->a5.g1<k>``);
* **overlap at equal size**: with k the smaller circuit's edge count, the share of the k
  largest-|score| edges of A that are among the k largest of B (1 for one circuit twice);
* **weighted overlap** (Ruzicka similarity; weighted Jaccard): Σ_e min(w_A(e), w_B(e)) /
  Σ_e max(w_A(e), w_B(e)), with w(e) = |score(e)| / Σ|score| within each circuit, so that methods
  with different score scales compare.

Between **models of different depth or width**, nodes are aligned by relative depth (layer /
n_layers, in ``bins`` equal bins: fifths by default) and by head role (``circuitfinder.graphs.roles``): the
depth table says, per bin, how many heads and MLPs each circuit has there, what share of its
|score| leaves from there, and which roles both, only A or only B have there. Both tables are
written for circuits of one model too.

The diff diagram shows what is shared, only in A and only in B: by name for one model shape (the
strongest ``max_edges`` node links of the union), by depth bin and kind otherwise.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pandas as pd

from circuitfinder.errors import UserError
from circuitfinder.folders import atomic_dir, check_out_dir
from circuitfinder.graphs.circuit import Circuit, from_networkx, load_circuit, parse_name


def same_shape(a: Circuit, b: Circuit) -> bool:
    return (a.n_layers, a.n_heads, a.n_kv_groups) == (b.n_layers, b.n_heads, b.n_kv_groups)


def units(circuit: Circuit) -> set[str]:
    """The circuit's heads and MLPs (its nodes without input and logits)."""
    return circuit.nodes() - {"input", "logits"}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def same_model_metrics(a: Circuit, b: Circuit) -> dict:
    """Node and edge Jaccard, overlap at equal size and weighted overlap (see the module docstring)."""
    sa = {n: abs(float(e["score"])) for n, e in zip(a.edge_names(), a.edges)}
    sb = {n: abs(float(e["score"])) for n, e in zip(b.edge_names(), b.edges)}
    k = min(len(sa), len(sb))

    def top(s: dict) -> set:
        return set(sorted(s, key=lambda n: (-s[n], n))[:k])

    ta, tb = sum(sa.values()) or 1.0, sum(sb.values()) or 1.0
    wa, wb = {n: v / ta for n, v in sa.items()}, {n: v / tb for n, v in sb.items()}
    union = set(wa) | set(wb)
    low = sum(min(wa.get(n, 0.0), wb.get(n, 0.0)) for n in union)
    high = sum(max(wa.get(n, 0.0), wb.get(n, 0.0)) for n in union)
    na, nb = units(a), units(b)
    return {
        "node_jaccard": jaccard(na, nb),
        "edge_jaccard": jaccard(set(sa), set(sb)),
        "overlap_at_equal_size": len(top(sa) & top(sb)) / k if k else 1.0,
        "equal_size_k": k,
        "weighted_overlap": low / high if high else 1.0,
        "shared_nodes": len(na & nb),
        "shared_edges": len(set(sa) & set(sb)),
    }


def depth_bin(layer: int, n_layers: int, bins: int) -> int:
    """The bin of relative depth layer / n_layers among ``bins`` equal bins."""
    return min(bins - 1, layer * bins // n_layers)


def bin_label(k: int, bins: int) -> str:
    return f"{round(100 * k / bins)}–{round(100 * (k + 1) / bins)}%"


def _roles_of(record: Circuit, node: str) -> list[str]:
    role = (record.roles.get(node) or {}).get("role")
    return [r.strip() for r in role.split(",")] if role else []


def _by_bin(record: Circuit, bins: int) -> list[dict]:
    """Per depth bin: heads, MLPs, |score| sent, role counts."""
    graph = record.to_networkx()
    out = [{"heads": 0, "mlps": 0, "sent": 0.0, "roles": Counter()} for _ in range(bins)]
    for node, d in graph.nodes(data=True):
        if d["kind"] not in ("attn", "mlp"):
            continue
        b = out[depth_bin(d["layer"], record.n_layers, bins)]
        b["heads" if d["kind"] == "attn" else "mlps"] += 1
        b["roles"].update(_roles_of(record, node))
    for e in record.edges:
        if e["sender"] != "input":
            out[depth_bin(parse_name(e["sender"]).layer, record.n_layers, bins)]["sent"] += abs(float(e["score"]))
    return out


def _counts(c: Counter) -> str:
    return ", ".join(f"{r}×{n}" if n > 1 else r for r, n in sorted(c.items(), key=lambda x: (-x[1], x[0])))


def depth_table(a: Circuit, b: Circuit, bins: int = 5) -> pd.DataFrame:
    """Per bin of relative depth: what each circuit has there, and which roles are shared or missing.

    ``*_score_share`` is the share of the circuit's |score| carried by edges whose sender lies
    in the bin (the input's edges count for no bin).
    """
    ba, bb = _by_bin(a, bins), _by_bin(b, bins)
    ta = sum(x["sent"] for x in ba) or 1.0
    tb = sum(x["sent"] for x in bb) or 1.0
    rows = []
    for k, (x, y) in enumerate(zip(ba, bb)):
        ra, rb = set(x["roles"]), set(y["roles"])
        rows.append(
            {
                "depth": bin_label(k, bins),
                "A_heads": x["heads"],
                "B_heads": y["heads"],
                "A_mlps": x["mlps"],
                "B_mlps": y["mlps"],
                "A_score_share": x["sent"] / ta,
                "B_score_share": y["sent"] / tb,
                "A_roles": _counts(x["roles"]),
                "B_roles": _counts(y["roles"]),
                "shared_roles": ", ".join(sorted(ra & rb)),
                "only_A_roles": ", ".join(sorted(ra - rb)),
                "only_B_roles": ", ".join(sorted(rb - ra)),
            }
        )
    return pd.DataFrame(rows)


def role_table(a: Circuit, b: Circuit) -> pd.DataFrame:
    """Per role: the heads of each circuit with it, and their relative depth (layer / n_layers)."""

    def heads(record: Circuit) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        graph = record.to_networkx()
        for node, d in sorted(graph.nodes(data=True), key=lambda x: (x[1]["layer"], x[1].get("head") or 0)):
            for role in _roles_of(record, node):
                out.setdefault(role, []).append(f"{node} ({d['layer'] / record.n_layers:.2f})")
        return out

    ha, hb = heads(a), heads(b)
    return pd.DataFrame(
        [
            {
                "role": r,
                "A_count": len(ha.get(r, [])),
                "B_count": len(hb.get(r, [])),
                "A_heads": ", ".join(ha.get(r, [])),
                "B_heads": ", ".join(hb.get(r, [])),
            }
            for r in sorted(set(ha) | set(hb))
        ],
        columns=["role", "A_count", "B_count", "A_heads", "B_heads"],
    )


def _status(in_a: bool, in_b: bool) -> str:
    return "shared" if in_a and in_b else ("A" if in_a else "B")


def diff_graph(a: Circuit, b: Circuit, max_edges: int = 150) -> nx.DiGraph:
    """Union of two circuits of one model shape at node level, each part marked shared, A or B.

    Edges are weighted by the larger of their two circuits' |score| (each circuit's scaled by its
    largest). Up to a quarter of ``max_edges`` goes to the heaviest links only in A, as much to
    those only in B, the rest to the heaviest of all; then the drawing is pruned to
    input → logits paths.
    Statuses refer to the whole circuits, not to the drawn part.
    """
    ga, gb = a.to_networkx(), b.to_networkx()
    ma = max((d["abs_score"] for *_, d in ga.edges(data=True)), default=1.0) or 1.0
    mb = max((d["abs_score"] for *_, d in gb.edges(data=True)), default=1.0) or 1.0
    weights = {}
    for g, m in ((ga, ma), (gb, mb)):
        for u, v, d in g.edges(data=True):
            weights[u, v] = max(weights.get((u, v), 0.0), d["abs_score"] / m)
    status = {e: _status(ga.has_edge(*e), gb.has_edge(*e)) for e in weights}
    ranked = sorted(weights, key=lambda e: (-weights[e], e))
    quota = {"A": max_edges // 4, "B": max_edges // 4}  # so that differences show even when the strongest parts agree
    keep = []
    for which in ("A", "B"):
        keep += [e for e in ranked if status[e] == which][: quota[which]]
    chosen = set(keep)
    keep += [e for e in ranked if e not in chosen][: max_edges - len(keep)]
    out = nx.DiGraph()
    for u, v in keep:
        for n in (u, v):
            if n not in out:
                d = dict(ga.nodes[n] if n in ga else gb.nodes[n])
                ra, rb = ", ".join(_roles_of(a, n)), ", ".join(_roles_of(b, n))
                d["role"] = (
                    ra if ra == rb else " / ".join(x for x in (f"A: {ra}" if ra else "", f"B: {rb}" if rb else "") if x)
                )
                d["role"] = d["role"] or None
                out.add_node(n, **d, status=_status(n in ga, n in gb))
        slots = (ga.edges[u, v].get("slot") if ga.has_edge(u, v) else None) or (
            gb.edges[u, v].get("slot") if gb.has_edge(u, v) else None
        )
        out.add_edge(u, v, weight=weights[u, v], status=status[u, v], label=",".join(slots or ""))
    # pruned as one circuit to input → logits paths: the union of the edges of A and B the links stand for
    part_a = from_networkx(ga.edge_subgraph([e for e in keep if ga.has_edge(*e)]).copy(), like=a)
    part_b = from_networkx(gb.edge_subgraph([e for e in keep if gb.has_edge(*e)]).copy(), like=b)
    union = part_a.replace(mask=part_a.mask | part_b.mask).prune().to_networkx()
    return out.edge_subgraph([e for e in out.edges if union.has_edge(*e)]).copy()


def depth_diff_graph(a: Circuit, b: Circuit, bins: int = 5) -> nx.DiGraph:
    """Two circuits merged to units of (depth bin, kind), each unit and link marked shared, A or B."""

    def unit(record: Circuit, node: str) -> str:
        p = parse_name(node)
        return node if p.kind in ("input", "logits") else f"{p.kind}@{depth_bin(p.layer, record.n_layers, bins)}"

    parts = []
    for record in (a, b):
        g = record.to_networkx()
        nodes, roles, links = Counter(), {}, Counter()
        for n, d in g.nodes(data=True):
            nodes[unit(record, n)] += 1
            roles.setdefault(unit(record, n), Counter()).update(_roles_of(record, n))
        for e in record.edges:
            r = parse_name(e["receiver"])
            target = "logits" if r.kind == "logits" else (f"a{r.layer}.h0" if r.kind == "attn" else f"m{r.layer}")
            links[unit(record, e["sender"]), unit(record, target)] += 1
        parts.append((nodes, roles, links))
    (na, ra, la), (nb, rb, lb) = parts
    out = nx.DiGraph()
    for u in sorted(set(na) | set(nb)):
        kind, _, k = u.partition("@")
        layer = -1 if u == "input" else (bins if u == "logits" else int(k))
        what = {"attn": "heads", "mlp": "MLPs"}.get(kind, u)
        label = u if u in ("input", "logits") else f"{what} {bin_label(layer, bins)}\nA {na[u]} · B {nb[u]}"
        roles_a, roles_b = ra.get(u, Counter()), rb.get(u, Counter())
        role = " / ".join(
            x for x in (f"A: {_counts(roles_a)}" if roles_a else "", f"B: {_counts(roles_b)}" if roles_b else "") if x
        )
        out.add_node(
            u,
            kind=kind if kind in ("attn", "mlp") else u,
            layer=layer,
            label=label,
            role=role or None,
            status=_status(u in na, u in nb),
        )
    ta, tb = sum(la.values()) or 1, sum(lb.values()) or 1
    for e in sorted(set(la) | set(lb)):
        out.add_edge(
            *e, weight=max(la[e] / ta, lb[e] / tb), status=_status(e in la, e in lb), label=f"A {la[e]} · B {lb[e]}"
        )
    return out


def _stem(source: Path) -> str:
    """A run folder's name, or the name of the folder holding a circuit file."""
    source = Path(source).resolve()
    return source.name if source.is_dir() else source.parent.name


def _name(source: Path, record: Circuit) -> str:
    return f"{record.task} · {record.model} · {record.method} ({_stem(source)})"


@dataclass(frozen=True, eq=False)
class Comparison:
    """Two circuits compared: the metrics, the tables by relative depth and by role, the diff diagram.

    ``metrics`` holds sizes and, for one model shape, node and edge Jaccard, overlap at equal
    size and weighted overlap (None between shapes); ``diagram`` is a ``graphviz.Digraph``.
    """

    names: tuple[str, str]
    metrics: dict
    depth: pd.DataFrame
    roles: pd.DataFrame
    diagram: object
    notes: str = ""

    def __repr__(self) -> str:
        m = self.metrics
        shared = (
            f"node Jaccard {m['node_jaccard']:.2f}, edge Jaccard {m['edge_jaccard']:.2f}"
            if m["same_model_shape"]
            else "different shapes: compared by relative depth"
        )
        return (
            f"Comparison(A: {self.names[0]}; B: {self.names[1]}; {m['A_edges']:,} vs {m['B_edges']:,} edges; {shared})"
        )

    def _repr_svg_(self) -> str | None:
        import shutil

        return self.diagram.pipe(format="svg").decode() if shutil.which("dot") else None

    def save(
        self,
        out: Path,
        overwrite: bool = False,
        formats: tuple[str, ...] = ("svg", "png"),
        circuits: tuple[Circuit, Circuit] | None = None,
    ) -> Path:
        """Write ``comparison.json``, ``metrics.csv``, ``depth.csv``, ``roles.csv``, ``comparison.md``
        and ``diff.{format}`` into ``out``, whole or not at all; given the two ``circuits``, also
        ``compare.html`` (both on one layout in the browser, the table beside them)."""
        from circuitfinder.graphs.explorer import write_compare_page
        from circuitfinder.graphs.render import FORMATS, write_diagram
        from circuitfinder.graphs.tables import to_markdown

        bad = [f for f in formats if f not in FORMATS]
        if bad:
            raise UserError(f"unknown format(s) {', '.join(bad)}; choose from {', '.join(FORMATS)}")
        out = Path(out)
        check_out_dir(out, overwrite)
        metrics = self.metrics
        with atomic_dir(out, overwrite) as tmp:
            (tmp / "comparison.json").write_text(json.dumps(metrics, indent=1) + "\n")
            table = pd.DataFrame(
                {"metric": list(metrics), "value": [("" if v is None else v) for v in metrics.values()]}
            )
            table.to_csv(tmp / "metrics.csv", index=False)
            self.depth.to_csv(tmp / "depth.csv", index=False)
            self.roles.to_csv(tmp / "roles.csv", index=False)
            markdown = (
                f"# Circuit comparison\n\n- A: {self.names[0]}\n- B: {self.names[1]}\n\n"
                f"## Metrics\n\n{to_markdown(table)}\n\n"
                f"## By relative depth\n\n{to_markdown(self.depth, floatfmt='.2f')}\n\n## By role\n\n"
                f"{to_markdown(self.roles) if len(self.roles) else '(no roles)'}{self.notes}\n"
            )
            (tmp / "comparison.md").write_text(markdown)
            write_diagram(self.diagram, tmp / "diff", formats)
            if circuits is not None:
                write_compare_page(*circuits, tmp / "compare.html", markdown)
        return out


def compare_circuits(
    a: Circuit, b: Circuit, bins: int = 5, max_edges: int = 150, names: tuple[str, str] | None = None
) -> Comparison:
    """Compare two circuits in memory (see the module docstring for the measures).

    Args:
        a, b: the circuits; of one model shape, names match; otherwise nodes align by relative depth.
        bins: relative-depth bins of the depth table.
        max_edges: node links drawn in the diff diagram of one model shape.
        names: how A and B are called (default: task · model · method of each).

    Raises:
        UserError: an empty circuit, or ``bins``/``max_edges`` below 1.
    """
    from circuitfinder.graphs.render import diff_to_dot

    if bins < 1:
        raise UserError(f"`bins` must be at least 1, got {bins}", "bins")
    if max_edges < 1:
        raise UserError(f"`max_edges` must be at least 1, got {max_edges}", "max_edges")
    for which, circuit in (("A", a), ("B", b)):
        if not circuit.n_edges:
            raise UserError(f"circuit {which} is empty: nothing to compare")
    names = names or tuple(f"{c.task} · {c.model} · {c.method}" for c in (a, b))
    comparable = same_shape(a, b)
    metrics = {
        "A": names[0],
        "B": names[1],
        "A_edges": a.n_edges,
        "B_edges": b.n_edges,
        "A_nodes": len(units(a)),
        "B_nodes": len(units(b)),
        "same_model_shape": comparable,
        "depth_bins": bins,
    }
    metrics |= (
        same_model_metrics(a, b)
        if comparable
        else {
            k: None
            for k in ("node_jaccard", "edge_jaccard", "overlap_at_equal_size", "equal_size_k", "weighted_overlap")
        }
    )
    if comparable:
        title = f"A: {names[0]}\nB: {names[1]}\nnode links of the union, the {max_edges} strongest; edge label: q/k/v"
        dot = diff_to_dot(diff_graph(a, b, max_edges), ("A", "B"), title)
    else:
        title = (
            f"A: {names[0]}\nB: {names[1]}\nby relative depth (layer / layers, {bins} bins); "
            "node and edge labels: counts in A and B"
        )
        dot = diff_to_dot(depth_diff_graph(a, b, bins), ("A", "B"), title, tick_label=lambda k: bin_label(k, bins))
    missing = [x for x, c in (("A", a), ("B", b)) if not c.roles]
    notes = (
        ("\n\nNo head roles for " + " and ".join(missing) + ": run `circuits roles RUN_DIR` to measure them.")
        if missing
        else ""
    )
    return Comparison(names, metrics, depth_table(a, b, bins), role_table(a, b), dot, notes)


def compare(
    source_a: Path,
    source_b: Path,
    out: Path | None = None,
    overwrite: bool = False,
    bins: int = 5,
    formats: tuple[str, ...] = ("svg", "png"),
    max_edges: int = 150,
) -> dict:
    """Compare two saved circuits (run folders or ``circuit.json`` files) and write the comparison
    into ``out`` (:meth:`Comparison.save`).

    Returns:
        The metrics, with ``out``.

    Raises:
        UserError: a bad input or option; OutputExists: ``out`` exists and ``overwrite`` is off.
    """
    a, b = load_circuit(source_a), load_circuit(source_b)
    for circuit, source in ((a, source_a), (b, source_b)):  # named by file (compare_circuits checks the options)
        if not circuit.n_edges:
            raise UserError(f"{source} holds an empty circuit: nothing to compare")
    out = Path(out) if out is not None else Path("outputs") / f"compare-{_stem(source_a)}-vs-{_stem(source_b)}"
    check_out_dir(out, overwrite)
    comparison = compare_circuits(a, b, bins, max_edges, names=(_name(source_a, a), _name(source_b, b)))
    comparison.save(out, overwrite, formats, circuits=(a, b))
    return comparison.metrics | {"out": str(out)}
