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

# Megatron-Core's distributed optimizer calls torch.distributed functions that torch has
# renamed; the deprecation is Megatron's to act on, not a user's. Only those two messages
# are silenced: every other FutureWarning (ours included) still shows.
for _name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
    _warnings.filterwarnings("ignore", message=rf"`torch\.distributed\.{_name}` is deprecated", category=FutureWarning)


def _import_megatron_core() -> None:
    """Import Megatron-Core with ``torch.compile`` deferred to first call.

    Megatron wraps its fused kernels in ``torch.compile`` at import time; the wrapper alone
    imports TorchDynamo and Inductor, about 2 s of every process's start-up (every
    ``torchrun`` rank, every entry point). ``torch.compile`` compiles on the first call
    anyway, so wrapping on first call instead changes nothing else; on CPU those kernels
    are never called (the fusions are GPU-only in our configs).
    """
    import functools

    import torch

    compile_now = torch.compile

    def compile_on_first_call(fn=None, **kwargs):
        if fn is None:
            return lambda f: compile_on_first_call(f, **kwargs)
        compiled = []

        @functools.wraps(fn)
        def call(*args, **kw):
            if not compiled:
                compiled.append(compile_now(fn, **kwargs))
            return compiled[0](*args, **kw)

        return call

    torch.compile = compile_on_first_call
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = compile_now


def _import_without_collections(import_fn) -> None:
    """Run ``import_fn`` with Python's cyclic garbage collector paused, then freeze what
    exists (``gc.freeze``).

    Importing torch and Megatron-Core creates ~350k objects that live as long as the
    process. Collected as usual, they cost ~0.7 s of every process's start-up (every
    entry point, every ``torchrun`` rank, every server): the collector runs hundreds of
    times during the import, six of them full collections that re-scan everything made so
    far, and later collections sweep the lot again. All of that frees a few thousand
    objects. Frozen, later collections (Megatron's checkpoint save asks for a full one)
    skip them. Reference counting still frees frozen objects; only a reference cycle among
    objects that existed at this import is never reclaimed (``gc.unfreeze()`` undoes it).
    """
    import gc

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        import_fn()
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


_import_without_collections(_import_megatron_core)
