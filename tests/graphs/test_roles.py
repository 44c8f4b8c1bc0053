"""Head-role scores on hand-built attention patterns (exact values), and on tiny models through the adapter."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny, tiny_task  # noqa: F401 (fixture)

from circuitfinder.graphs import roles

# One prompt, 5 tokens: token 5 recurs at position 3 (first at 0), token 6 at 4 (first at 1).
TOKENS = torch.tensor([[5, 6, 7, 5, 6]])


def _pattern(*rows_per_head) -> torch.Tensor:
    """``[1, heads, 5, 5]`` from, per head, the key position each query attends to fully."""
    out = torch.zeros(1, len(rows_per_head), 5, 5, dtype=torch.float64)
    for h, keys in enumerate(rows_per_head):
        for q, k in enumerate(keys):
            out[0, h, q, k] = 1.0
    return out


def _uniform(n: int = 5) -> torch.Tensor:
    """Causal uniform attention: query q spreads 1/(q+1) over positions 0..q."""
    return torch.tril(torch.ones(n, n, dtype=torch.float64)) / torch.arange(1, n + 1, dtype=torch.float64)[:, None]


PREV = [0, 0, 1, 2, 3]  # a perfect previous-token head
DUP = [0, 1, 2, 0, 1]  # attends to the earlier copy of its own token
IND = [0, 1, 2, 1, 2]  # attends to the token after the earlier copy


def test_previous_token_score():
    p = torch.cat([_pattern(PREV, DUP, [0, 0, 0, 2, 0]), _uniform()[None, None]], 1)
    got = roles.previous_token(p, TOKENS)[0]
    assert got.tolist()[:3] == [1.0, 0.0, 0.5]  # the third head attends to q-1 at q = 1 and 3 of q = 1..4
    assert got[3] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4)


def test_duplicate_token_score():
    p = torch.cat([_pattern(DUP, PREV, IND), _uniform()[None, None]], 1)
    got = roles.duplicate_token(p, TOKENS)[0]
    # only queries 3 and 4 have an earlier copy (at 0 and 1)
    assert got.tolist()[:3] == [1.0, 0.0, 0.0]
    assert got[3] == pytest.approx((1 / 4 + 1 / 5) / 2)


def test_induction_score():
    p = torch.cat([_pattern(IND, DUP, PREV, [0, 0, 0, 1, 3]), _uniform()[None, None]], 1)
    got = roles.induction(p, TOKENS)[0]
    # query 3 (token 5) should attend to 1 (after the 5 at 0); query 4 (token 6) to 2 (after the 6 at 1)
    assert got.tolist()[:4] == [1.0, 0.0, 0.0, 0.5]
    assert got[4] == pytest.approx((1 / 4 + 1 / 5) / 2)


def test_padding_is_ignored_and_prompts_without_repeats_give_nan():
    tokens = torch.tensor([[5, 6, 7, 5, 6], [1, 2, 3, 1, 1]])
    p = torch.cat([_pattern(DUP), _pattern(DUP)], 0)
    lengths = torch.tensor([5, 3])  # the second prompt is [1, 2, 3] + padding: no repeats
    got = roles.duplicate_token(p, tokens, lengths)
    assert got[0, 0] == 1.0 and math.isnan(got[1, 0])
    assert roles.previous_token(p, tokens, lengths)[1, 0] == 0.0  # DUP at q=1,2 attends to 1, 2: not q-1
    assert roles.nanmean(got)[0] == 1.0


def test_answer_attention():
    p = torch.cat([_pattern([0, 1, 2, 3, 2]), _uniform()[None, None]], 1)
    end, answer = torch.tensor([4]), torch.tensor([7])  # token 7 sits at position 2
    got = roles.answer_attention(p, TOKENS, end, answer)[0]
    assert got.tolist() == [1.0, pytest.approx(0.2)]
    assert math.isnan(roles.answer_attention(p, TOKENS, end, torch.tensor([9]))[0, 0])  # answer not in the prompt


def test_direct_effects_and_labels():
    full = torch.tensor([[3.0, 1.0]])  # logit difference 2
    ablated = torch.tensor([[[2.0, 1.0], [3.0, 0.5], [3.0, 1.0]]])
    assert roles.direct_effects(full, ablated).tolist() == [[1.0, -0.5, 0.0]]
    assert roles.label({"previous_token": 0.5}) == "prev-token"
    assert roles.label({"previous_token": 0.39, "induction": 0.2}) is None
    assert roles.label({"duplicate_token": 0.31, "induction": 0.9}) == "induction, duplicate"  # strongest first
    assert roles.label({"answer_attention": 0.6, "direct_effect_share": 0.15}) == "mover"
    assert roles.label({"answer_attention": 0.6, "direct_effect_share": -0.2}) == "neg. mover"
    assert roles.label({"answer_attention": 0.2, "direct_effect_share": 0.5}) is None  # does not attend to the answer
    assert roles.label({"answer_attention": float("nan"), "previous_token": float("nan")}) is None


def test_final_logits_match_the_model(tiny):
    tokens = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 2], [3, 4]])
    resid = tiny.cache(tokens, [tiny.RECEIVER_LOGITS])[tiny.RECEIVER_LOGITS]
    logits = tiny.logits(tokens)
    expected = logits.gather(2, ids[:, None, :].expand(-1, 5, -1))
    assert torch.allclose(tiny.final_logits(resid, ids), expected, atol=1e-10)


def test_measure_roles_on_a_tiny_model(tiny):
    table = roles.measure_roles(tiny, tiny_task(), max_prompts=3, batch_size=2)
    assert len(table) == tiny.shape.n_layers * tiny.shape.n_heads
    assert list(table.columns) == ["node", "layer", "head", *roles.SCORES, "role"]
    assert table.previous_token.between(0, 1).all()
    # removing every head's output from the logits' input at once is not the sum of their direct
    # effects, but each one is finite and the share is the effect over the clean logit difference
    assert table.direct_effect.notna().all()
    ratio = (table.direct_effect / table.direct_effect_share).dropna()
    assert ratio.round(9).nunique() == 1 and ratio.iloc[0] > 0
    assert tiny.hook_count() == 0


def test_attention_patterns_are_the_models_own(tiny):
    """The explorer's patterns equal Hugging Face's own attention weights (``output_attentions``),
    unpadded, for the heads asked and no others."""
    from tiny_models import tiny_hf_model

    task = tiny_task()
    heads = ["a0.h1", "a2.h3"]
    got = roles.attention_patterns(tiny, task, heads, n_prompts=2)
    assert sorted(got) == heads
    hf = tiny_hf_model(tiny.name.removeprefix("tiny-"))
    hf.config._attn_implementation = "eager"
    batch = next(task.batches(None, 2))
    with torch.no_grad():
        reference = hf(batch.clean, output_attentions=True).attentions  # per layer [batch, heads, q, k]
    for name, layer, head in (("a0.h1", 0, 1), ("a2.h3", 2, 3)):
        entry = got[name]
        assert len(entry["patterns"]) == len(entry["tokens"]) == 2
        for b, n in enumerate((batch.last + 1).tolist()):
            assert len(entry["tokens"][b]) == n
            want = reference[layer][b, head, :n, :n]
            assert torch.allclose(
                torch.tensor(entry["patterns"][b], dtype=torch.float64), want, atol=5.1e-5
            )  # 4 decimals
    assert tiny.hook_count() == 0
