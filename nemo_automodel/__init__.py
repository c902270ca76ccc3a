"""Fine-tune any Hugging Face causal LM."""
