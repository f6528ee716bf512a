"""MoE-X on chess (Yang et al. 2025): the experiment of docs/MOEX.md as a project.

Importing this package registers the "chess:" data source; its recipes set
`extensions = "moejax.proj.moex"` so that every command that reads such a run imports it again.
Modules: chess (games, the character vocabulary), chess_board (board-state labels),
data_source, wide (the gated wide hidden code z_hat of an MoE layer), board_metrics (BSP
coverage, board reconstruction), interpret (`python -m moejax.proj.moex.interpret`), recipes,
table (the results table), experiment.sh / language.sh (the experiment's runs).
"""

from moejax.data import pipeline
from moejax.proj.moex import data_source

pipeline.register_source("chess:", data_source.SOURCE_KIND)
