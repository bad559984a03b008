"""The PPO critic server (``examples/nlp/gpt/serve_ppo_critic.py``, ``conf/gpt_ppo_critic.yaml``).

NeMo-Aligner's endpoints and tensors, at the server's own TP/PP/DP layout (rank 0 serves and
broadcasts each call; one lock):

- ``critic_infer`` (batched): ``tokens`` int64 ``[-1]`` and ``sequence_lengths`` int64 ``[1]``
  in (``sentences`` bytes ``[1]`` accepted and ignored); ``values`` float32 ``[-1]`` out, one
  per token position (0 past the sequence), plus ``rewards`` float32 ``[1]`` when
  ``trainer.ppo.combine_rm_and_critic_server`` is set: the reward model's weights (those of
  ``pretrained_checkpoint.restore_from_path``, which must then be a reward model) are kept in
  CPU memory and swapped in for that pass;
- ``critic_train`` (unbatched): ``tokens`` int64 ``[N, W]``, ``returns``, ``prev_values`` and
  ``mask`` float32 ``[N, W]`` (label-aligned); ``loss_mean`` float32 ``[1]`` out;
- ``critic_save``: ``dummy_var`` int64 ``[1]`` in (our actor sends its step there),
  ``status`` int64 ``[1]`` out; writes a checkpoint (weights, optimizer, step, the actor's step)
  to ``exp_manager.explicit_log_dir``/checkpoints, from which a restarted server resumes;
- ``critic_info`` (ours): ``dummy_var`` in; ``vocab_size`` int64 ``[1]`` and ``probe_ids`` int64
  ``[-1]`` (the critic's tokenization of :data:`TOKENIZER_PROBE`), and ``actor_step`` (of the
  checkpoint it resumed from or last saved, -1 for none) out, so an actor with another
  tokenizer, or resumed from another step, is refused at start.

The math is :mod:`nemo_aligner.algorithms.critic`; this module only wires it to PyTriton.
"""

import numpy as np
from megatron.core import parallel_state

from nemo_aligner.data.tokenizers import tokenizer_fingerprint
from nemo_aligner.servers.reward_model import check_port_free, check_request
from nemo_aligner.utils.config import cfg_get, cfg_int

INFER, TRAIN, SAVE, INFO = "critic_infer", "critic_train", "critic_save", "critic_info"


def critic_tensors(combined: bool):
    from pytriton.model_config import Tensor

    infer_in = [Tensor(name="tokens", dtype=np.int64, shape=(-1,)),
                Tensor(name="sequence_lengths", dtype=np.int64, shape=(1,)),
                Tensor(name="sentences", dtype=bytes, shape=(1,), optional=True)]
    infer_out = [Tensor(name="values", dtype=np.float32, shape=(-1,))]
    if combined:
        infer_out.append(Tensor(name="rewards", dtype=np.float32, shape=(1,)))
    train_in = [Tensor(name="tokens", dtype=np.int64, shape=(-1, -1))] + [
        Tensor(name=k, dtype=np.float32, shape=(-1, -1)) for k in ("returns", "prev_values", "mask")]
    train_out = [Tensor(name="loss_mean", dtype=np.float32, shape=(1,))]
    save_in = [Tensor(name="dummy_var", dtype=np.int64, shape=(1,))]
    save_out = [Tensor(name="status", dtype=np.int64, shape=(1,))]
    info_out = [Tensor(name="vocab_size", dtype=np.int64, shape=(1,)), Tensor(name="probe_ids", dtype=np.int64, shape=(-1,)),
                Tensor(name="actor_step", dtype=np.int64, shape=(1,))]
    return (infer_in, infer_out), (train_in, train_out), (save_in, save_out), (save_in, info_out)


