"""Hugging Face import at TP2 and PP2 (torchrun, gloo): logits equal ``transformers``', and
exporting from the parallel layout gives back the original tensors bit for bit."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run
from hf_models import ARCHS, make_hf_model, reference_logits

WORKER = Path(__file__).parent / "workers" / "hf_worker.py"


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    models = {arch: make_hf_model(arch, root / arch, seed=7) for arch in ARCHS}
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    return root, {arch: reference_logits(m, tokens) for arch, m in models.items()}


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parallel_import_matches_transformers_and_exports_bitwise(hf_dirs, tp, pp, tmp_path):
    root, references = hf_dirs
    run(WORKER, [str(tmp_path), str(tp), str(pp), *(str(root / a) for a in ARCHS)], nproc=tp * pp)
    for arch in ARCHS:
        ref = references[arch]
        logits = torch.load(tmp_path / f"{arch}.pt", weights_only=True)
        assert (logits[..., : ref.shape[-1]] - ref).abs().max().item() < 1e-4, arch
        original = load_file(root / arch / "model.safetensors")
        exported = load_file(tmp_path / f"{arch}_export" / "model.safetensors")
        assert set(original) == set(exported), arch
        assert all(torch.equal(original[k], exported[k]) for k in original), arch
