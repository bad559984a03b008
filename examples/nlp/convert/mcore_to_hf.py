"""Export one of our checkpoints (from any trainer, any layout) as a Hugging Face directory.

    python examples/nlp/convert/mcore_to_hf.py --input results/gpt_sft/final_model --output my_model_hf
    torchrun --nproc-per-node 2 examples/nlp/convert/mcore_to_hf.py --input CKPT --output HF_DIR --tp 2

The directory holds ``config.json``, safetensors weights (sharded with an index above
``--max-shard-size``) and the checkpoint's tokenizer, and loads with
``transformers.AutoModelForCausalLM.from_pretrained``. A model imported from Hugging Face
is written as its own architecture with its original config fields; a model trained from
scratch as the family it matches (Llama, Qwen2 or GPT-2). A reward model is written as that
family's ``*ForSequenceClassification`` (its head as ``score``; reward standardization is not
part of the export). A LoRA checkpoint (a training checkpoint of a run with
``model.peft.peft_scheme=lora``) is written with its adapters merged into its base model,
``W + (alpha / r) B A``; a LoRA run's ``final_model`` is merged already.
"""

import argparse


def _size(text: str) -> int:
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="checkpoint directory (training checkpoint or final_model)")
    p.add_argument("--output", required=True, help="Hugging Face directory to write")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this conversion")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this conversion")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: the original Hugging Face dtype, else the model's)")
    p.add_argument("--max-shard-size", default="2GB", type=_size, help="largest safetensors file, e.g. 5GB")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output even when it is a non-empty directory that is not an earlier output of ours")
    args = p.parse_args(argv)

    from pathlib import Path

    from nemo_aligner.checkpoint.distributed import CheckpointError, is_checkpoint, read_model_config
    from nemo_aligner.checkpoint.hf import export_hf_model
    from nemo_aligner.checkpoint.output import check_output_dir, is_our_export
    from nemo_aligner.models.reward_model import is_reward_checkpoint, reward_model_from_checkpoint
    from nemo_aligner.utils import distributed
    from nemo_aligner.utils.entry import report_user_errors
    from nemo_aligner.utils.logging import get_logger
    from nemo_aligner.utils.setup import model_from_checkpoint

    log = get_logger()
    with report_user_errors():
        if not is_checkpoint(args.input):
            raise CheckpointError(f"--input {args.input} is not one of our checkpoints (metadata.json + model_config.yaml)")
        check_output_dir(args.output, is_our_export, args.overwrite)
        distributed.initialize(args.tp, args.pp)
        if is_reward_checkpoint(args.input):  # written as a *ForSequenceClassification model
            model, model_cfg = reward_model_from_checkpoint(args.input)
        else:
            model = model_from_checkpoint(args.input)
            model_cfg = read_model_config(args.input)
        tokenizer = Path(args.input) / "tokenizer"
        out = export_hf_model(model, model_cfg, args.output, dtype=args.dtype,
                              tokenizer_dir=tokenizer if tokenizer.is_dir() else None,
                              max_shard_size=args.max_shard_size, progress=True, overwrite=args.overwrite)
    log.info(f"wrote {out}")
    distributed.destroy()


if __name__ == "__main__":
    main()
