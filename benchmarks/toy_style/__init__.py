"""A CPU-sized alignment testbed: a toy image world, a tiny SD3 base trained on it, and (later) preference
training that moves the base's style rate. ``python -m benchmarks.toy_style`` runs it; see ``base`` and ``world``.
"""
