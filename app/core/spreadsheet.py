"""CSV cells that a spreadsheet shows as text, never runs as a formula (CSV injection)."""

from __future__ import annotations

# OWASP's list of characters a spreadsheet may read as the start of a formula, with their
# fullwidth forms (some spreadsheets fold those to ASCII).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def inert_cell(value: str | int | float | None) -> str | int | float:
    """A CSV cell: text that could start a formula gets a leading apostrophe (a spreadsheet
    shows it as typed); numbers are written as they are, so -2 stays a number."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return f"'{value}"
    return value
