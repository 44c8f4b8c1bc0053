"""User-facing errors: each says in one line what to fix; the command line prints it and exits 2."""


class UserError(Exception):
    """Bad input from the user (model, task, file, option). Printed without a traceback.

    Args:
        message: what is wrong and what to fix, in one line; it names the library's argument
            (``tau``, ``n_pairs``), which the command line shows as its flag (``--tau``, ``--pairs``).
        argument: that argument's name, when one is to blame.
    """

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


class ModelNotFound(UserError):
    """A model name, id or path that cannot be loaded here."""


class OutputExists(UserError):
    """An output folder that already holds results."""
