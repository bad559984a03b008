"""The reward-model server (``examples/nlp/gpt/serve_reward_model.py``, ``conf/inference_rm.yaml``).

NeMo-Aligner's endpoint and tensors: ``reward_model`` takes ``tokens`` int64 ``[-1]`` (a
sequence, right-padded), ``sequence_lengths`` int64 ``[1]`` and optionally ``sentences``
bytes ``[1]``, and answers ``rewards`` float32 ``[k]`` (``k`` = the reward model's outputs: 1,
or one per attribute for a SteerLM regression model), with dynamic batching. It serves:

- a reward model (``rm_model_file``: one of our reward-model checkpoints or a Hugging Face
  ``*ForSequenceClassification`` directory) at the server's own TP/PP/DP layout (data-parallel
  ranks split each batch), standardized with ``model.reward_standardization`` (the
  checkpoint's unless overridden): ``r' = (r - mean) / std``;
- or, with ``reward.function`` set, that rule-based reward. It reads each sample's prompt,
  response and prompt row from ``sentences`` (JSON, as our client sends them); a request
  without ``sentences`` is decoded with the tokenizer (of ``rm_model_file`` or
  ``model.tokenizer.model``) and scored as a response with an empty prompt and row.
"""

import json
import os
import socket

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_aligner.utils.config import cfg_get

ENDPOINT = "reward_model"


def reward_tensors():
    from pytriton.model_config import Tensor

    inputs = [
        Tensor(name="tokens", dtype=np.int64, shape=(-1,)),
        Tensor(name="sequence_lengths", dtype=np.int64, shape=(1,)),
        Tensor(name="sentences", dtype=bytes, shape=(1,), optional=True),
    ]
    return inputs, [Tensor(name="rewards", dtype=np.float32, shape=(-1,))]


def _sequences(inputs) -> list[list[int]]:
    tokens, lengths = inputs["tokens"], inputs["sequence_lengths"].reshape(-1)
    return [tokens[i, : int(n)].tolist() for i, n in enumerate(lengths)]


def check_request(inputs, vocab_size: int | None = None, max_length: int | None = None) -> None:
    """Reject a malformed request before it reaches the model (the error goes to the client)."""
    tokens, lengths = inputs["tokens"], inputs["sequence_lengths"].reshape(-1)
    if tokens.ndim != 2 or len(lengths) != tokens.shape[0]:
        raise ValueError(f"tokens {tokens.shape} and sequence_lengths {inputs['sequence_lengths'].shape} do not match")
    if (lengths < 1).any() or (lengths > tokens.shape[1]).any():
        raise ValueError(f"sequence_lengths must be between 1 and the tokens' width {tokens.shape[1]}")
    if max_length is not None and int(lengths.max()) > max_length:
        raise ValueError(f"a sequence has {int(lengths.max())} tokens; the reward model takes at most {max_length}")
    if vocab_size is not None and ((tokens < 0) | (tokens >= vocab_size)).any():
        raise ValueError(f"tokens must be ids in [0, {vocab_size}); was the request tokenized with the model's tokenizer?")


class RewardModelScorer:
    """``compute`` for a reward model: every rank runs it; data-parallel ranks split the batch."""

    def __init__(self, model, model_cfg, micro_batch_size: int, shift=None, pad_id: int = 0):
        from nemo_aligner.models.reward_model import reward_settings

        self.model = model
        self.reduction = reward_settings(model_cfg)["reduction"]
        self.outputs = int(reward_settings(model_cfg)["num_attributes"])
        self.micro_batch_size = int(micro_batch_size)
        self.shift = shift
        self.pad_id = pad_id
        self.vocab_size = int(model_cfg["vocab_size"])
        self.max_length = int(model_cfg.get("encoder_seq_length") or model_cfg["max_position_embeddings"])

    def validate(self, inputs) -> None:
        check_request(inputs, self.vocab_size, self.max_length)

    def __call__(self, inputs) -> dict:
        from nemo_aligner.algorithms.reward_sources import score_sequences

        sequences = _sequences(inputs)
        dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        mine = list(range(rank, len(sequences), dp))
        scores = torch.zeros(len(sequences), self.outputs, dtype=torch.float64)
        if mine:
            scores[mine] = score_sequences([self.model], [sequences[i] for i in mine], self.pad_id,
                                           self.micro_batch_size, self.reduction).double()
        if dp > 1:
            dist.all_reduce(scores, group=parallel_state.get_data_parallel_group())
        if self.shift is not None:
            scores = (scores - float(self.shift[0].reshape(-1)[0])) / float(self.shift[1].reshape(-1)[0])
        return {"rewards": scores.float().numpy()}


