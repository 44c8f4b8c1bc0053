"""Head roles measured on a task's own prompts.

Attention-pattern scores (Olsson et al. 2022, "In-context learning and induction heads"; the
same detection patterns as TransformerLens's ``head_detector``). For a pattern ``A[b, h, q, k]``
(the attention of query position q to key position k) and the prompt's tokens ``t``:

* **previous-token**: the attention from q to ``q − 1``, for q ≥ 1;
* **duplicate-token**: the attention from q to the earlier positions ``k < q`` holding the same
  token (``t[k] = t[q]``), over the queries that have one;
* **induction**: the attention from q to the positions just after an earlier occurrence of its
  token (``k`` with ``t[k−1] = t[q]``, ``k < q``), over the queries that have one.

Each is averaged over a prompt's real (unpadded) query positions, then over prompts; prompts
without any qualifying query do not count, and a head scores NaN if no prompt does.

Copying scores (the name movers of Wang et al. 2022, "Interpretability in the wild"):

* **answer attention**: the attention from the read position (the last token) to the earlier
  positions holding the answer token (in IOI, the indirect object's name), over prompts whose
  answer occurs in the prompt;
* **direct effect**: how much the head's output at the read position raises the answer's logit
  over the wrong answer's through the direct path: logit difference of the final residual stream
  minus that of the same stream without the head's output (final norm recomputed, as in path
  patching to the logits with a zero ablation). Its **share** divides it by the size of the mean
  clean logit difference (positive still means "raises the answer").

A head gets a role label when a score passes its threshold (:data:`THRESHOLDS`):
``prev-token``, ``duplicate``, ``induction``; ``mover`` when it attends to the answer (≥ 0.3)
and its direct effect is at least 10 % of the clean logit difference, ``neg. mover`` when it
attends to the answer and its direct effect is at most −10 % (Wang et al.'s negative name
movers). A head with several roles lists them all, strongest first (score over threshold).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int

Pattern = Float[torch.Tensor, "batch heads q k"]
Tokens = Int[torch.Tensor, "batch pos"]

# Scores are attention fractions (0-1) except the direct-effect share (a fraction of the logit difference).
THRESHOLDS = {
    "previous_token": 0.4,
    "duplicate_token": 0.3,
    "induction": 0.3,
    "answer_attention": 0.3,
    "direct_effect_share": 0.1,
}
LABELS = {"previous_token": "prev-token", "duplicate_token": "duplicate", "induction": "induction"}
SCORES = ("previous_token", "duplicate_token", "induction", "answer_attention", "direct_effect", "direct_effect_share")


def _valid(tokens: Tokens, lengths: Int[torch.Tensor, " batch"] | None) -> torch.Tensor:
    """``[batch, pos]``: True at real (unpadded) positions."""
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    if lengths is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    return pos[None, :] < lengths.to(tokens.device)[:, None]


def _masked_score(pattern: Pattern, target: torch.Tensor, valid: torch.Tensor) -> Float[torch.Tensor, "batch heads"]:
    """Per prompt and head: mean over queries with a non-empty target set of the attention mass on it.

    Args:
        pattern: attention ``[batch, heads, q, k]``.
        target: ``[batch, q, k]`` bool, the key positions each query should attend to.
        valid: ``[batch, pos]`` bool, real positions.
    """
    target = target & valid[:, None, :] & valid[:, :, None]
    mass = (pattern * target[:, None].to(pattern.dtype)).sum(-1)  # [batch, heads, q]
    has = target.any(-1)  # [batch, q]
    n = has.sum(-1)  # [batch]
    mean = (mass * has[:, None].to(mass.dtype)).sum(-1) / n[:, None].clamp(min=1)
    return torch.where(n[:, None] > 0, mean, torch.full_like(mean, math.nan))


def previous_token(pattern: Pattern, tokens: Tokens, lengths=None) -> Float[torch.Tensor, "batch heads"]:
    """Attention to the previous position, per prompt and head."""
    q = torch.arange(tokens.shape[1], device=tokens.device)
    target = (q[None, :, None] - 1 == q[None, None, :]).expand(tokens.shape[0], -1, -1)
    return _masked_score(pattern, target, _valid(tokens, lengths))


def duplicate_token(pattern: Pattern, tokens: Tokens, lengths=None) -> Float[torch.Tensor, "batch heads"]:
    """Attention to earlier occurrences of the query's own token, per prompt and head."""
    q = torch.arange(tokens.shape[1], device=tokens.device)
    earlier = q[None, None, :] < q[None, :, None]  # [1, q, k]
    target = (tokens[:, :, None] == tokens[:, None, :]) & earlier
    return _masked_score(pattern, target, _valid(tokens, lengths))


