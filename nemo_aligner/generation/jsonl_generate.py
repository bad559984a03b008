"""JSONL prompts in, JSONL responses out: what ``examples/nlp/gpt/generate.py`` runs.

Each input line ``{"text": prompt, ...}`` gives one output line with the same fields plus
``"response"`` (decoded text) and ``"response_ids"`` (generated ids, EOS included when it
was produced). Sample ``i`` (0-based line order) is drawn with seed ``sampling.seed + i``,
so the output does not depend on ``batch_size`` or on the data-parallel size.

With ``steerlm.attributes`` (or ``steerlm.label``) each ``text`` is a user message and the
prompt asks for a reply with those attributes, rendered as training rendered it (see
:mod:`nemo_aligner.data.steerlm_template`): in NeMo's template the reply stops at the next
turn-start token, in a tokenizer's chat template at EOS.

Every check on the input happens before anything is written; the output file is written
to a temporary name next to it and renamed into place at the end.
"""

from dataclasses import replace

import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from nemo_aligner.data.datasets import read_jsonl, write_jsonl
from nemo_aligner.data.errors import DataError
from nemo_aligner.generation.engine import SamplingParams
from nemo_aligner.utils import distributed
from nemo_aligner.utils.config import cfg_get

SAMPLING_KEYS = ("greedy", "temperature", "top_k", "top_p", "max_new_tokens", "min_new_tokens",
                 "seed", "stop_strings")
ENGINES = ("megatron", "trtllm")


def sampling_params(cfg) -> SamplingParams:
    sampling = cfg_get(cfg, "sampling", {}) or {}
    return SamplingParams(**{k: sampling[k] for k in SAMPLING_KEYS if sampling.get(k) is not None})


def steerlm_settings(cfg) -> dict | None:
    """``steerlm.*``: the label (from ``attributes`` or ``label``), system turn and template
    tokens of attribute-conditioned prompts; None when neither is set."""
    from nemo_aligner.data.steerlm import label_from_attributes, parse_label
    from nemo_aligner.data.steerlm_template import chat_prompt_tokens

    s = cfg_get(cfg, "steerlm", None) or {}
    attributes, label = s.get("attributes"), s.get("label")
    if attributes is None and label is None:
        return None
    if attributes is not None and label is not None:
        raise ValueError("set steerlm.attributes or steerlm.label, not both")
    if attributes is not None:
        if not hasattr(attributes, "items"):
            raise ValueError(f"steerlm.attributes={attributes!r}; give a mapping, e.g. steerlm.attributes={{helpfulness: 4, verbosity: 1}}")
        label = label_from_attributes(dict(attributes))
    parse_label(label, where="steerlm.label")
    system = s.get("system") or ""
    return {"label": label, "system": str(system), "tokens": chat_prompt_tokens(s.get("chat_prompt_tokens")),
            "nemo_template": s.get("chat_prompt_tokens") is not None, "chat_template": None}


def prompt_text(obj: dict, where: str, steerlm: dict | None) -> str:
    """A line's prompt: its ``text``, or with ``steerlm`` set the attribute-conditioned prompt for
    the user message ``text`` (the line's own ``label`` / ``system`` win over the config's)."""
    from nemo_aligner.data.steerlm import parse_label
    from nemo_aligner.data.steerlm_template import conditioned_prompt

    text = obj.get("text")
    if not isinstance(text, str):
        what = "missing field 'text'" if text is None else f"field 'text' must be a string, got {type(text).__name__}"
        raise DataError(f"{where}: {what}; each line needs {{\"text\": prompt}}")
    if steerlm is None:
        return text
    label = obj.get("label", steerlm["label"])
    parse_label(label, where=f"{where}: field 'label'")
    return conditioned_prompt(text, label, obj.get("system", steerlm["system"]), steerlm["tokens"],
                              chat_template=steerlm["chat_template"])


def read_prompts(path, tokenizer, add_bos: bool, steerlm: dict | None = None) -> tuple[list[tuple[int, dict]], list[list[int]]]:
    """The input lines and their prompts as token ids; :class:`DataError` on a bad line."""
    try:
        lines = read_jsonl(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"input_file={path} not found; give a JSONL file with one {{\"text\": prompt}} per line"
        ) from None
    prompts = []
    for line_no, obj in lines:
        text = prompt_text(obj, f"{path}:{line_no}", steerlm)
        ids = ([tokenizer.bos_id] if add_bos else []) + tokenizer.text_to_ids(text)
        if not ids:
            raise DataError(f"{path}:{line_no}: empty prompt; give some text (or set add_bos=true)")
        prompts.append(ids)
    return lines, prompts


def check_prompt_lengths(path, lines, prompts, limit: int, params: SamplingParams) -> None:
    room = limit - params.max_new_tokens
    if room < 1:
        raise ValueError(
            f"sampling.max_new_tokens={params.max_new_tokens} leaves no room for a prompt: the model "
            f"holds {limit} positions; lower sampling.max_new_tokens"
        )
    for (line_no, _), ids in zip(lines, prompts):
        if len(ids) > room:
            raise DataError(
                f"{path}:{line_no}: prompt has {len(ids)} tokens but at most {room} fit (the model holds "
                f"{limit} positions, sampling.max_new_tokens={params.max_new_tokens}); shorten the "
                "prompt or lower sampling.max_new_tokens"
            )


