"""The one exception type a user can cause. Its message names the fix; the CLI prints it alone."""


class DivgenError(ValueError):
    """Bad input from the user (path, parameter, task file). The message says how to fix it."""