def induction(pattern: Pattern, tokens: Tokens, lengths=None) -> Float[torch.Tensor, "batch heads"]:
    """Attention to the positions just after earlier occurrences of the query's token, per prompt and head."""
    q = torch.arange(tokens.shape[1], device=tokens.device)
    before = torch.cat([torch.full_like(tokens[:, :1], -1), tokens[:, :-1]], 1)  # t[k-1], -1 at k = 0
    earlier = q[None, None, :] < q[None, :, None]
    target = (tokens[:, :, None] == before[:, None, :]) & earlier & (q[None, None, :] >= 1)
    return _masked_score(pattern, target, _valid(tokens, lengths))


def answer_attention(
    pattern: Pattern, tokens: Tokens, end: Int[torch.Tensor, " batch"], answer: Int[torch.Tensor, " batch"]
) -> Float[torch.Tensor, "batch heads"]:
    """Attention from each prompt's read position ``end`` to earlier positions holding its answer token."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    k = torch.arange(tokens.shape[1], device=tokens.device)
    target = (tokens == answer[:, None]) & (k[None, :] < end[:, None])  # [batch, k]
    mass = (pattern[rows, :, end] * target[:, None].to(pattern.dtype)).sum(-1)  # [batch, heads]
    return torch.where(target.any(-1)[:, None], mass, torch.full_like(mass, math.nan))


def direct_effects(
    full: Float[torch.Tensor, "batch 2"], ablated: Float[torch.Tensor, "batch n 2"]
) -> Float[torch.Tensor, "batch n"]:
    """Logit difference (answer − wrong) of the full stream minus that of each ablated stream."""
    return (full[:, 0] - full[:, 1])[:, None] - (ablated[..., 0] - ablated[..., 1])


def nanmean(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Mean over ``dim`` ignoring NaN; NaN where every entry is NaN."""
    ok = ~torch.isnan(x)
    total = torch.where(ok, x, torch.zeros_like(x)).sum(dim)
    n = ok.sum(dim)
    return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, math.nan))


def label(scores: dict[str, float]) -> str | None:
    """The role label(s) of a head from its scores (see the module docstring), or None."""

    def ok(v):
        return v is not None and not math.isnan(v)

    found = []
    for key, name in LABELS.items():
        v = scores.get(key)
        if ok(v) and v >= THRESHOLDS[key]:
            found.append((v / THRESHOLDS[key], name))
    att, share = scores.get("answer_attention"), scores.get("direct_effect_share")
    if ok(att) and ok(share) and att >= THRESHOLDS["answer_attention"]:
        t = THRESHOLDS["direct_effect_share"]
        if share >= t:
            found.append((share / t, "mover"))
        elif share <= -t:
            found.append((-share / t, "neg. mover"))
    return ", ".join(name for _, name in sorted(found, key=lambda x: -x[0])) or None


# ---------------------------------------------------------------------------------------------
# On a model (through circuitfinder.engine.adapter only)
# ---------------------------------------------------------------------------------------------


