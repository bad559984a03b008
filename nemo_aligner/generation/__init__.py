"""Rollout generation: the engine interface and its backends (see engine.py)."""

from nemo_aligner.generation.engine import (
    GenerationError,
    GenerationOutput,
    RolloutEngine,
    SamplingParams,
)

__all__ = ["GenerationError", "GenerationOutput", "RolloutEngine", "SamplingParams"]
