"""The one exception type that means "the user gave bad input"."""


class UserError(Exception):
    """Bad input (flag, file, data set, path).

    Reported as a single line ``fedmpi: error: <message>`` on stderr with exit
    status 2 and no traceback. The message says what is wrong and what to do.
    """
