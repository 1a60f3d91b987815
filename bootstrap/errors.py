class FatalError(Exception):
    """Retrying cannot fix this; the message is one line saying what happened and what to do."""
