"""The one exception type that means "the user gave bad input", and how its text is cleaned."""

import re


class UserError(Exception):
    """Bad input (flag, file, data set, path).

    Reported as a single line ``fedmpi: error: <message>`` on stderr with exit
    status 2 and no traceback. The message says what is wrong and what to do.
    """


# C0 and C1 control characters, DEL, and Unicode's invisible direction marks
# and overrides: text from a file (names, settings) could otherwise move the
# cursor, clear a terminal or reorder what a reader sees.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def printable(text, keep: str = "") -> str:
    """text (str() of it) without control characters, except those in `keep`."""
    text = str(text)
    if keep:
        return "".join(c for c in text if c in keep or not _CONTROL.match(c))
    return _CONTROL.sub("", text)
