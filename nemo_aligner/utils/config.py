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
