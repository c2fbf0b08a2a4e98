"""The exception and warning types of the data layer."""

from ..model.errors import UserError


class DataError(UserError):
    """Bad or missing input data: a missing path, a glob that matches nothing, an empty
    corpus or split, an unreachable hub, a checkpoint whose data position does not fit.

    The message is short and names the source and what was expected, so the command line
    can print it as-is and exit non-zero without a traceback.
    """


class DataWarning(UserWarning):
    """Recoverable problems in the input (undecodable bytes, skipped jsonl lines): the run
    goes on, the warning says which file, which lines and how many."""