class RuleScorer:
    """``compute`` for a rule-based reward (computed on global rank 0 only)."""

    def __init__(self, spec: str, tokenizer=None):
        from nemo_aligner.rewards.functions import load_reward_function

        self.spec = spec
        self.fn = load_reward_function(spec)
        self.tokenizer = tokenizer

    def validate(self, inputs) -> None:
        check_request(inputs)
        if "sentences" not in inputs and self.tokenizer is None:
            raise ValueError("this server scores a rule-based reward and needs 'sentences' (or a tokenizer: "
                             "start it with rm_model_file or model.tokenizer.model)")

    def _texts(self, inputs):
        if "sentences" in inputs:
            rows = [json.loads(bytes(s).decode()) if isinstance(s, (bytes, np.bytes_)) else json.loads(s)
                    for s in inputs["sentences"].reshape(-1)]
            return [r.get("prompt", "") for r in rows], [r.get("response", "") for r in rows], [r.get("sample", {}) for r in rows]
        texts = [self.tokenizer.ids_to_text(seq) for seq in _sequences(inputs)]
        return [""] * len(texts), texts, [{} for _ in texts]

    def __call__(self, inputs) -> dict:
        from nemo_aligner.rewards.functions import call_reward_function

        n = inputs["tokens"].shape[0]
        if dist.is_initialized() and dist.get_rank() != 0:
            return {"rewards": np.zeros((n, 1), dtype=np.float32)}
        prompts, responses, samples = self._texts(inputs)
        values = call_reward_function(self.fn, prompts, responses, samples, self.spec)
        return {"rewards": np.asarray(values, dtype=np.float32).reshape(-1, 1)}


def check_port_free(host: str, port: int, key: str = "inference.port") -> None:
    """Fail in one line when another server listens on ``host:port`` (with SO_REUSEADDR, as
    Triton binds, so connections that recently closed there do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"{key}={port} on {host} cannot be used ({e.strerror}); choose another port") from None


def build_reward_server(cfg):
    """An :class:`~nemo_aligner.servers.base.InferenceServer` for the ``reward_model``
    endpoint, from ``conf/inference_rm.yaml``'s keys; bad input fails before anything starts."""
    from nemo_aligner.data.tokenizers import load_tokenizer
    from nemo_aligner.servers.base import InferenceServer
    from nemo_aligner.servers.client import _require_pytriton
    from nemo_aligner.utils import distributed

    _require_pytriton()
    inference = cfg_get(cfg, "inference", {}) or {}
    host = str(inference.get("host") or "127.0.0.1")
    port = int(inference.get("port", 5555))
    mbs = int(inference.get("inference_micro_batch_size") or inference.get("micro_batch_size") or 4)
    if mbs < 1:
        raise ValueError(f"inference.inference_micro_batch_size={mbs}; it must be >= 1")
    rm_path = cfg_get(cfg, "rm_model_file", None)
    function = cfg_get(cfg, "reward.function", None)
    if not rm_path and not function:
        raise ValueError("set rm_model_file (a reward model) or reward.function (a rule-based reward)")
    if rm_path and not os.path.isdir(str(rm_path)):
        raise FileNotFoundError(f"rm_model_file={rm_path} does not exist; give the final_model of train_reward_model.py "
                                "or a Hugging Face sequence classifier directory")
    tokenizer_path = cfg_get(cfg, "model.tokenizer.model", None)
    if tokenizer_path is None and rm_path:
        tokenizer_path = os.path.join(str(rm_path), "tokenizer") if os.path.isdir(os.path.join(str(rm_path), "tokenizer")) else str(rm_path)
    tokenizer = load_tokenizer(str(tokenizer_path)) if tokenizer_path and (function or rm_path) else None

    if function:
        scorer = RuleScorer(str(function), tokenizer)
        distributed.initialize(seed=int(cfg_get(cfg, "seed", 1234)), timeout_s=distributed.SERVER_TIMEOUT_S)
    else:
        from nemo_aligner.models.reward_model import read_reward_model_config, reward_model_from_checkpoint, standardization

        saved = read_reward_model_config(str(rm_path))  # a non-reward checkpoint fails here, before distributed init
        distributed.initialize(
            tensor_model_parallel_size=int(cfg_get(cfg, "model.tensor_model_parallel_size", 1)),
            pipeline_model_parallel_size=int(cfg_get(cfg, "model.pipeline_model_parallel_size", 1)),
            seed=int(cfg_get(cfg, "seed", 1234)), num_layers=int(saved["num_layers"]),
            timeout_s=distributed.SERVER_TIMEOUT_S,
        )
        model, model_cfg = reward_model_from_checkpoint(str(rm_path))
        for p in model.parameters():
            p.requires_grad_(False)
        shift = standardization(model_cfg, dict(cfg_get(cfg, "model.reward_standardization", {}) or {}))
        pad = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
        scorer = RewardModelScorer(model, model_cfg, mbs, shift, pad)
    if distributed.is_global_rank_zero():
        check_port_free(host, port)
    inputs, outputs = reward_tensors()
    return InferenceServer(
        str(inference.get("model_name") or ENDPOINT), scorer, inputs, outputs, host=host, port=port,
        max_batch_size=mbs * parallel_state.get_data_parallel_world_size(),
        max_queue_delay_microseconds=int(inference.get("max_queue_delay_microseconds", 0) or 0),
        exit_timeout_s=int(inference.get("exit_timeout_s", 5)), validate=scorer.validate,
    )
