"""The streaming engine: the row-loss contract (``_rowloss``), the loops over token and vocabulary
blocks and their drivers (``_stream``, ``_blocks``), and the kernels every loss shares (``_targets``,
``_logit_ce``, ``_sampler``). A loss says what it sums per row; the engine owns the loops.
"""
