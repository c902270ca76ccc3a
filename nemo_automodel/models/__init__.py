"""Model components: the Hugging Face causal-LM and vision-language wrappers, tokenizer, processor and loss."""

from nemo_automodel.models.chunked_ce import linear_cross_entropy
from nemo_automodel.models.hf_causal_lm import HFAutoModelForCausalLM
from nemo_automodel.models.hf_vlm import HFAutoModelForImageTextToText
from nemo_automodel.models.loss import masked_cross_entropy

__all__ = ["HFAutoModelForCausalLM", "HFAutoModelForImageTextToText", "linear_cross_entropy", "masked_cross_entropy"]
