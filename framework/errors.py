"""Errors a user can cause and fix: one message that names the file or config key and what to do."""


class UserError(Exception):
    """Bad input (a path, a file format, a config value); the message says how to fix it."""
