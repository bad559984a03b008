"""Label the assistant turns of a SteerLM conversation file with a regression reward model's
attribute predictions (NeMo-Aligner's step 2 of SteerLM), in this process or through the
reward-model server.

    python examples/nlp/data/steerlm/attribute_annotate.py --rm-model-file results/rm_regression/final_model \
        --input-file conversations.jsonl --output-file labelled.jsonl
    python examples/nlp/gpt/serve_reward_model.py rm_model_file=results/rm_regression/final_model inference.port=5555 &
    python examples/nlp/data/steerlm/attribute_annotate.py --host localhost --port 5555 \
        --tokenizer results/rm_regression/final_model/tokenizer --input-file conversations.jsonl --output-file labelled.jsonl

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
    p.add_argument("--rm-model-file", default=None,
                   help="a regression reward model (one output per attribute), run in this process; with --port, "
                        "only its tokenizer and EOS setting are read")
    p.add_argument("--host", default=None, help="the reward-model server (serve_reward_model.py); default localhost")
    p.add_argument("--port", type=int, default=None, help="the server's port: annotate through the server")
    p.add_argument("--model_name", default="reward_model", help="the server's endpoint (NeMo-Aligner's name)")
    p.add_argument("--tokenizer", default=None,
                   help="with --port: the reward model's tokenizer (default: that of --rm-model-file)")
    p.add_argument("--add-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="append EOS to each text, as the reward model read its training texts (default: the "
                        "checkpoint's model.data.add_eos, else yes)")
    p.add_argument("--attributes", default=None,
                   help="comma-separated attribute names, one per reward-model output (default: NeMo-Aligner's nine)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server to start / answer")
    args = p.parse_args(argv)

    from nemo_aligner.data.steerlm import ATTRIBUTES, annotate_file
    from nemo_aligner.utils import distributed
    from nemo_aligner.utils.entry import report_user_errors
    from nemo_aligner.utils.logging import get_logger

    with report_user_errors():
        attributes = tuple(a.strip() for a in args.attributes.split(",")) if args.attributes else ATTRIBUTES
        if args.port is None and args.rm_model_file is None:
            raise ValueError("give --rm-model-file (the reward model, run here) or --port (its server)")
        if args.port is not None:
            score, close = server_scorer(args, attributes)
        else:
            distributed.initialize()
            score, close = in_process_scorer(args, attributes), distributed.destroy
        try:
            count = annotate_file(args.input_file, args.output_file, score, attributes)
        finally:
            close()
    get_logger().info(f"labelled {count} conversations into {args.output_file}")


def _tokenizer_and_eos(rm_path, tokenizer_path, add_eos):
    """The reward model's tokenizer, and whether its texts end with EOS (the checkpoint's
    ``model.data.add_eos`` unless ``add_eos`` says otherwise; our training default is yes)."""
    from pathlib import Path

    from nemo_aligner.checkpoint.distributed import read_model_config
    from nemo_aligner.data.tokenizers import load_tokenizer

    if tokenizer_path is None:
        if rm_path is None:
            raise ValueError("with --port, give --tokenizer (the reward model's tokenizer) or --rm-model-file")
        source = Path(rm_path)
        tokenizer_path = source / "tokenizer" if (source / "tokenizer").is_dir() else source
    if add_eos is None:
        add_eos = bool((read_model_config(rm_path).get("data") or {}).get("add_eos", True)) if rm_path else True
    return load_tokenizer(str(tokenizer_path)), add_eos


def in_process_scorer(args, attributes):
    from nemo_aligner.algorithms.reward_sources import score_sequences
    from nemo_aligner.models.reward_model import reward_model_from_checkpoint, reward_settings

    model, model_cfg = reward_model_from_checkpoint(args.rm_model_file)
    outputs = reward_settings(model_cfg)["num_attributes"]
    if outputs != len(attributes):
        raise ValueError(f"--rm-model-file {args.rm_model_file} has {outputs} outputs but {len(attributes)} attributes "
                         f"are named ({', '.join(attributes)}); pass --attributes with one name per output")
    tokenizer, add_eos = _tokenizer_and_eos(args.rm_model_file, args.tokenizer, args.add_eos)
    eos = [tokenizer.eos_id] if add_eos else []
    max_len = int(model_cfg.get("encoder_seq_length") or model_cfg["max_position_embeddings"])

    def score(texts):
        ids = [tokenizer.text_to_ids(t) + eos for t in texts]
        longest = max(len(i) for i in ids)
        if longest > max_len:
            raise ValueError(f"a conversation of {longest} tokens exceeds the reward model's {max_len}")
        return score_sequences([model], ids, tokenizer.pad_id, args.batch_size).tolist()

    return score


def server_scorer(args, attributes):
    """``(score, close)`` through the reward-model server; its outputs per text must match the
    attributes named."""
    from nemo_aligner.servers.client import RewardClient

    tokenizer, add_eos = _tokenizer_and_eos(args.rm_model_file, args.tokenizer, args.add_eos)
    eos = [tokenizer.eos_id] if add_eos else []
    client = RewardClient(args.host or "localhost", args.port, args.model_name,
                          init_timeout_s=args.timeout, inference_timeout_s=args.timeout)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def score(texts):
        values = client.submit_rewards([tokenizer.text_to_ids(t) + eos for t in texts], pad_id=pad,
                                       all_outputs=True).result()
        if values and len(values[0]) != len(attributes):
            raise ValueError(f"the reward model at {client.where} gives {len(values[0])} outputs per text but "
                             f"{len(attributes)} attributes are named ({', '.join(attributes)}); pass --attributes "
                             "with one name per output")
        return values

    return score, client.close


if __name__ == "__main__":
    main()