def measure_roles(adapter, task, max_prompts: int = 64, batch_size: int = 16):
    """Role scores of every head of a model on a task's clean prompts.

    Args:
        adapter: a ``circuitfinder.engine.adapter.ModelAdapter``.
        task: a ``circuitfinder.tasks.base.Task``; its first ``max_prompts`` clean prompts are used.

    Returns:
        A DataFrame with one row per head: ``node``, ``layer``, ``head``, the :data:`SCORES`
        and ``role``.
    """
    import pandas as pd

    shape = adapter.shape
    L, H = shape.n_layers, shape.n_heads
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.engine.patching import run_recording_senders

    graph = EdgeGraph(shape)
    heads = torch.tensor([1 + l * (H + 1) + h for l in range(L) for h in range(H)], device="cpu")  # head senders
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(L)] + [adapter.RECEIVER_LOGITS]
    per_prompt = {k: [] for k in SCORES[:5]}
    linear = adapter.unembedding_is_linear
    clean_diff = []
    n_done = 0
    with torch.no_grad():
        for batch in task.batches(None, batch_size):
            if n_done >= max_prompts:
                break
            take = min(batch.size, max_prompts - n_done)
            tokens, end = batch.clean[:take], batch.last[:take]
            answer, wrong = batch.answer[:take], batch.wrong[:take]
            n_done += take
            cache = adapter.cache(tokens, names)
            rows = torch.arange(take, device="cpu")
            lengths = end + 1
            for key, fn in (
                ("previous_token", previous_token),
                ("duplicate_token", duplicate_token),
                ("induction", induction),
            ):
                per_prompt[key].append(
                    torch.cat(
                        [fn(cache[f"blocks.{l}.attn.hook_pattern"].cpu().double(), tokens, lengths) for l in range(L)],
                        1,
                    )
                )  # [batch, L*H]
            per_prompt["answer_attention"].append(
                torch.cat(
                    [
                        answer_attention(cache[f"blocks.{l}.attn.hook_pattern"].cpu().double(), tokens, end, answer)
                        for l in range(L)
                    ],
                    1,
                )
            )
            resid = cache[adapter.RECEIVER_LOGITS][rows, end]  # [batch, d_model]
            # each head's sender value: what it adds to the residual stream (its share of the
            # post-normed output on Gemma-3), as the edge graph defines it
            senders, _ = run_recording_senders(adapter, graph, tokens, end)
            results = senders[heads.to(senders.device)][:, rows, end].permute(1, 0, 2)  # [batch, L*H, d_model]
            ids = torch.stack([answer, wrong], 1)  # [batch, 2]
            full = adapter.final_logits(resid[:, None], ids)[:, 0].cpu().double()  # [batch, 2]
            ablated = adapter.final_logits(resid[:, None] - results, ids).cpu().double()  # [batch, L*H, 2]
            if not linear:  # a head between the final norm and the unembedding: no direct effects to read
                full, ablated = full * math.nan, ablated * math.nan
            per_prompt["direct_effect"].append(direct_effects(full, ablated))
            clean_diff.append(full[:, 0] - full[:, 1])
    means = {k: nanmean(torch.cat(v, 0)) for k, v in per_prompt.items()}
    diff = float(torch.cat(clean_diff).mean())
    means["direct_effect_share"] = (
        means["direct_effect"] / abs(diff) if diff else torch.full((L * H,), math.nan, device="cpu")
    )
    rows = []
    for i in range(L * H):
        scores = {k: float(means[k][i]) for k in SCORES}
        rows.append({"node": f"a{i // H}.h{i % H}", "layer": i // H, "head": i % H, **scores, "role": label(scores)})
    return pd.DataFrame(rows)


def attention_patterns(adapter, task, heads: list[str], n_prompts: int = 3) -> dict:
    """The attention patterns of ``heads`` on the first ``n_prompts`` clean prompts of ``task``,
    in the form the explorer embeds (``circuitfinder.graphs.explorer``): per head its tokens (one
    list per prompt, unpadded) and ``[query][key]`` weights to 4 decimals."""
    from circuitfinder.graphs.circuit import parse_name

    wanted = [(name, parse_name(name)) for name in heads]
    layers = sorted({p.layer for _, p in wanted})
    if not wanted or n_prompts < 1:
        return {}
    batch = next(task.batches(None, n_prompts))
    tokens, lengths = batch.clean, batch.last + 1
    with torch.no_grad():
        cache = adapter.cache(tokens, [f"blocks.{l}.attn.hook_pattern" for l in layers])
    words = [[adapter.tokenizer.decode([int(t)]) for t in row[: int(n)]] for row, n in zip(tokens, lengths)]
    out = {}
    for name, p in wanted:
        pattern = cache[f"blocks.{p.layer}.attn.hook_pattern"][:, p.head].float().cpu()  # [batch, q, k]
        out[name] = {
            "tokens": words,
            "patterns": [
                [[round(w, 4) for w in row] for row in pattern[b, : int(n), : int(n)].tolist()]
                for b, n in enumerate(lengths)
            ],  # 4 decimals: the page shows 3
            "labels": [f"clean prompt {b}" for b in range(len(words))],
        }
    return out
