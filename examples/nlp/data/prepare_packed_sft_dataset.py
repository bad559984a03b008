"""Precompute sequence packs for an SFT JSONL file and print packing statistics.

    python examples/nlp/data/prepare_packed_sft_dataset.py \
        --input data/quickstart/sft_train.jsonl --tokenizer data/quickstart \
        --pack-size 256 --max-seq-length 128 --output sft_train.packs.json

The output is one JSON object ``{"pack_size", "lengths", "bins"}``: ``bins`` lists the
sample indices (0-based, in file order, after dropped lines are skipped) of each pack,
``lengths`` the samples' token counts, so ``PackedDataset.from_file(dataset, path)`` can
check that it is given the same samples. Tokenization options must match training.
"""

import argparse

from nemo_aligner.data.datasets import TRUNCATION_POLICIES, SFTDataset
from nemo_aligner.data.packing import PACKING_ALGORITHMS, PackedDataset
from nemo_aligner.data.templates import DEFAULT_PROMPT_TEMPLATE
from nemo_aligner.data.tokenizers import load_tokenizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="SFT JSONL file")
    parser.add_argument("--tokenizer", required=True, help="tokenizer .model / tokenizer.json / directory")
    parser.add_argument("--pack-size", type=int, required=True, help="tokens per pack")
    parser.add_argument("--max-seq-length", type=int, required=True, help="most tokens per sample, BOS/EOS included")
    parser.add_argument("--algorithm", choices=PACKING_ALGORITHMS, default="first_fit_shuffle")
    parser.add_argument("--seed", type=int, default=1234, help="shuffle seed of first_fit_shuffle")
    parser.add_argument("--output", required=True, help="packs file (.json)")
    parser.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE)
    parser.add_argument("--truncation", choices=TRUNCATION_POLICIES, default="error")
    parser.add_argument("--add-bos", action="store_true")
    parser.add_argument("--no-eos", dest="add_eos", action="store_false")
    args = parser.parse_args(argv)

    dataset = SFTDataset(
        args.input,
        load_tokenizer(args.tokenizer),
        args.max_seq_length,
        prompt_template=args.prompt_template,
        truncation=args.truncation,
        add_bos=args.add_bos,
        add_eos=args.add_eos,
    )
    packed = PackedDataset(dataset, args.pack_size, algorithm=args.algorithm, seed=args.seed)
    packed.save(args.output)
    print(f"samples: {len(dataset)} (truncated {dataset.num_truncated}, dropped {dataset.num_dropped})")
    print(f"packs: {len(packed)} of {args.pack_size} tokens, {len(dataset) / len(packed):.2f} samples per pack")
    print(f"packing efficiency: {packed.packing_efficiency:.4f}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