class CriticService:
    """The three endpoints' ``compute`` / ``validate`` over a
    :class:`~nemo_aligner.algorithms.critic.CriticTrainer`."""

    def __init__(self, trainer, max_length: int, vocab_size: int, reward=None, fingerprint=(0, [])):
        self.trainer = trainer
        self.fingerprint = fingerprint
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.reward = reward  # (ReferenceWeights of the reward model, reduction, standardization) or None

    def _width(self, width: int) -> int:
        m = max(self.trainer.settings.pad_multiple, 1)
        return -(-width // m) * m

    def validate_infer(self, inputs) -> None:
        check_request(inputs, self.vocab_size, self.max_length)

    def infer(self, inputs) -> dict:
        from nemo_aligner.algorithms.critic import sequence_rows

        sequences = sequence_rows(inputs["tokens"], inputs["sequence_lengths"])
        width = inputs["tokens"].shape[1]
        padded = min(self._width(width), max(self.max_length, width))
        out = {"values": self.trainer.values(sequences, padded)[:, :width].astype(np.float32)}
        if self.reward is not None:
            weights, reduction, shift = self.reward
            with weights.swapped():
                out["rewards"] = self.trainer.sequence_rewards(sequences, padded, reduction, shift).reshape(-1, 1)
        return out

    def validate_train(self, inputs) -> None:
        tokens = inputs["tokens"]
        if tokens.ndim != 2:
            raise ValueError(f"critic_train: tokens must be [N, W], got {tokens.shape}")
        for key in ("returns", "prev_values", "mask"):
            if inputs[key].shape != tokens.shape:
                raise ValueError(f"critic_train: {key} {inputs[key].shape} does not match tokens {tokens.shape}")
        if ((tokens < 0) | (tokens >= self.vocab_size)).any():
            raise ValueError(f"critic_train: tokens must be ids in [0, {self.vocab_size})")
        self.trainer.check_rollout(tokens.shape[0], tokens.shape[1], self.max_length)

    def train(self, inputs) -> dict:
        metrics = self.trainer.train_on(inputs["tokens"], inputs["returns"], inputs["prev_values"], inputs["mask"])
        return {"loss_mean": np.array([metrics["loss"]], dtype=np.float32)}

    def save(self, inputs) -> dict:
        self.trainer.actor_step = int(np.asarray(inputs["dummy_var"]).reshape(-1)[0])
        self.trainer.save()
        return {"status": np.array([0], dtype=np.int64)}

    def info(self, inputs) -> dict:
        vocab, probe = self.fingerprint
        return {"vocab_size": np.array([vocab], dtype=np.int64), "probe_ids": np.array(probe, dtype=np.int64),
                "actor_step": np.array([self.trainer.actor_step], dtype=np.int64)}


def build_critic_server(cfg):
    """An :class:`~nemo_aligner.servers.base.InferenceServer` with the critic's three
    endpoints, from ``conf/gpt_ppo_critic.yaml``'s keys; bad input fails before it serves."""
    from nemo_aligner.algorithms.critic import CriticSettings, CriticTrainer, build_critic_model
    from nemo_aligner.algorithms.reference import ReferenceWeights
    from nemo_aligner.checkpoint.distributed import read_model_config
    from nemo_aligner.models.reward_model import is_reward_checkpoint, read_reward_model_config, reward_settings, standardization
    from nemo_aligner.servers.base import Endpoint, InferenceServer
    from nemo_aligner.servers.client import _require_pytriton
    from nemo_aligner.utils import distributed, setup
    from nemo_aligner.utils.logging import MetricsLogger

    _require_pytriton()
    ppo = cfg_get(cfg, "trainer.ppo", {}) or {}
    host = str(ppo.get("host") or "127.0.0.1")
    port = cfg_int(ppo, "port", 5556, minimum=1, name="trainer.ppo.port")
    combined = bool(ppo.get("combine_rm_and_critic_server", False))
    infer_mbs = cfg_int(ppo, "inference_micro_batch_size", 4, minimum=1, name="trainer.ppo.inference_micro_batch_size")
    path = cfg_get(cfg, "pretrained_checkpoint.restore_from_path", None)
    if path is None:
        raise ValueError("set pretrained_checkpoint.restore_from_path to the critic's starting point: a reward model "
                         "(ours or a Hugging Face sequence classifier) or a causal LM (its value head starts at zero)")
    source = setup.restore_path(cfg)
    is_rm = is_reward_checkpoint(source)
    if not is_rm:
        try:
            rm_cfg = read_reward_model_config(source)
            is_rm = True
        except Exception:  # noqa: BLE001 -- not a reward model: a causal LM whose head starts at zero
            rm_cfg = None
    else:
        rm_cfg = read_model_config(source)
    if combined and not is_rm:
        raise ValueError(f"trainer.ppo.combine_rm_and_critic_server=true serves the reward model of "
                         f"pretrained_checkpoint.restore_from_path, but {path} is not a reward model")

    setup.init_distributed(cfg)
    model_cfg = setup.resolve_model_cfg(cfg)
    if rm_cfg is not None:
        model_cfg.update({k: rm_cfg[k] for k in ("reward_model_type", "num_attributes", "reward_reduction",
                                                 "reward_head_dtype") if k in rm_cfg})
        if reward_settings(model_cfg)["num_attributes"] != 1:
            raise ValueError(f"{path} has {model_cfg['num_attributes']} outputs; a critic needs a reward model with one")
    model_cfg.setdefault("reward_model_type", "binary_ranking")
    model_cfg["num_attributes"] = 1
    tokenizer, tokenizer_src = setup.build_tokenizer(cfg)
    vocab_size = setup.set_vocab_size(model_cfg, tokenizer)
    model, _ = build_critic_model(cfg, model_cfg, vocab_size, zero_head=not is_rm)
    overrides = dict(cfg_get(cfg, "model.reward_standardization", {}) or {})
    shift = standardization(rm_cfg or {}, overrides)
    model_cfg["reward_standardization"] = ({"enable": True, "mean": shift[0].tolist(), "std": shift[1].tolist()}
                                           if shift is not None else {"enable": False})
    reward = None
    if combined:
        reward = (ReferenceWeights(model), reward_settings(model_cfg)["reduction"], shift)
    settings = CriticSettings(
        loss_clip_val=float(cfg_get(cfg, "model.loss_clip_val", 0.2) or 0.0),
        forward_micro_batch_size=int(cfg_get(cfg, "model.forward_micro_batch_size", None) or infer_mbs),
        pad_multiple=int(ppo.get("strip_sequence_length_to_multiple") or 1),
    )
    pad_id = int(tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    trainer = CriticTrainer(cfg, model, settings=settings, shift=shift, pad_id=pad_id,
                            checkpoint_manager=setup.checkpoint_manager(cfg), model_cfg_to_save=model_cfg,
                            tokenizer_dir=tokenizer_src)
    trainer.optimizer, trainer.scheduler = setup.build_optimization(cfg, model_cfg, model, "ppo", trainer.max_steps)
    trainer.checkpoint_manager.remove_stale_temporaries()
    if cfg_get(cfg, "exp_manager.resume_if_exists", True):
        latest = trainer.checkpoint_manager.latest_intact()
        if latest is not None:
            setup.check_same_architecture(latest, model_cfg)
            trainer.restore(latest)
    else:
        setup.start_over_guard(cfg, trainer.checkpoint_manager)
    trainer.metrics_logger = MetricsLogger(setup.log_dir(cfg), config_yaml=setup.resolved_yaml(cfg))
    trainer.log.info(f"critic from {path} ({'a reward model' if is_rm else 'a causal LM, value head zeroed'}); "
                     f"{'serving the reward model too' if combined else 'values only'}")
    if distributed.is_global_rank_zero():
        check_port_free(host, port, "trainer.ppo.port")

    max_length = int(model_cfg.get("encoder_seq_length") or model_cfg["max_position_embeddings"])
    service = CriticService(trainer, max_length, vocab_size, reward, tokenizer_fingerprint(tokenizer))
    (infer_in, infer_out), (train_in, train_out), (save_in, save_out), (info_in, info_out) = critic_tensors(combined)
    dp = parallel_state.get_data_parallel_world_size()
    endpoints = [
        Endpoint(INFER, service.infer, infer_in, infer_out, True, infer_mbs * dp,
                 int(ppo.get("max_queue_delay_microseconds", 0) or 0), service.validate_infer),
        Endpoint(TRAIN, service.train, train_in, train_out, False, validate=service.validate_train),
        Endpoint(SAVE, service.save, save_in, save_out, False),
        Endpoint(INFO, service.info, info_in, info_out, False),
    ]
    return InferenceServer(host=host, port=port, exit_timeout_s=int(ppo.get("exit_timeout_s", 5)), endpoints=endpoints)
