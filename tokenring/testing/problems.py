"""Random attention problems and how to judge an answer against float64.

They live in `tokenring.tools.problems`, since the tools use them too; this
module keeps the names the conformance suite and third-party plugins import.
"""

from tokenring.tools.problems import (  # noqa: F401  (re-exported)
    DTYPES,
    GRAD_TOLERANCE,
    GRADIENTS,
    TOLERANCE,
    Problem,
    relative_error,
)

__all__ = ["DTYPES", "GRAD_TOLERANCE", "GRADIENTS", "TOLERANCE", "Problem", "relative_error"]
