"""Errors a user can cause and fix: one message that names the file or config key and what to do."""

# How torch's DataLoader re-creates a worker's exception in the main process: from one string, "Caught UserError in
# DataLoader worker process N.\nOriginal Traceback (most recent call last): ...\nframework.errors.UserError: <message>".
WORKER_PREFIX = "Caught UserError in DataLoader worker"
WORKER_MESSAGE = "\nframework.errors.UserError: "


class UserError(Exception):
    """Bad input (a path, a file format, a config value); the message says how to fix it."""

    def __init__(self, message: str = ""):
        if message.startswith(WORKER_PREFIX) and WORKER_MESSAGE in message:  # a bad image met in a worker, say
            message = message.rsplit(WORKER_MESSAGE, 1)[1].rstrip("\n")
        super().__init__(message)
