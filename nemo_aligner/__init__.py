"""NeMo-Aligner on Megatron-Core: SFT, reward models, DPO family, PPO and more."""

import warnings as _warnings

__version__ = "0.1.0"

# Megatron-Core announces, at import, every optional GPU kernel it falls back from
# (apex, Transformer Engine). On CPU those fallbacks are the expected path.
for _pattern in (
    "Apex is not installed",
    "Transformer Engine and Apex are not installed",
    "full scope is deprecated",
    "The .grad attribute of a Tensor that is not a leaf Tensor",
):
    _warnings.filterwarnings("ignore", message=f".*{_pattern}.*", category=UserWarning)
