"""CSV fields quoted exactly as Go's encoding/csv quotes them: both of csvtool's schemas print them."""
from __future__ import annotations

_GO_SPACES = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    chr(c) for c in range(0x2000, 0x200B)
)


def go_csv_field(field: str) -> str:
    """Quote a field exactly when Go's encoding/csv would (comma, quote, CR, LF, leading space, ``\\.``)."""
    if field == "" or not (
        field == r"\." or "," in field or '"' in field or "\r" in field or "\n" in field or field[0] in _GO_SPACES
    ):
        return field
    return '"' + field.replace('"', '""') + '"'
