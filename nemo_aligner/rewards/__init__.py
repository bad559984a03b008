"""Rewards for online RL: rule-based functions named in a config, and their loader."""
