"""A CPU-sized alignment testbed: a tiny SD3 base trained on the toy image world, and preference training that
moves the base's style rate. ``python -m benchmarks.toy_style`` runs it; the world's captions, the base and its
measurements live in the package (:mod:`pipelines.toy_prompts`, :mod:`pipelines.toy_base`,
:mod:`pipelines.toy_sampling`).
"""
