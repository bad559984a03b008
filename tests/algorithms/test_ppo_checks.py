"""What the PPO actor refuses at start, before anything is trained: a critic with another
tokenizer, a rollout micro-batch that does not fill the critic's ranks, and bad settings."""

import pytest
from omegaconf import OmegaConf

from nemo_aligner.algorithms import ppo
from nemo_aligner.data.tokenizers import load_tokenizer
from nemo_aligner.servers.critic import tokenizer_fingerprint
from nemo_aligner.utils.setup import BUNDLED_TOKENIZER


class FakeCritic:
    def __init__(self, fingerprint, max_batch_size=4):
        self.fingerprint, self.max_batch_size = fingerprint, max_batch_size
        self.where = "127.0.0.1:5556 (endpoint 'critic_info')"
        self.closed = False

    def vocabulary(self):
        return self.fingerprint

    def close(self):
        self.closed = True


def config(**ppo_overrides):
    cfg = OmegaConf.load("conf/gpt_ppo_actor.yaml")
    for key, value in ppo_overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.fixture
def tokenizer():
    return load_tokenizer(str(BUNDLED_TOKENIZER))


def sources(cfg, tokenizer, critic, monkeypatch):
    monkeypatch.setattr(ppo, "_critic_client", lambda critic_cfg, timeouts: critic)
    return ppo.ppo_sources(cfg, tokenizer, ppo.PPOSettings.from_cfg(cfg))


def test_a_critic_with_the_same_tokenizer_is_accepted(tokenizer, monkeypatch):
    critic = FakeCritic(tokenizer_fingerprint(tokenizer))
    reward, values, extra = sources(config(), tokenizer, critic, monkeypatch)
    assert reward is None and extra["critic"] is critic and values.client is critic  # combined: rewards come with values


def test_another_tokenizer_is_refused(tokenizer, monkeypatch):
    vocab, probe = tokenizer_fingerprint(tokenizer)
    for theirs in ((vocab + 1, probe), (vocab, probe[::-1])):
        critic = FakeCritic(theirs)
        with pytest.raises(ppo.CriticMismatchError, match="127.0.0.1:5556.*another tokenizer"):
            sources(config(), tokenizer, critic, monkeypatch)
        assert critic.closed


def test_rollout_micro_batch_must_fill_the_critics_ranks(tokenizer, monkeypatch):
    critic = FakeCritic(tokenizer_fingerprint(tokenizer), max_batch_size=6)  # e.g. 3 per rank x DP 2
    with pytest.raises(ppo.CriticMismatchError, match=r"rollout_micro_batch_size=16 is not a multiple .*\(6\)"):
        sources(config(), tokenizer, critic, monkeypatch)
    sources(config(**{"model.ppo.rollout_micro_batch_size": 12}), tokenizer, FakeCritic(critic.fingerprint, 6), monkeypatch)


def test_rule_reward_needs_a_critic_for_values_only(tokenizer, monkeypatch):
    cfg = config(**{"reward.function": "nemo_aligner.rewards.quickstart:exact_match"})
    with pytest.raises(ValueError, match="combine_rm_and_critic_server=false"):
        sources(cfg, tokenizer, FakeCritic(tokenizer_fingerprint(tokenizer)), monkeypatch)
    cfg.remote_critic_rm.combine_rm_and_critic_server = False
    reward, _, _ = sources(cfg, tokenizer, FakeCritic(tokenizer_fingerprint(tokenizer)), monkeypatch)
    assert reward.spec.endswith("exact_match")


@pytest.mark.parametrize("key,value,needle", [
    ("model.ppo.ratio_eps", 0.0, "model.ppo.ratio_eps=0.0"),
    ("model.ppo.entropy_bonus", -1.0, "model.ppo.entropy_bonus"),
    ("trainer.ppo.gae_lambda", 1.5, "trainer.ppo.gae_lambda"),
    ("trainer.ppo.discount_factor", -0.1, "trainer.ppo.discount_factor"),
    ("trainer.ppo.critic_warmup_steps", -1, "trainer.ppo.critic_warmup_steps"),
])
def test_bad_settings_name_their_key(key, value, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        ppo.PPOSettings.from_cfg(config(**{key: value}))
