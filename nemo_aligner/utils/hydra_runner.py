"""``@hydra_runner``: ``@hydra.main`` for the entry scripts, with one config composition.

``hydra.main`` composes the config twice per run (once only to read ``hydra.mode``, then for
the job) and sets up a job this package does not use: no output directory, no logging
config, no working-directory change (see any ``conf/*.yaml``'s ``hydra:`` block). That is
~0.1-0.15 s of every process's start-up (measured: 0.34-0.46 s from the imports to the task,
now 0.26-0.27 s).

A command line of overrides alone (``key=value``, ``+key=value``, ``~key``; the usual case)
is composed once, by Hydra's own compose API: the same search path, defaults list, override
grammar and struct checks, so the script gets the config ``hydra.main`` would give it. A
command line with any flag (``--cfg``, ``--help``, ``-m``, ``--config-name``, ...) or a
``hydra.*`` override goes through ``hydra.main`` unchanged.
"""

import functools
import os
import sys

VERSION_BASE = "1.3"


def _overrides_only(args: list[str]) -> bool:
    """True when every argument is an override that needs none of ``hydra.main``'s machinery."""
    for arg in args:
        if arg.startswith("-"):
            return False
        key = arg.lstrip("+~").split("=", 1)[0]
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            return False
    return True


def hydra_runner(config_path: str, config_name: str):
    """Decorate ``task(cfg)``; the result takes its overrides from ``sys.argv`` as
    ``hydra.main(config_path=..., config_name=..., version_base="1.3")`` does.
    ``config_path`` is relative to the file defining ``task``."""

    def decorator(task):
        import hydra

        full = hydra.main(config_path=config_path, config_name=config_name, version_base=VERSION_BASE)(task)
        config_dir = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(task.__code__.co_filename)), config_path))

        @functools.wraps(task)
        def run():
            args = sys.argv[1:]
            if not _overrides_only(args):
                return full()
            return task(compose_config(config_dir, config_name, args))

        return run

    return decorator


def compose_config(config_dir: str, config_name: str, overrides: list[str]):
    """The config ``hydra.main`` would give a job run with ``overrides``; a config error
    (unknown key, bad value, a sweep without ``-m``) is one message on stderr and exit 1,
    as under ``hydra.main``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=config_dir, version_base=VERSION_BASE, job_name=config_name):
            return compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        cause = f"\n{e.__cause__}" if e.__cause__ is not None else ""
        print(f"error: {e}{cause}", file=sys.stderr, flush=True)
        sys.exit(1)
