"""@hydra_runner gives an entry script the config hydra.main gives it, composed once, and sends
flags and hydra.* overrides through hydra.main itself."""

import sys
from pathlib import Path

import hydra._internal.hydra as hydra_internal
import pytest
from omegaconf import OmegaConf

from nemo_aligner.utils.hydra_runner import _overrides_only, hydra_runner

CONF = Path(__file__).resolve().parents[2] / "conf"
CONFIGS = sorted(p.stem for p in CONF.glob("*.yaml"))
_HYDRA_RUN = hydra_internal.Hydra.run


def _run(config_name, argv, monkeypatch, full_path: bool):
    """``(cfg the task got or None, path taken)`` for ``script argv``."""
    import hydra

    got = {}

    def task(cfg):
        got["cfg"] = cfg

    path = str(CONF)
    runner = hydra.main(config_path=path, config_name=config_name, version_base="1.3")(task) if full_path \
        else hydra_runner(config_path=path, config_name=config_name)(task)
    calls = []

    def counting_run(self, *args, **kwargs):
        calls.append("hydra.main")
        return _HYDRA_RUN(self, *args, **kwargs)

    monkeypatch.setattr(hydra_internal.Hydra, "run", counting_run)
    monkeypatch.setattr(sys, "argv", ["script.py", *argv])
    runner()
    return got.get("cfg"), calls


@pytest.mark.parametrize("config_name", CONFIGS)
def test_every_config_composes_as_under_hydra_main(config_name, monkeypatch):
    argv = ["seed=7", "+extra.key=[1, 2]"]
    fast, calls = _run(config_name, argv, monkeypatch, full_path=False)
    assert calls == []  # composed once, not through hydra.main
    slow, calls = _run(config_name, argv, monkeypatch, full_path=True)
    assert calls == ["hydra.main"]
    assert OmegaConf.to_yaml(fast) == OmegaConf.to_yaml(slow)
    assert OmegaConf.is_struct(fast) and OmegaConf.is_struct(slow)  # unknown keys still refused
    assert fast.seed == 7 and list(fast.extra.key) == [1, 2]


def test_nemo_aligner_override_forms(monkeypatch):
    argv = ["model.data.data_prefix={train: [a.jsonl, b.jsonl], validation: c.jsonl}", "~model.peft",
            "model.optim.lr=-2e-5", "trainer.dpo.max_steps=3"]
    fast, calls = _run("gpt_dpo", argv, monkeypatch, full_path=False)
    slow, _ = _run("gpt_dpo", argv, monkeypatch, full_path=True)
    assert calls == [] and OmegaConf.to_yaml(fast) == OmegaConf.to_yaml(slow)
    assert OmegaConf.to_container(fast.model.data.data_prefix) == {"train": ["a.jsonl", "b.jsonl"], "validation": "c.jsonl",
                                                                 "test": None}
    assert "peft" not in fast.model and fast.model.optim.lr == -2e-5


@pytest.mark.parametrize("argv, expected", [
    (["a=1", "+b.c=2", "++d=3", "~e"], True),
    ([], True),
    (["--cfg", "job"], False),
    (["-m", "a=1,2"], False),
    (["--config-name", "gpt_sft"], False),
    (["hydra.run.dir=out"], False),
    (["+hydra.job.env_set.X=1"], False),
    (["hydra/job_logging=default"], False),
])
def test_what_goes_through_hydra_main(argv, expected):
    assert _overrides_only(argv) is expected


def test_flags_still_work(monkeypatch, capsys):
    cfg, calls = _run("gpt_dpo", ["--cfg", "job", "seed=5"], monkeypatch, full_path=False)
    assert cfg is None and calls == []  # --cfg prints the config and runs nothing
    assert "seed: 5" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["model.no_such_key=1"], "Could not override 'model.no_such_key'"),
    (["trainer.dpo.max_steps=1,2"], "To sweep over it, add --multirun"),
    (["model.optim.lr=[1"], "no viable alternative"),
])
def test_a_bad_override_is_an_error_message_not_a_run(argv, message, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run("gpt_dpo", argv, monkeypatch, full_path=False)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
