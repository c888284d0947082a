"""What every public function goes through: the jitted implementation and the choice of path
(``_front``), option checks (``_options``), the shared input checks (``_inputs``) and the automatic
SPMD wrapper for sharded arguments (``_auto``).
"""
