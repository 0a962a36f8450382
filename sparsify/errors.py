"""The one exception type that means "the user can fix this"; the CLI prints it as one line."""


class SparsifyError(Exception):
    """A problem with the user's input (model, recipe, data, flags), with the fix in the message."""
