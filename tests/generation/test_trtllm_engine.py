"""The TensorRT-LLM engine is import-guarded: without the package it names what to install."""

import importlib.util

import pytest

from nemo_aligner.generation import trtllm_engine


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="TensorRT-LLM is installed")
def test_missing_tensorrt_llm_gives_a_clear_error():
    with pytest.raises(ImportError) as info:
        trtllm_engine.TRTLLMEngine(model=None, model_cfg={}, tokenizer=None, engine_dir="unused")
    message = str(info.value)
    assert message.startswith("TensorRT-LLM is not installed; pip install tensorrt_llm")
    assert "MegatronEngine" in message and "\n" not in message
