"""Persian-aware text normalisation for search and duplicate detection.

Names and addresses are stored exactly as given; only the search and match keys are
normalised, so a query typed with Arabic letters (ي ك ة), Persian or Arabic-Indic digits,
zero-width non-joiners or diacritics finds the record however it was written.
"""

from __future__ import annotations

import re
import unicodedata

_TRANSLATE = str.maketrans(
    {
        # Arabic letter variants -> Persian
        "ي": "ی",  # U+064A ARABIC YEH -> U+06CC FARSI YEH
        "ى": "ی",  # U+0649 ALEF MAKSURA
        "ئ": "ی",  # U+0626 YEH WITH HAMZA ABOVE
        "ك": "ک",  # U+0643 ARABIC KAF -> U+06A9 KEHEH
        "ة": "ه",  # U+0629 TEH MARBUTA
        "ۀ": "ه",  # U+06C0 HEH WITH YEH ABOVE
        "أ": "ا",
        "إ": "ا",
        "آ": "ا",
        "ٱ": "ا",
        "ؤ": "و",
        # Persian (U+06F0..) and Arabic-Indic (U+0660..) digits -> ASCII
        **{chr(0x06F0 + i): str(i) for i in range(10)},
        **{chr(0x0660 + i): str(i) for i in range(10)},
        # zero-width non-joiner / joiner, BOM, tatweel -> space or nothing
        "\u200c": " ",
        "\u200d": "",
        "\ufeff": "",
        "\u0640": "",
    }
)
# Arabic diacritics (harakat, tanwin, shadda, sukun, superscript alef)
_DIACRITICS = re.compile("[\u064b-\u065f\u0670\u06d6-\u06ed]")
_SPACES = re.compile(r"\s+")


def normalize(text: str | None) -> str:
    """The search key of a text: NFKC, Persian letter/digit unification, no diacritics or
    zero-width characters, lower case, single spaces."""
    if not text:
        return ""
    t = unicodedata.normalize("NFKC", text).translate(_TRANSLATE)
    t = _DIACRITICS.sub("", t)
    return _SPACES.sub(" ", t).strip().lower()


def digits_only(text: str | None) -> str:
    """ASCII digits of a text, whatever script they were typed in."""
    return "".join(ch for ch in normalize(text) if ch.isdigit())
