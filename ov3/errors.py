"""The one exception type for mistakes a user can make (config, data, files, checkpoints).

The CLI prints its message without a traceback, so the message must say what is wrong
(naming the key, file or parameter) and how to fix it.
"""


class Ov3Error(Exception):
    """A user-caused error with a message that names the culprit and the fix."""
