"""The network: its modules, the reversible backward, the variants as data, parameter groups.

Nothing in ``revcol.core`` imports the rest of revcol: checkpoints, weights and the plug-ins build on it.
"""
