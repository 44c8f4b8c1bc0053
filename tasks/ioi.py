"""Indirect Object Identification (IOI), after Wang et al. 2022.

Wang, Variengien, Conmy, Shlegeris and Steinhardt, "Interpretability in the Wild: a Circuit
for Indirect Object Identification in GPT-2 small" (arXiv:2211.00593). A prompt introduces two
names, the indirect object (IO) and the subject (S), then repeats the subject and stops where
the indirect object should follow::

    When Mary and John went to the store, John gave a drink to   ->  " Mary"

The model should prefer IO over S; the metric is logit(IO) − logit(S). Names come in two
orders, ABBA (IO first, as above) and BABA (S first), in equal numbers. The corrupted twin is
Wang et al.'s "ABC" distribution: the second subject mention (S2) becomes a third name C, so
nothing in the prompt says which earlier name to repeat. Every name, place and object is a
single token with its leading space, so a pair's prompts have the same token length and
differ only at S2.
"""

from __future__ import annotations

import random

import torch

from circuitfinder.tasks.base import Task, TaskError, logit_difference, pad_id_of, split_labels, stack_pairs

# Wang et al.'s templates, written in the ABBA order: [A] is the indirect object, [B] the
# subject. The BABA form swaps the first [A] and [B]. Each stops right before the IO name.
TEMPLATES: tuple[str, ...] = (
    "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [A] and [B] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [A] and [B] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [A] and [B] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "Then, [A] and [B] had a long argument, and afterwards [B] said to",
    "After [A] and [B] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [A] and [B] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When [A] and [B] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While [A] and [B] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While [A] and [B] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [A] and [B] had a long argument. Afterwards [B] said to",
    "The [PLACE] [A] and [B] went to had a [OBJECT]. [B] gave it to",
    "Friends [A] and [B] found a [OBJECT] at the [PLACE]. [B] gave it to",
)

NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Paul", "Kate",
    "Michael", "Robert", "William", "David", "Richard", "Joseph", "Thomas", "Charles", "Chris", "Daniel",
    "Matthew", "Anthony", "Mark", "Donald", "Steven", "Andrew", "Joshua", "Kevin", "Brian", "George",
    "Edward", "Ronald", "Timothy", "Jason", "Jeffrey", "Ryan", "Jacob", "Gary", "Eric", "Jonathan",
    "Stephen", "Larry", "Justin", "Scott", "Brandon", "Frank", "Benjamin", "Gregory", "Samuel", "Patrick",
    "Alex", "Jack", "Peter", "Henry", "Adam", "Nathan", "Carl", "Arthur", "Roger", "Sean",
    "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Sarah", "Karen", "Lisa",
    "Nancy", "Betty", "Sandra", "Ashley", "Emily", "Donna", "Michelle", "Carol", "Amanda", "Melissa",
    "Deborah", "Laura", "Rebecca", "Sharon", "Cynthia", "Kathleen", "Helen", "Anna", "Emma", "Julie",
    "Alice", "Grace", "Rachel", "Rose", "Claire", "Lucy", "Jane", "Anne", "Ruth", "Victoria",
)  # fmt: skip
PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station",
    "park", "beach", "library", "market", "church", "hotel", "museum", "farm",
)  # fmt: skip
OBJECTS: tuple[str, ...] = (  # consonant-initial, so "a [OBJECT]" reads right
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack",
    "book", "ball", "letter", "gift", "pen", "cake", "phone", "bag",
)  # fmt: skip


def _single_tokens(tokenizer, words: tuple[str, ...]) -> list[str]:
    """The words that are one token when written with a leading space."""
    return [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def _token(tokenizer, word: str) -> int:
    return tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]


def _fill(template: str, a: str, b: str, place: str, obj: str) -> str:
    return template.replace("[A]", a).replace("[B]", b).replace("[PLACE]", place).replace("[OBJECT]", obj)


