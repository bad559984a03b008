"""Convert a Hugging Face model directory into one of our checkpoints (model weights only).

    python examples/nlp/convert/hf_to_mcore.py --input HF_DIR --output CKPT_DIR [--dtype bf16]
    torchrun --nproc-per-node 4 examples/nlp/convert/hf_to_mcore.py --input HF_DIR \\
        --output CKPT_DIR --tp 2 --pp 2

Training does not need this step (``pretrained_checkpoint.restore_from_path`` takes a
Hugging Face directory directly); it is for converting once and starting many runs. The
checkpoint is reshardable: it loads at any TP/PP layout, whatever ``--tp``/``--pp`` were.
Supported: Llama (incl. Llama 3), Mistral, Qwen2, GPT-2.
"""

import argparse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--output", required=True, help="checkpoint directory to write")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this conversion")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this conversion")
    p.add_argument("--dtype", default="32", choices=["32", "fp32", "bf16", "16", "fp16"],
                   help="parameter dtype of the checkpoint (default float32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output even when it is a non-empty directory that is not an earlier output of ours")
    args = p.parse_args(argv)

    from pathlib import Path

    from nemo_aligner.checkpoint.distributed import is_checkpoint, save_checkpoint
    from nemo_aligner.checkpoint.output import check_output_dir
    from nemo_aligner.checkpoint.hf import import_hf_model, read_hf_config
    from nemo_aligner.utils import distributed
    from nemo_aligner.utils.entry import report_user_errors
    from nemo_aligner.utils.logging import get_logger

    log = get_logger()
    with report_user_errors():
        if not Path(args.input).is_dir():
            raise FileNotFoundError(f"--input {args.input} is not a directory; give a Hugging Face model directory")
        read_hf_config(args.input)
        check_output_dir(args.output, is_checkpoint, args.overwrite)
        distributed.initialize(args.tp, args.pp)
        model, model_cfg = import_hf_model(args.input, precision=args.dtype, progress=True)
    has_tokenizer = any((Path(args.input) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    with report_user_errors():
        save_checkpoint(args.output, [model], model_cfg, tokenizer_dir=args.input if has_tokenizer else None,
                        overwrite=args.overwrite)
    log.info(f"wrote {args.output} ({model_cfg['hf_config']['model_type']}, {model_cfg['num_layers']} layers, "
             f"precision {model_cfg['precision']}{', with tokenizer' if has_tokenizer else ''})")
    distributed.destroy()


if __name__ == "__main__":  # dist_checkpointing's writer processes re-import this file
    main()