def load_model(cfg):
    """``(model, model_cfg)`` from ``pretrained_checkpoint.restore_from_path`` (one of our
    checkpoints or a Hugging Face directory), at the current tensor-parallel layout."""
    from nemo_aligner.checkpoint.distributed import is_checkpoint, read_model_config
    from nemo_aligner.checkpoint.hf import import_hf_model
    from nemo_aligner.utils.setup import model_from_checkpoint, restore_path

    path = restore_path(cfg)
    if path is None:
        raise ValueError(
            "set pretrained_checkpoint.restore_from_path to one of our checkpoints or a Hugging Face directory"
        )
    precision = cfg_get(cfg, "model.precision", None)
    if is_checkpoint(path):
        if precision is not None:
            raise ValueError("model.precision applies to Hugging Face directories; our checkpoints keep their own")
        return model_from_checkpoint(path), read_model_config(path)
    return import_hf_model(path, precision=precision, encoder_seq_length=cfg_get(cfg, "model.encoder_seq_length", None))


def build_engine(cfg, model, model_cfg, tokenizer):
    kind = str(cfg_get(cfg, "engine", "megatron"))
    if kind not in ENGINES:
        raise ValueError(f"engine={kind}; choose one of {ENGINES}")
    if kind == "trtllm":
        from nemo_aligner.generation.trtllm_engine import TRTLLMEngine

        engine_dir = cfg_get(cfg, "trtllm.engine_dir", None)
        if engine_dir is None:
            raise ValueError("engine=trtllm needs trtllm.engine_dir (where the built engine is written)")
        return TRTLLMEngine(model, model_cfg, tokenizer, engine_dir,
                            max_batch_size=int(cfg_get(cfg, "batch_size", 16)))
    from nemo_aligner.generation.megatron_engine import MegatronEngine

    return MegatronEngine(
        model, tokenizer, vocab_size=int(model_cfg["vocab_size"]),
        max_batch_size=int(cfg_get(cfg, "batch_size", 16)), decoder=str(cfg_get(cfg, "decoder", "auto")),
    )


def generate_jsonl(cfg) -> int:
    """Run the whole job; returns the number of lines written (on every rank)."""
    from nemo_aligner.utils.setup import build_tokenizer, init_distributed

    input_file, output_file = cfg_get(cfg, "input_file", None), cfg_get(cfg, "output_file", None)
    if input_file is None or output_file is None:
        raise ValueError("set input_file=PROMPTS.jsonl and output_file=RESPONSES.jsonl")
    if int(cfg_get(cfg, "model.pipeline_model_parallel_size", 1)) != 1:
        raise ValueError(
            "generation runs with model.pipeline_model_parallel_size=1 (use tensor parallelism, "
            "and more processes for data parallelism)"
        )
    params = sampling_params(cfg)
    steerlm = steerlm_settings(cfg)
    init_distributed(cfg)  # as the trainers do, with freed host memory kept for reuse on CPU
    tokenizer, _ = build_tokenizer(cfg)
    if steerlm is not None:
        # As training rendered it: the tokenizer's chat template unless NeMo's tokens are set.
        steerlm["chat_template"] = None if steerlm["nemo_template"] else tokenizer.chat_template
        if steerlm["chat_template"] is None and steerlm["tokens"]["turn_start"] not in params.stop_strings:
            # A reply ends where the next turn would start (NeMo-Aligner's end string).
            params = replace(params, stop_strings=(*params.stop_strings, steerlm["tokens"]["turn_start"]))
    lines, prompts = read_prompts(input_file, tokenizer, bool(cfg_get(cfg, "add_bos", False)), steerlm)
    model, model_cfg = load_model(cfg)
    engine = build_engine(cfg, model, model_cfg, tokenizer)
    check_prompt_lengths(input_file, lines, prompts, int(model.max_sequence_length), params)

    # Data-parallel replicas take every dp-th prompt; seeds follow the global line index.
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = list(range(dp_rank, len(prompts), dp))
    batch = int(cfg_get(cfg, "batch_size", 16))
    results = {}
    bar = tqdm(total=len(mine), desc="generating", unit="prompt", disable=not distributed.is_global_rank_zero())
    for start in range(0, len(mine), batch):
        index = mine[start:start + batch]
        out = engine.generate([prompts[i] for i in index], params, seeds=[params.seed + i for i in index])
        for i, text, ids in zip(index, out.texts, out.response_ids):
            results[i] = (text, ids)
        bar.update(len(index))
    bar.close()
    if dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
    if distributed.is_global_rank_zero():
        records = [dict(obj, response=results[i][0], response_ids=results[i][1]) for i, (_, obj) in enumerate(lines)]
        write_jsonl(output_file, records)
    distributed.barrier()
    return len(lines)
