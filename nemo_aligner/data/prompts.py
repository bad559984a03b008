"""Prompt data for online RL (REINFORCE, GRPO, PPO, rejection sampling).

Each JSONL line is ``{"text": prompt, ...}``; any other fields (an ``answer``, metadata)
travel with the prompt to the reward function as its ``samples`` row. Prompts are tokenized
once, eagerly, and every one must leave room for the response: a prompt longer than
``max_prompt_length`` (the context minus ``length_params.max_length``) is an error naming
the file and line, raised before anything is written.
"""

from nemo_aligner.data.datasets import data_files, read_data_files
from nemo_aligner.data.errors import DataError


class PromptDataset:
    """Tokenized prompts; ``dataset[i]`` is ``{"index", "prompt_ids", "text", "sample"}``."""

    def __init__(self, paths, tokenizer, max_prompt_length: int, add_bos: bool = False, limit_hint: str = ""):
        self.paths = data_files(paths)
        self.path = ", ".join(self.paths)
        if add_bos and tokenizer.bos_id is None:
            raise ValueError("model.data.add_bos=true but the tokenizer has no BOS token; set it to false")
        self.items = []
        for where, row in read_data_files(self.paths):
            text = row.get("text")
            if not isinstance(text, str) or not text:
                what = "missing field 'text'" if text is None else "field 'text' must be a non-empty string"
                raise DataError(f"{where}: {what}; each prompt line needs {{\"text\": prompt}}")
            ids = ([tokenizer.bos_id] if add_bos else []) + tokenizer.text_to_ids(text)
            if len(ids) > max_prompt_length:
                raise DataError(
                    f"{where}: prompt has {len(ids)} tokens but at most {max_prompt_length} fit"
                    f"{limit_hint}; shorten the prompt, raise model.encoder_seq_length or lower the "
                    "response length"
                )
            self.items.append({"index": len(self.items), "prompt_ids": ids, "text": text, "sample": row})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class PromptLoader:
    """This data-parallel rank's prompts for each step: ``(global_offset, [item, ...])``, where
    ``global_offset`` is the position of the rank's first prompt in the step's global batch
    (the sampler gives each rank a contiguous share of it)."""

    def __init__(self, dataset: PromptDataset, sampler):
        self.dataset = dataset
        self.sampler = sampler

    def _offset(self) -> int:
        s = self.sampler
        return s.data_parallel_rank * (-(-s.global_batch_size // s.data_parallel_size))

    def __iter__(self):
        for indices in self.sampler:
            yield self._offset(), [self.dataset[i] for i in indices]
