"""Exceptions raised for bad user input.

Every message names the offending file, key or case and says what to do about it, so that a user can fix
the input without reading the code.
"""

from __future__ import annotations


class GuideGenInputError(ValueError):
    """Bad input supplied by the user (file, record, configuration value).

    Subclasses :class:`ValueError` so generic callers that already catch ``ValueError`` keep working.
    """


class CaseError(GuideGenInputError):
    """A problem confined to one case of a data set; other cases can still be processed.

    Args:
        case_id: the case the problem belongs to.
        message: what is wrong and how to fix it.
    """

    def __init__(self, case_id: str, message: str) -> None:
        self.case_id = case_id
        self.reason = message
        super().__init__(f"case '{case_id}': {message}")
