"""The errors lqf-hub raises on purpose. ``except LQFError`` catches all of them.

Each also derives from the built-in error it refines (``ValueError`` for bad input or files,
``RuntimeError`` / ``FloatingPointError`` for numerical failures), so existing ``except`` clauses keep working.
"""


class LQFError(Exception):
    """Base class of every error lqf-hub raises on purpose."""


class CheckpointError(LQFError, ValueError):
    """A checkpoint that cannot be used: missing, corrupt, incompatible, or from another run. Nothing was loaded."""


class TrainingDiverged(LQFError, RuntimeError):
    """The loss became non-finite or exploded; the last good checkpoint is kept."""


class CurvatureError(LQFError, FloatingPointError):
    """A curvature factor or a preconditioned product is not finite; the message names the layer."""


class DataUnreachable(LQFError, OSError):
    """A dataset a checkpoint records (the images it was solved on) cannot be loaded from where it was recorded."""
