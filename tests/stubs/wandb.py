"""A stand-in for the ``wandb`` package in tests: records what the run sends to
``$WANDB_STUB_LOG`` (one JSON line per call) instead of talking to a server."""

import json
import os


def _record(**event):
    with open(os.environ["WANDB_STUB_LOG"], "a") as f:
        f.write(json.dumps(event, default=str) + "\n")


class _Run:
    def log(self, data, step=None):
        _record(call="log", data=data, step=step)

    def finish(self):
        _record(call="finish")


def init(**kwargs):
    _record(call="init", project=kwargs.get("project"), name=kwargs.get("name"), dir=kwargs.get("dir"),
            has_config=kwargs.get("config") is not None)
    return _Run()
