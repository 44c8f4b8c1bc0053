"""User-facing errors: each says in one line what to fix; the command line prints it and exits 2."""


class UserError(Exception):
    """Bad input from the user (model, task, file, option). Printed without a traceback.

    Args:
        message: what is wrong and what to fix, in one line. Arguments are named in backticks as
            the library spells them (`` `tau` ``, `` `overwrite=True` ``); the command line shows
            each as its flag (``--tau``, ``--overwrite``: ``circuitfinder.cli.as_flags``).
        argument: that argument's name, when one is to blame.
    """

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


class ModelNotFound(UserError):
    """A model name, id or path that cannot be loaded here."""


class OutputExists(UserError):
    """An output folder that already holds results."""
