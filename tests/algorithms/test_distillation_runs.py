"""Knowledge distillation end to end: the teacher's top-k logits file (exact values, resume,
refusals), and a student distilled on few samples that beats the same student trained with SFT
alone for the same steps on held-out data."""

import json

import pytest
import torch

from helpers import ROOT, SFT_SCRIPT, read_metrics, run

pytestmark = pytest.mark.slow
TOPK_SCRIPT = ROOT / "examples/nlp/synthetic_data_gen/compute_topk_logits.py"
KD_SCRIPT = ROOT / "examples/nlp/gpt/train_gpt_knowledge_distillation.py"
DATA = ROOT / "data/quickstart"
STUDENT = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
           "model.num_query_groups=2", "model.encoder_seq_length=64", "model.micro_batch_size=8",
           "model.global_batch_size=16", "exp_manager.checkpoint_callback_params.save_final_model=false"]


def topk(teacher, data, out, *extra, check=True):
    return run(TOPK_SCRIPT, [f"pretrained_checkpoint.restore_from_path={teacher}", f"data.file_path={data}",
                             f"output_path={out}", *extra], check=check)


def error_line(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_topk_file_is_the_teachers_top_k_and_resumes(tiny_policy, tmp_path, dist_world_of_one):
    from nemo_aligner.data.datasets import SFTDataset
    from nemo_aligner.data.tokenizers import load_tokenizer
    from nemo_aligner.models.forward import full_logits
    from nemo_aligner.utils.setup import model_from_checkpoint

    out = tmp_path / "topk.jsonl"
    topk(tiny_policy, DATA / "sft_val.jsonl", out, "top_k=5", "end_at_idx=5")
    with open(out, "a") as f:  # a crash in the middle of a line
        f.write('{"index": 6, "tokens": [1, 2')
    topk(tiny_policy, DATA / "sft_val.jsonl", out, "top_k=5", "end_at_idx=9", "model.micro_batch_size=3")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(10))  # the partial line dropped, 0..5 not redone

    teacher = model_from_checkpoint(tiny_policy)
    data = SFTDataset(DATA / "sft_val.jsonl", load_tokenizer(str(tiny_policy / "tokenizer")), 64)
    for row in (rows[0], rows[7]):
        sample = data[row["index"]]
        assert row["tokens"] == sample["tokens"].tolist() and row["loss_mask"] == sample["loss_mask"].tolist()
        logits = full_logits(teacher, sample["tokens"][None])[0]
        values, ids = logits.topk(5, dim=-1)
        torch.testing.assert_close(torch.tensor(row["topk_logits"]), values, atol=1e-4, rtol=0)
        assert torch.equal(torch.tensor(row["topk_token_ids"]), ids)
        torch.testing.assert_close(torch.tensor(row["log_sum_exp_logits"]), logits.logsumexp(-1), atol=1e-4, rtol=0)

    again = topk(tiny_policy, DATA / "sft_val.jsonl", out, "top_k=8", check=False)
    assert again.returncode == 1 and "top_k=8" in error_line(again)[0] and "new output_path" in error_line(again)[0]


def test_distilled_student_beats_sft_alone_on_held_out_data(tiny_policy, tmp_path):
    """64 training samples, 60 steps (15 epochs): SFT alone overfits, the teacher's top-32
    distribution regularises (measured: held-out loss 3.56 distilled vs 3.91 SFT alone)."""
    train_rows = (DATA / "sft_train.jsonl").read_text().splitlines()[:64]
    (tmp_path / "train64.jsonl").write_text("\n".join(train_rows) + "\n")
    val_rows = (DATA / "sft_val.jsonl").read_text().splitlines()[:100]
    (tmp_path / "val100.jsonl").write_text("\n".join(val_rows) + "\n")
    for name in ("train64", "val100"):
        topk(tiny_policy, tmp_path / f"{name}.jsonl", tmp_path / f"{name}.topk.jsonl", "top_k=32")
    steps = ["max_steps=60", "max_epochs=100", "val_check_interval=60", "save_interval=0"]
    run(KD_SCRIPT, [*STUDENT, *(f"trainer.knowledge_distillation.{s}" for s in steps),
                    f"model.data.data_prefix.train={tmp_path / 'train64.topk.jsonl'}",
                    f"model.data.data_prefix.validation={tmp_path / 'val100.topk.jsonl'}",
                    "model.knowledge_distillation.sft_loss_weight=1.0", f"exp_manager.explicit_log_dir={tmp_path / 'kd'}"])
    run(SFT_SCRIPT, [*STUDENT, *(f"trainer.sft.{s}" for s in steps),
                     f"model.data.data_prefix.train={tmp_path / 'train64.jsonl'}",
                     f"model.data.data_prefix.validation={tmp_path / 'val100.jsonl'}",
                     f"exp_manager.explicit_log_dir={tmp_path / 'sft'}"])
    kd, sft = read_metrics(tmp_path / "kd")[-1], read_metrics(tmp_path / "sft")[-1]
    assert kd["step"] == sft["step"] == 60
    assert kd["val/loss"] == pytest.approx(kd["val/kd_loss"] + kd["val/sft_loss"], rel=1e-5)
    assert kd["val/sft_loss"] < sft["val/loss"] - 0.15, (kd["val/sft_loss"], sft["val/loss"])


def test_files_of_another_k_or_tokenizer_are_refused(tiny_policy, tmp_path):
    out = tmp_path / "topk.jsonl"
    topk(tiny_policy, DATA / "sft_val.jsonl", out, "top_k=4", "end_at_idx=15")
    common = [*STUDENT, f"model.data.data_prefix.train={out}", "model.data.data_prefix.validation=null",
              "trainer.knowledge_distillation.max_steps=1", f"exp_manager.explicit_log_dir={tmp_path / 'logs'}"]
    proc = run(KD_SCRIPT, [*common, "model.knowledge_distillation.top_k=8"], check=False)
    assert proc.returncode == 1 and str(out) in error_line(proc)[0] and "top 4" in error_line(proc)[0]
    proc = run(KD_SCRIPT, [*common, "model.knowledge_distillation.kd_loss_weight=0"], check=False)
    assert proc.returncode == 1 and "both 0" in error_line(proc)[0]
    meta = json.loads((tmp_path / "topk.jsonl.meta.json").read_text())
    (tmp_path / "topk.jsonl.meta.json").write_text(json.dumps(dict(meta, probe_ids=meta["probe_ids"][:-1])))
    proc = run(KD_SCRIPT, common, check=False)
    assert proc.returncode == 1 and "tokenizes differently" in error_line(proc)[0]
    assert not (tmp_path / "logs").exists()
