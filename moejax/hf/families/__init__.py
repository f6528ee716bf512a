"""The Hugging Face model families the converter knows, by `model_type` (see base.py)."""

from __future__ import annotations

from moejax.hf.families import base, deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe

FAMILIES = {
  module.MODEL_TYPE: module for module in (mixtral, qwen3_moe, olmoe, qwen2_moe, deepseek_v3)
}


def get(model_type: str):
  if model_type not in FAMILIES:
    raise base.UnsupportedError(
      f"model_type={model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
    )
  return FAMILIES[model_type]
