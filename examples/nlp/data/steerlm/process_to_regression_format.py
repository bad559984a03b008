"""Turn a SteerLM attribute-labelled conversation file into regression reward-model training data
(NeMo-Aligner's step 1 of SteerLM).

    python examples/nlp/data/steerlm/process_to_regression_format.py \\
        --input-file merge_train.jsonl --output-file merge_train_reg.jsonl

Every turn whose ``label`` is present and non-empty gives one line ``{"text", "label"}``: ``text``
is the conversation up to and including that turn as the reward model reads it (NeMo-Aligner's
rendering, then the label token; the same text annotation scores), ``label`` one float per
attribute in NeMo-Aligner's order, -100.0 where the turn's label leaves the attribute out.
Train on it with ``train_reward_model.py model.reward_model_type=regression model.num_attributes=9``.
Format and rules: nemo_aligner/data/steerlm.py.
"""

import argparse
import json
import os

from nemo_aligner.data.errors import DataError
from nemo_aligner.data.preference import MISSING_LABEL
from nemo_aligner.data.steerlm import ATTRIBUTES, annotation_prompts, parse_label


def regression_lines(conversation: dict, where: str = "conversation") -> list[dict]:
    """``[{"text", "label": [one float per attribute]}, ...]``, one per turn with a non-empty label."""
    turns = conversation.get("conversations")
    if isinstance(turns, list):
        # Annotation scores every label that is not null, but NeMo-Aligner's conversion also skips
        # an empty one; hiding those keeps annotation_prompts' texts in step with the labels kept.
        turns = [dict(t, label=None) if isinstance(t, dict) and not t.get("label") else t for t in turns]
    texts = annotation_prompts(dict(conversation, conversations=turns), where)
    labelled = [(i, t["label"]) for i, t in enumerate(turns) if t.get("label") is not None]
    lines = []
    for text, (i, label) in zip(texts, labelled):
        field = f"{where}: conversations[{i}].label"
        if not isinstance(label, str):
            raise DataError(f"{field}: expected a string like 'quality:4,toxicity:0', got {type(label).__name__}")
        values = parse_label(label, where=field)
        lines.append({"text": text, "label": [float(values.get(a, MISSING_LABEL)) for a in ATTRIBUTES]})
    return lines


def convert_file(input_path, output_path) -> tuple[int, int]:
    """Write ``output_path`` from ``input_path``; returns (conversations, lines written). Nothing is
    written unless the whole input converts, so a bad line never leaves a half-written file."""
    from nemo_aligner.data.datasets import read_jsonl

    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input-file {input_path}: file not found")
    rows = read_jsonl(input_path)
    out = [line for line_no, row in rows for line in regression_lines(row, where=f"{input_path}:{line_no}")]
    if not out:
        # An empty output would only fail later, in the reward model's data reader.
        raise DataError(f"{input_path}: no turn has a label; label the assistant turns first "
                        "(e.g. 'quality:4,toxicity:0,...')")
    with open(output_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in out)
    return len(rows), len(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input-file", required=True, help="conversations with attribute labels (JSONL)")
    p.add_argument("--output-file", required=True, help='regression reward-model data: {"text", "label"} lines')
    args = p.parse_args(argv)

    from nemo_aligner.utils.entry import report_user_errors
    from nemo_aligner.utils.logging import get_logger

    with report_user_errors():
        conversations, written = convert_file(args.input_file, args.output_file)
    get_logger().info(f"wrote {written} labelled turns from {conversations} conversations to {args.output_file}")


if __name__ == "__main__":
    main()
