"""Label the assistant turns of a SteerLM conversation file with a regression reward model's
attribute predictions (NeMo-Aligner's step 2 of SteerLM), in this process.

    python examples/nlp/data/steerlm/attribute_annotate.py --rm-model-file results/rm_regression/final_model \
        --input-file conversations.jsonl --output-file labelled.jsonl

Every turn whose ``label`` is present and not null gets ``"quality:4,toxicity:0,..."``: the
model's predictions on the conversation up to that turn (NeMo-Aligner's rendering, then the
label token), clipped to [0, 4] and rounded. An interrupted run resumes, skipping the
conversations already written. Format and rules: nemo_aligner/data/steerlm.py.
"""

import argparse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input-file", required=True)
    p.add_argument("--output-file", required=True)
    p.add_argument("--rm-model-file", required=True, help="a regression reward model (one output per attribute)")
    p.add_argument("--attributes", default=None,
                   help="comma-separated attribute names, one per reward-model output (default: NeMo-Aligner's nine)")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)

    from pathlib import Path

    from nemo_aligner.algorithms.reward_sources import score_sequences
    from nemo_aligner.data.steerlm import ATTRIBUTES, annotate_file
    from nemo_aligner.data.tokenizers import load_tokenizer
    from nemo_aligner.models.reward_model import reward_model_from_checkpoint, reward_settings
    from nemo_aligner.utils import distributed
    from nemo_aligner.utils.entry import report_user_errors
    from nemo_aligner.utils.logging import get_logger

    with report_user_errors():
        attributes = tuple(a.strip() for a in args.attributes.split(",")) if args.attributes else ATTRIBUTES
        distributed.initialize()
        model, model_cfg = reward_model_from_checkpoint(args.rm_model_file)
        outputs = reward_settings(model_cfg)["num_attributes"]
        if outputs != len(attributes):
            raise ValueError(f"--rm-model-file {args.rm_model_file} has {outputs} outputs but {len(attributes)} attributes "
                             f"are named ({', '.join(attributes)}); pass --attributes with one name per output")
        source = Path(args.rm_model_file)
        tokenizer = load_tokenizer(str(source / "tokenizer" if (source / "tokenizer").is_dir() else source))
        max_len = int(model_cfg.get("encoder_seq_length") or model_cfg["max_position_embeddings"])

        # Score each text as the reward model read its training texts: with EOS when it was trained with one.
        eos = [tokenizer.eos_id] if bool((model_cfg.get("data") or {}).get("add_eos", True)) else []

        def score(texts):
            ids = [tokenizer.text_to_ids(t) + eos for t in texts]
            longest = max(len(i) for i in ids)
            if longest > max_len:
                raise ValueError(f"a conversation of {longest} tokens exceeds the reward model's {max_len}")
            return score_sequences([model], ids, tokenizer.pad_id, args.batch_size).tolist()

        count = annotate_file(args.input_file, args.output_file, score, attributes)
    get_logger().info(f"labelled {count} conversations into {args.output_file}")
    distributed.destroy()


if __name__ == "__main__":
    main()
