"""The one exception type for bad user input.

Library code raises ``UserError`` with a message that names the file, key or row and says what to do;
the CLI prints it as one line (no traceback) and exits with status 2.
"""


class UserError(ValueError):
    """Bad input from the user (file, key, row): the message says where and what to do."""
