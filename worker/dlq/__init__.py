"""Dead letters: their format (`headers`), the one writer every role uses (`writer`), and the
operator's tools (`inspect`, `replay`)."""
