"""The one exception type meant for users: the CLI prints it as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (unknown name, missing path, malformed row, bad number).

    The message says what is wrong and what would be right, on one line.
    """
