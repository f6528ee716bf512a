"""Hugging Face checkpoints in and out of moejax (`python -m moejax.hf import|export`)."""
