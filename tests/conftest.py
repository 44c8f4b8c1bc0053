"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one torch thread per worker, not two each on two cores
    import torch

    torch.set_num_threads(1)

# The project is imported as installed (scripts/setup.sh installs it editable): the package is
# ``circuitfinder``, whose folders discovery/, tasks/ and graphs/ are not importable by those names.


@pytest.fixture(autouse=True)
def no_native_bfloat16(monkeypatch):
    """``dtype="auto"`` resolves to float32 in every in-process test, on any CPU, so that a test's
    numbers do not depend on whether the machine computes bfloat16 natively. Tests of ``auto``
    itself patch :func:`circuitfinder.engine.precision.native_bfloat16` back; subprocess and Ray
    runs in tests name their dtype."""
    from circuitfinder.engine import precision

    monkeypatch.setattr(precision, "native_bfloat16", lambda device: False)


# --------------------------------------------------------------------------------------------
# word_tokenizer: a small GPT-2-style byte-level BPE tokenizer trained offline (IOI tests).
# --------------------------------------------------------------------------------------------

_BOS, _EOS, _PAD = "<bos>", "<eos>", "<pad>"
# Task words left out of the training corpus, so they are several tokens (exercises filtering).
WORD_TOKENIZER_UNSEEN = ("Victoria", "Cynthia", "Kathleen", "museum", "necklace")


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer whose vocab holds the IOI words as single ``" word"`` tokens.

    Trained in milliseconds on a corpus of the IOI templates, names, places and objects (minus
    ``WORD_TOKENIZER_UNSEEN``). Like GPT-2, a leading space belongs to the following word; like
    Gemma, it prepends ``<bos>``. Saved and reloaded through ``transformers`` so it behaves as a
    Hugging Face tokenizer (``name_or_path``, ``pad_token_id``, ``decode``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from circuitfinder.tasks.ioi import NAMES, OBJECTS, PLACES, TEMPLATES

    words = [w for w in (*NAMES, *PLACES, *OBJECTS) if w not in WORD_TOKENIZER_UNSEEN]
    filler = " ".join(t.replace("[", "").replace("]", "") for t in TEMPLATES)
    corpus = [filler, " ".join(words)] * 4

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        min_frequency=1,
        special_tokens=[_PAD, _BOS, _EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(_BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A", pair=f"{_BOS} $A $B", special_tokens=[(_BOS, bos_id)]
    )
    path = tmp_path_factory.mktemp("word_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=_BOS, eos_token=_EOS, pad_token=_PAD).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def tiny_model_dir(word_tokenizer, tmp_path_factory):
    """A tiny random Llama saved like a user's model folder (safetensors, config, tokenizer), for
    ``--model FOLDER`` in command-line and subprocess tests. Its vocabulary covers the IOI words."""
    import torch
    from tiny_models import tiny_hf_model

    folder = tmp_path_factory.mktemp("tiny-llama-folder")
    model = tiny_hf_model("llama", seed=0, dtype=torch.float32, vocab=len(word_tokenizer))
    model.save_pretrained(folder, safe_serialization=True)
    word_tokenizer.save_pretrained(folder)
    return folder
