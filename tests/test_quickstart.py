"""README's quickstart (short config) runs and learns: the loss goes down."""

import pytest

from helpers import SFT_SCRIPT, read_metrics, run


@pytest.mark.slow
def test_quickstart_loss_goes_down(tmp_path):
    proc = run(SFT_SCRIPT, [
        f"exp_manager.explicit_log_dir={tmp_path}", "trainer.sft.max_steps=30",
        "trainer.sft.val_check_interval=15",
    ])
    metrics = read_metrics(tmp_path)
    train = [m["train/loss"] for m in metrics]
    val = [m["val/loss"] for m in metrics if "val/loss" in m]
    assert len(train) == 30 and len(val) == 2
    assert sum(train[-5:]) / 5 < 0.7 * sum(train[:5]) / 5
    assert val[-1] < val[0]
    for key in ("train/lr", "train/grad_norm", "consumed_samples", "step_time", "timers/train_step"):
        assert key in metrics[-1]
    assert (tmp_path / "final_model" / "metadata.json").is_file()
    assert (tmp_path / "final_model" / "tokenizer" / "tokenizer.json").is_file()
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1
    assert list((tmp_path / "tensorboard").iterdir())
    assert f"{tmp_path}/checkpoints" in proc.stdout


@pytest.mark.slow
def test_packed_sft_trains(tmp_path):
    run(SFT_SCRIPT, [
        f"exp_manager.explicit_log_dir={tmp_path}", "trainer.sft.max_steps=12",
        "trainer.sft.val_check_interval=0", "model.data.packing.enabled=true",
        "model.micro_batch_size=2", "model.global_batch_size=8",
        "exp_manager.checkpoint_callback_params.save_final_model=false",
    ])
    metrics = read_metrics(tmp_path)
    # 8 packs of up to 64 tokens per step: many more response tokens than 8 samples hold.
    assert metrics[0]["train/num_tokens"] > 8 * 10
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"]
