"""Precompute packs of preference pairs for DPO (or a Bradley-Terry reward model) and print
packing statistics.

    python examples/nlp/data/dpo/prepare_packed_dpo_dataset.py \
        --input data/quickstart/preference_train.jsonl --tokenizer data/quickstart \
        --max-seq-length 64 --pack-size 256 --algorithm first_fit_decreasing \
        --output preference_train.packs.json
    # then: model.data.packing.enabled=true model.data.packing.packed_file=preference_train.packs.json

A pack holds whole pairs (chosen and rejected together), so ``--pack-size`` must be at least
twice ``--max-seq-length``. A pair's prompt is counted once (training computes it once,
``model.data.packing.share_prompt``, on by default); ``--no-share-prompt`` counts it twice. The output is ``{"pack_size", "lengths", "bins"}`` (pair indices
in file order after dropped lines, and each pair's token count), checked against the data
when training loads it. Tokenization options must match training; ``--reward-model`` counts
tokens as the reward model sees them (unshifted).
"""

import argparse

from nemo_aligner.data.datasets import TRUNCATION_POLICIES
from nemo_aligner.data.packing import PACKING_ALGORITHMS
from nemo_aligner.data.preference import PackedGroupDataset, PreferenceDataset
from nemo_aligner.data.tokenizers import load_tokenizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="preference JSONL file")
    parser.add_argument("--tokenizer", required=True, help="tokenizer .model / tokenizer.json / directory")
    parser.add_argument("--max-seq-length", type=int, required=True, help="most tokens per sequence (prompt + response)")
    parser.add_argument("--pack-size", type=int, required=True, help="tokens per pack, at least 2 * max-seq-length")
    parser.add_argument("--algorithm", choices=PACKING_ALGORITHMS, default="first_fit_shuffle")
    parser.add_argument("--seed", type=int, default=1234, help="shuffle seed of first_fit_shuffle (the training seed)")
    parser.add_argument("--output", required=True, help="packs file (.json)")
    parser.add_argument("--truncation", choices=TRUNCATION_POLICIES, default="error")
    parser.add_argument("--add-bos", action="store_true")
    parser.add_argument("--no-eos", dest="add_eos", action="store_false")
    parser.add_argument("--reward-model", action="store_true", help="pack for reward-model training (unshifted sequences)")
    parser.add_argument("--no-share-prompt", dest="share_prompt", action="store_false",
                        help="count each pair's prompt twice (for model.data.packing.share_prompt=false)")
    args = parser.parse_args(argv)
    if args.pack_size < 2 * args.max_seq_length:
        parser.error(f"--pack-size {args.pack_size} is less than twice --max-seq-length ({2 * args.max_seq_length}); a pair may not fit")

    dataset = PreferenceDataset(
        args.input, load_tokenizer(args.tokenizer), args.max_seq_length, truncation=args.truncation,
        add_bos=args.add_bos, add_eos=args.add_eos, shift=not args.reward_model,
    )
    packed = PackedGroupDataset(dataset, args.pack_size, algorithm=args.algorithm, seed=args.seed,
                                share_prefix=args.share_prompt)
    packed.save(args.output)
    print(f"pairs: {len(dataset)} (truncated {dataset.num_truncated}, dropped {dataset.num_dropped})")
    print(f"packs: {len(packed)} of {args.pack_size} tokens, {len(dataset) / len(packed):.2f} pairs per pack")
    print(f"packing efficiency: {packed.packing_efficiency:.4f}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
