"""Rollout generation: the engine interface and its backends (see engine.py)."""

from nemo_aligner.generation.engine import (
    GenerationError,
    GenerationOutput,
    MissingDependencyError,
    RolloutEngine,
    SamplingParams,
)

__all__ = ["GenerationError", "GenerationOutput", "MissingDependencyError", "RolloutEngine", "SamplingParams"]
