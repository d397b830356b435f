"""Reinforcement-learning fine-tuning: rewards, a compact PPO, and the risk-averse (CVaR) filter."""
