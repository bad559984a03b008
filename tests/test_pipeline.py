"""The README's quickstart pipeline (short config): SFT, then a reward model, DPO and GRPO from
the SFT model, each scored on held-out counting prompts, and the report."""

import json
import subprocess

import pytest

from helpers import ROOT, _env


@pytest.mark.slow
def test_quickstart_pipeline_raises_the_held_out_score(tmp_path):
    out = tmp_path / "quickstart"
    env = _env({"OUT": str(out), "SFT_EPOCHS": "2", "RL_STEPS": "100"})
    proc = subprocess.run(["bash", "examples/pipeline/quickstart.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = {s: json.loads((out / "scores" / f"{s}.json").read_text()) for s in ("sft", "rm", "dpo", "grpo")}
    assert scores["dpo"]["score"] >= scores["sft"]["score"] + 0.1, scores  # DPO beats the SFT model it started from
    assert scores["grpo"]["score"] >= scores["sft"]["score"] + 0.1, scores
    assert scores["rm"]["score"] > 0.5  # ranks held-out pairs better than chance
    for stage in ("sft", "dpo", "grpo"):
        assert f"held-out score of {stage}:" in proc.stdout
    report = (out / "report.md").read_text()
    assert "report.png" in report and "| dpo |" in report
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
