"""Fixtures for the generation tests (helpers live in tiny.py)."""

import pytest

from generation.tiny import LLAMA, VOCAB
from nemo_aligner.models.gpt import build_gpt_model


@pytest.fixture
def make_model(dist_world_of_one):
    def _make(cfg=LLAMA, seed=1, vocab=VOCAB):
        return build_gpt_model(cfg, vocab, seed=seed)

    return _make
