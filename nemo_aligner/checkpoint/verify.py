"""Check a checkpoint before anything reads it, and read it without running its code.

- :func:`verify_checkpoint` reads what a load will read and checks that it is whole:
  ``model_config.yaml`` and ``trainer_state.json`` parse, ``.metadata`` unpickles with
  :func:`safe_read_metadata`, every shard file it names exists and holds the bytes it
  should (a truncated or missing ``*.distcp`` is found here, not as an ``EOFError`` in a
  worker), and ``common.pt`` loads with ``weights_only=True``. Problems raise
  :class:`~nemo_aligner.checkpoint.distributed.CheckpointError` naming the file.
- :func:`safe_read_metadata`: torch's distributed-checkpoint reader unpickles ``.metadata``
  with plain ``pickle``, so a crafted file runs code on load. This unpickler admits only the
  classes checkpoint metadata is made of (torch's checkpoint metadata and planner dataclasses,
  ``torch.Size``, dtypes, plain containers) and refuses anything else before it is called.
- :func:`install_safe_object_loading`: objects stored in the shards (RNG states, extra states)
  are loaded by torch's planner with ``torch.load(weights_only=False)``; they are plain data,
  so they are loaded with ``weights_only=True`` instead.
"""

import io
import json
import pickle
from pathlib import Path

import torch
from omegaconf import OmegaConf

# module -> names allowed from it (None: every name of the module)
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": None,
    "torch.distributed.checkpoint.planner": None,
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex"},
    "copyreg": {"_reconstructor"},
}


class _Refused(pickle.UnpicklingError):
    """A global outside the allowlist (the message is ``module.name``)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = _METADATA_GLOBALS.get(module, set())
        ok = allowed is None or name in allowed
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            ok = True
        if module == "copyreg" and name == "_reconstructor":
            ok = True
        if not ok:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


def safe_read_metadata(path):
    """The checkpoint metadata in ``path`` (a ``.metadata`` file), refusing any pickled global
    outside the metadata classes (see the module docstring)."""
    from nemo_aligner.checkpoint.distributed import CheckpointError

    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete (an interrupted copy?)") from None
    except _Refused as e:
        raise CheckpointError(
            f"{path} refers to {e}, which checkpoint metadata never holds; refusing to load it "
            "(it could run code). Use checkpoints from a source you trust"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError) as e:
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e}); the checkpoint cannot be read") from None


def verify_checkpoint(path) -> None:
    """Raise ``CheckpointError`` naming the first file of ``path`` that is missing or damaged."""
    from nemo_aligner.checkpoint.distributed import MODEL_CONFIG, TRAINER_STATE, CheckpointError

    path = Path(path)
    try:
        OmegaConf.load(path / MODEL_CONFIG)
    except FileNotFoundError:
        raise CheckpointError(f"{path / MODEL_CONFIG} is missing; {path} is not a whole checkpoint") from None
    except Exception as e:  # noqa: BLE001 -- any parse error is a damaged file
        raise CheckpointError(f"{path / MODEL_CONFIG} is damaged ({type(e).__name__}); the checkpoint cannot be read") from None
    state = path / TRAINER_STATE
    if state.exists():
        try:
            json.loads(state.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{state} is damaged ({e}); the checkpoint cannot be read") from None
    metadata = safe_read_metadata(path / ".metadata")
    sizes = {}
    for item in getattr(metadata, "storage_data", {}).values():
        end = item.offset + item.length
        sizes[item.relative_path] = max(sizes.get(item.relative_path, 0), end)
    for name, needed in sizes.items():
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"{shard} is missing; the checkpoint is incomplete")
        if shard.stat().st_size < needed:
            raise CheckpointError(f"{shard} is truncated ({shard.stat().st_size} of {needed} bytes); the checkpoint is damaged")
    common = path / "common.pt"
    if common.exists():
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- truncated, corrupt or not plain data
            raise CheckpointError(f"{common} is damaged or not plain data ({type(e).__name__}); the checkpoint cannot be read") from None


def _safe_load_bytes(self, read_item, value: io.BytesIO) -> None:
    """``DefaultLoadPlanner.load_bytes`` with ``weights_only=True``."""
    from torch.distributed.checkpoint._traverse import set_element

    obj = torch.load(value, weights_only=True)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


def install_safe_object_loading() -> None:
    """Make torch's checkpoint planner load stored objects with ``weights_only=True`` (idempotent)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    if getattr(DefaultLoadPlanner, "_nemo_aligner_safe", False):
        return
    DefaultLoadPlanner.load_bytes = _safe_load_bytes
    DefaultLoadPlanner._nemo_aligner_safe = True
