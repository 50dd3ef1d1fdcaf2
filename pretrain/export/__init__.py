"""The export stage: a run's model as a Hugging Face ``BloomForCausalLM`` directory ``<run_dir>/hf/``."""
