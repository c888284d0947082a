"""The public losses, one module per family. No module here imports another, except ``_sharded``,
whose wrappers build the ``shard_map`` around the cross-entropies.
"""
