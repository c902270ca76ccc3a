"""Model components: the Hugging Face causal-LM wrapper, its tokenizer and loss."""

from nemo_automodel.models.hf_causal_lm import HFAutoModelForCausalLM
from nemo_automodel.models.loss import masked_cross_entropy

__all__ = ["HFAutoModelForCausalLM", "masked_cross_entropy"]
