"""The config of a run directory written by `python -m moejax.hf import` (its config.json).

  python -m moejax.train --config configs/hf_import.py:RUN --workdir RUN \
      --config.data.source=prepared:DIR --config.train.steps=1000

Prepare the data with the model's own tokenizer (`python -m moejax.data.prepare --tokenizer
RUN/hf/tokenizer.json ...`): the embeddings only mean something with its token ids.
"""

from moejax import restore


def get_config(workdir: str):
  return restore.load_run_config(workdir)
