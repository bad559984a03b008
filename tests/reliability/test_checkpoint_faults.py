"""Checkpoints that cannot be lost or poisoned (real runs of the entry points and converters).

Each case asserts the exit status, the one line and what is on disk afterwards.
"""

import pickle
import shutil
import sys

import pytest

from helpers import ROOT, run
from reliability.common import checkpoints, one_error_line, read_rows, sft

pytestmark = pytest.mark.slow  # each case runs an entry point (a few seconds)
TO_HF = ROOT / "examples/nlp/convert/mcore_to_hf.py"
TO_MCORE = ROOT / "examples/nlp/convert/hf_to_mcore.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 4 steps with checkpoints at 2 and 4 (and a final model)."""
    log_dir = tmp_path_factory.mktemp("trained")
    sft(log_dir, "trainer.sft.max_steps=4", "trainer.sft.save_interval=2",
        "exp_manager.checkpoint_callback_params.save_top_k=-1")
    return log_dir


def copy_run(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


class _Touch:
    """Unpickling this runs ``touch <path>``: what a crafted checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


def poison(metadata_path, marker) -> None:
    metadata_path.write_bytes(pickle.dumps({"storage_data": _Touch(marker)}))


# ------------------------------------------------------------------------- converters
def test_export_refuses_a_foreign_directory(trained, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    proc = run(TO_HF, ["--input", str(trained / "final_model"), "--output", str(out)], check=False)
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert str(out) in line and "--overwrite" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"


def test_export_refuses_the_working_directory_and_a_file(trained, tmp_path):
    proc = run(TO_HF, ["--input", str(trained / "final_model"), "--output", "."], check=False)
    assert proc.returncode == 1 and "working directory" in one_error_line(proc)
    f = tmp_path / "file"
    f.write_text("x")
    proc = run(TO_HF, ["--input", str(trained / "final_model"), "--output", str(f)], check=False)
    assert proc.returncode == 1 and "is a file" in one_error_line(proc) and f.read_text() == "x"


def test_export_replaces_an_earlier_export_and_overwrite_replaces_a_foreign_one(trained, tmp_path):
    out = tmp_path / "hf"
    run(TO_HF, ["--input", str(trained / "final_model"), "--output", str(out)])
    first = (out / "model.safetensors").stat().st_mtime_ns
    run(TO_HF, ["--input", str(trained / "final_model"), "--output", str(out)])  # ours: replaced
    assert (out / "model.safetensors").stat().st_mtime_ns != first
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    run(TO_HF, ["--input", str(trained / "final_model"), "--output", str(foreign), "--overwrite"])
    assert (foreign / "config.json").is_file() and not (foreign / "x").exists()
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob("*.old-*"))


def test_hf_to_mcore_refuses_a_foreign_directory(trained, tmp_path):
    hf = tmp_path / "hf"
    run(TO_HF, ["--input", str(trained / "final_model"), "--output", str(hf)])
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep").write_text("keep")
    proc = run(TO_MCORE, ["--input", str(hf), "--output", str(out)], check=False)
    assert proc.returncode == 1 and "--overwrite" in one_error_line(proc) and (out / "keep").exists()
    run(TO_MCORE, ["--input", str(hf), "--output", str(out), "--overwrite"])
    assert (out / "metadata.json").is_file() and not (out / "keep").exists()


# ---------------------------------------------------------------- poisoned / damaged
def test_poisoned_metadata_on_restore_runs_nothing(trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "final_model", ckpt)
    marker = tmp_path / "pwned"
    poison(ckpt / ".metadata", marker)
    proc = sft(tmp_path / "logs", f"pretrained_checkpoint.restore_from_path={ckpt}", check=False)
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert f"{ckpt}/.metadata" in line and "could run code" in line
    assert not marker.exists() and not (tmp_path / "logs").exists()


def test_poisoned_newest_checkpoint_on_resume_falls_back(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    marker = tmp_path / "pwned"
    poison(run_dir / "checkpoints/step=0000004/.metadata", marker)
    proc = sft(run_dir, "trainer.sft.max_steps=5", "trainer.sft.save_interval=2")
    assert not marker.exists()
    assert "resuming from step=0000002" in proc.stdout and "could run code" in proc.stdout
    assert "resumed from" in proc.stdout and "step=0000002" in proc.stdout


@pytest.mark.parametrize("damage,needle", [
    ("truncate-shard", "is truncated"),
    ("remove-shard", "is missing"),
    ("remove-metadata", ".metadata is missing"),
    ("garble-metadata", ".metadata is damaged"),
    ("garble-common", "common.pt is damaged"),
    ("garble-config", "model_config.yaml is damaged"),
])
def test_damaged_checkpoint_on_restore_is_one_line(trained, tmp_path, damage, needle):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "final_model", ckpt)
    shard = sorted(ckpt.glob("*.distcp"))[0]
    if damage == "truncate-shard":
        with open(shard, "r+b") as f:
            f.truncate(100)
    elif damage == "remove-shard":
        shard.unlink()
    elif damage == "remove-metadata":
        (ckpt / ".metadata").unlink()
    elif damage == "garble-metadata":
        (ckpt / ".metadata").write_bytes((ckpt / ".metadata").read_bytes()[:50])
    elif damage == "garble-common":
        (ckpt / "common.pt").write_bytes(b"not a torch file")
    else:
        (ckpt / "model_config.yaml").write_text("num_layers: [unclosed\n")
    proc = sft(tmp_path / "logs", f"pretrained_checkpoint.restore_from_path={ckpt}", check=False)
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert str(ckpt) in line and needle in line, line
    assert not (tmp_path / "logs").exists()


def test_truncated_newest_checkpoint_resumes_from_the_older_one(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    shard = sorted((run_dir / "checkpoints/step=0000004").glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(1000)
    proc = sft(run_dir, "trainer.sft.max_steps=4", "trainer.sft.save_interval=2",
               "exp_manager.checkpoint_callback_params.save_top_k=-1")
    assert "resuming from step=0000002" in proc.stdout and "is truncated" in proc.stdout
    assert [r["step"] for r in read_rows(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]  # steps 3-4 redone, once each
    straight = read_rows(trained / "metrics.jsonl")
    assert read_rows(run_dir / "metrics.jsonl")[-1]["train/loss"] == pytest.approx(straight[-1]["train/loss"], abs=1e-6)


def test_damaged_trainer_state_is_skipped_on_resume(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    (run_dir / "checkpoints/step=0000004/trainer_state.json").write_text("{not json")
    proc = sft(run_dir, "trainer.sft.max_steps=5", "trainer.sft.save_interval=2")
    assert "trainer_state.json is damaged" in proc.stdout and "resumed from" in proc.stdout


def test_checkpoint_of_another_architecture_on_resume(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    proc = sft(run_dir, "trainer.sft.max_steps=6", "model.hidden_size=32", check=False)
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "model.hidden_size=64" in line and "model.hidden_size=32" in line
    assert checkpoints(run_dir) == checkpoints(trained)


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    # Python ignores SIGXFSZ, so writes beyond the file-size limit fail like a full disk does.
    code = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000)); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    from helpers import SFT_SCRIPT, own_process
    from reliability.common import TINY

    proc = own_process([sys.executable, "-c", code, str(SFT_SCRIPT), *TINY, f"exp_manager.explicit_log_dir={run_dir}",
                        "trainer.sft.max_steps=6", "trainer.sft.save_interval=2",
                        "exp_manager.checkpoint_callback_params.save_top_k=-1"])
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "step=0000006" in line and "earlier checkpoints are untouched" in line
    assert checkpoints(run_dir) == ["step=0000002", "step=0000004"]  # nothing half-written left
    from nemo_aligner.checkpoint.verify import verify_checkpoint

    verify_checkpoint(run_dir / "checkpoints/step=0000004")


def test_stale_temporary_directories_are_removed_at_start(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    stale = run_dir / "checkpoints/step=0000006.tmp-999999"  # no such process
    stale.mkdir()
    (stale / "part").write_text("x")
    sft(run_dir, "trainer.sft.max_steps=5", "trainer.sft.save_interval=0")
    assert not stale.exists()


def test_nan_never_ranks_best(tmp_path, dist_world_of_one):
    import json

    from nemo_aligner.checkpoint.distributed import CheckpointManager

    manager = CheckpointManager(tmp_path, save_top_k=1, monitor="val_loss", mode="min")
    for step, loss in ((1, 2.0), (2, float("nan")), (3, 3.0)):
        d = tmp_path / f"step={step:07d}"
        d.mkdir()
        for name in ("metadata.json", "model_config.yaml"):
            (d / name).write_text("{}")
        (d / "trainer_state.json").write_text(json.dumps({"step": step, "metrics": {"val_loss": loss}}))
    manager._prune(keep=tmp_path / "step=0000003")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=0000001", "step=0000003"]


def test_poisoned_common_pt_runs_nothing(trained, tmp_path):
    import torch

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "final_model", ckpt)
    marker = tmp_path / "pwned"
    torch.save({"x": _Touch(marker)}, ckpt / "common.pt")
    proc = sft(tmp_path / "logs", f"pretrained_checkpoint.restore_from_path={ckpt}", check=False)
    assert proc.returncode == 1
    assert f"{ckpt}/common.pt" in one_error_line(proc)
    assert not marker.exists() and not (tmp_path / "logs").exists()


def test_hf_to_mcore_refuses_an_output_that_is_a_file(trained, tmp_path):
    hf = tmp_path / "hf"
    run(TO_HF, ["--input", str(trained / "final_model"), "--output", str(hf)])
    f = tmp_path / "ckpt"
    f.write_text("x")
    proc = run(TO_MCORE, ["--input", str(hf), "--output", str(f)], check=False)
    assert proc.returncode == 1 and "is a file" in one_error_line(proc) and f.read_text() == "x"