def make_ioi(tokenizer, n_pairs: int = 128, seed: int = 0, heldout_fraction: float = 0.5) -> Task:
    """Build the IOI task for a tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer; its default special tokens (e.g. Gemma's ``<bos>``)
            are kept.
        n_pairs: number of clean/corrupted pairs; even, so ABBA and BABA are equally many.
        seed: seeds the choice of templates, names, places, objects and the split.
        heldout_fraction: share of pairs labelled ``"heldout"``.

    Returns:
        The task, with positions ``IO``, ``S1``, ``S2`` and ``END`` (the last token) per pair.

    Raises:
        TaskError: if ``n_pairs`` is not a positive even number, fewer than 3 names (or no place
            or object) are single tokens for this tokenizer, or a prompt does not tokenize with
            the names where expected.
    """
    if n_pairs < 2 or n_pairs % 2:
        raise TaskError(f"IOI needs a positive even n_pairs (half ABBA, half BABA); got {n_pairs}")
    words = _ioi_words(tokenizer)
    rng = random.Random(seed)
    orders = ["ABBA", "BABA"] * (n_pairs // 2)
    rng.shuffle(orders)
    drawn: dict[str, list] = {"pairs": [], "texts": [], "answer": [], "wrong": []}
    pos: dict[str, list[int]] = {"IO": [], "S1": [], "S2": [], "END": []}
    for order in orders:
        template, io, s, c, clean_text, corrupted_text = _draw_prompt(rng, order, *words)
        clean, corrupted, (io_id, io_at), (s_id, s_at) = _tokenize_pair(tokenizer, clean_text, corrupted_text, io, s, c)
        drawn["pairs"].append((clean, corrupted))
        drawn["answer"].append(io_id)
        drawn["wrong"].append(s_id)
        for key, value in (("IO", io_at[0]), ("S1", s_at[0]), ("S2", s_at[1]), ("END", len(clean) - 1)):
            pos[key].append(value)
        drawn["texts"].append(
            {"clean": clean_text, "corrupted": corrupted_text, "answer": " " + io, "wrong": " " + s,
             "template": template, "order": order}
        )  # fmt: skip
    split = split_labels(n_pairs, heldout_fraction, torch.Generator().manual_seed(seed))
    return _ioi_task(tokenizer, drawn, pos, split)


def _ioi_words(tokenizer) -> tuple[list[str], list[str], list[str]]:
    """The names, places and objects that are one token for this tokenizer.

    Raises:
        TaskError: if fewer than 3 names, or no place or no object, are single tokens.
    """
    names = _single_tokens(tokenizer, NAMES)
    places, objects = _single_tokens(tokenizer, PLACES), _single_tokens(tokenizer, OBJECTS)
    if len(names) < 3:
        raise TaskError(
            f"IOI needs at least 3 first names that are a single token with a leading space; "
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has {len(names)} of {len(NAMES)}: {names}"
        )
    if not places or not objects:
        raise TaskError("IOI needs at least one single-token place and object for this tokenizer")
    return names, places, objects


def _draw_prompt(
    rng: random.Random, order: str, names: list[str], places: list[str], objects: list[str]
) -> tuple[str, str, str, str, str, str]:
    """Draw one prompt of ``order`` (``"ABBA"`` or ``"BABA"``).

    Returns:
        The template, the indirect object, the subject, the name that replaces S2 in the
        corrupted prompt, and the clean and the corrupted text.
    """
    template = rng.choice(TEMPLATES)
    if order == "BABA":
        template = template.replace("[A]", "[X]", 1).replace("[B]", "[A]", 1).replace("[X]", "[B]", 1)
    io, s, c = rng.sample(names, 3)
    place, obj = rng.choice(places), rng.choice(objects)
    clean_text = _fill(template, io, s, place, obj)
    head, tail = template.rsplit("[B]", 1)  # S2 is the last subject mention
    corrupted_text = _fill(head + c + tail, io, s, place, obj)
    return template, io, s, c, clean_text, corrupted_text


def _tokenize_pair(
    tokenizer, clean_text: str, corrupted_text: str, io: str, s: str, c: str
) -> tuple[list[int], list[int], tuple[int, list[int]], tuple[int, list[int]]]:
    """Tokenize a prompt pair and find its names.

    Returns:
        The clean and the corrupted token ids, then for ``io`` and for ``s`` its token id and
        where the clean prompt has it.

    Raises:
        TaskError: unless ``io`` is one token once and ``s`` twice, and the corruption changes
            only S2 (to ``c``).
    """
    clean = tokenizer(clean_text, add_special_tokens=True)["input_ids"]
    corrupted = tokenizer(corrupted_text, add_special_tokens=True)["input_ids"]
    io_id, s_id = _token(tokenizer, io), _token(tokenizer, s)
    io_at = [i for i, t in enumerate(clean) if t == io_id]
    s_at = [i for i, t in enumerate(clean) if t == s_id]
    expected = clean[:]
    if len(s_at) == 2:
        expected[s_at[1]] = _token(tokenizer, c)
    if len(io_at) != 1 or len(s_at) != 2 or corrupted != expected:
        raise TaskError(
            f"IOI prompt {clean_text!r} does not tokenize with ' {io}' once and ' {s}' twice as whole "
            f"tokens, or its corruption {corrupted_text!r} changes more than S2"
        )
    return clean, corrupted, (io_id, io_at), (s_id, s_at)


def _ioi_task(tokenizer, drawn: dict[str, list], pos: dict[str, list[int]], split: tuple[str, ...]) -> Task:
    """The task of the drawn pairs, padded with the tokenizer's pad id."""
    pad_id = pad_id_of(tokenizer)
    clean_t, corrupted_t, lengths = stack_pairs(drawn["pairs"], pad_id)
    return Task(
        name="ioi",
        clean=clean_t,
        corrupted=corrupted_t,
        lengths=lengths,
        answer=torch.tensor(drawn["answer"], device="cpu"),
        wrong=torch.tensor(drawn["wrong"], device="cpu"),
        split=split,
        metric=logit_difference,
        metric_name="logit_difference",
        pad_id=pad_id,
        texts=tuple(drawn["texts"]),
        positions={k: torch.tensor(v, device="cpu") for k, v in pos.items()},
    )
