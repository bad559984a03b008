"""The metrics a run logs reach metrics.jsonl and TensorBoard, step by step."""

import json
import math

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nemo_aligner.utils.logging import MetricsLogger


def test_every_finite_scalar_reaches_tensorboard_at_its_step(tmp_path):
    logger = MetricsLogger(tmp_path, config_yaml="a: 1\n")
    rows = {1: {"train/loss": 0.75, "train/acc": 1, "lr": 3e-4, "note": "text", "bad": math.nan},
            2: {"train/loss": 0.5, "train/acc": 0, "lr": 2e-4, "val/loss": -1.25}}
    for step, metrics in rows.items():
        logger.log(metrics, step)
    logger.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["lr", "train/acc", "train/loss", "val/loss"]
    for tag in ("train/loss", "train/acc", "lr", "val/loss"):
        expected = [(step, float(m[tag])) for step, m in rows.items() if tag in m]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected]
        for (_, value), (_, want) in zip(got, expected):
            assert math.isclose(value, want, rel_tol=1e-7)  # float32 in the event file
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and lines[0]["note"] == "text"
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"
