"""InstructGPT alignment: SFT (step 1), reward model (step 2), PPO against it (step 3, gptlab.align.ppo),
and DPO. Data loaders in gptlab.align.data, loss functions in gptlab.align.losses."""

from gptlab.align.data import LoadStats, Message, Preference, load_preferences, load_prompts, load_sft_examples
from gptlab.align.dpo import dpo
from gptlab.align.reward import RewardModel, token_scores, train_reward
from gptlab.align.sft import sft

__all__ = ["Message", "Preference", "LoadStats", "load_sft_examples", "load_preferences", "load_prompts", "sft",
           "train_reward", "RewardModel", "token_scores", "dpo"]
