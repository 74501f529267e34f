"""Caption text as it is stored: the errors every caption reader and writer raises."""

from __future__ import annotations


class CaptionError(ValueError):
    """A caption operation that cannot go ahead, with what is wrong and what to do."""
