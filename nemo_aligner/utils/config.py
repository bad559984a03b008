"""Small helpers over OmegaConf configs (also accept plain dicts)."""

from omegaconf import DictConfig, OmegaConf

_MISSING = object()


def cfg_get(cfg, key: str, default=_MISSING):
    """``cfg[key]`` for a dotted ``key``; ``default`` when absent or null.

    Without a default, a missing key raises ``KeyError`` naming the key.
    """
    node = cfg
    for part in key.split("."):
        if node is None:
            break
        if isinstance(node, DictConfig):
            node = node.get(part, None)
        elif isinstance(node, dict):
            node = node.get(part, None)
        else:
            node = getattr(node, part, None)
    if node is None:
        if default is _MISSING:
            raise KeyError(f"config key '{key}' is required")
        return default
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def cfg_int(cfg, key: str, default=_MISSING, minimum: int | None = None, name: str | None = None) -> int:
    """``cfg[key]`` as an int; ``ValueError`` naming the key (``name``, default ``key``) when it
    is not a whole number or is below ``minimum``."""
    value = cfg_get(cfg, key, default)
    shown = name or key
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{shown}={value!r}; it must be a whole number")
    try:
        number = int(value)
        if isinstance(value, float) and number != value:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{shown}={value!r}; it must be a whole number") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{shown}={number}; it must be at least {minimum}")
    return number
