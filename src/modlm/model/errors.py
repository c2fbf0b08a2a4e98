"""``UserError``: the one exception type that means "fix your input".

Every layer raises it (or a subclass: ``DataError``, ``CheckpointError``) for a problem the user can
fix: a bad config value, missing or empty data, a checkpoint of another shape, a prompt longer than
the model's context. Every command line catches it and prints its first line with exit status 2;
any other exception is a bug and shows its traceback. It lives at the bottom of the package, in the
model folder, because the model raises it too and that folder must stand alone as an export's
remote code.
"""


class UserError(ValueError):
    """Input the user has to fix; the message names the value and what is expected."""
