"""Research projects built on moejax: each one a folder that the core never imports.

A project reaches the core only through its extension points (data source kinds, router
families, the MoE layer's `route` / `kept_pairs`); a config names it in `extensions` so that
evaluation and generation import it again.
"""
