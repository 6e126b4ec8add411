"""The book builds to HTML with Sphinx warnings treated as errors."""


def test_book_builds_without_warnings(built_book):
    assert (built_book / "book" / "intro.html").is_file()
    api = (built_book / "book" / "api.html").read_text()
    assert "conjugate_gradient" in api and "Δ_t" in api  # docstrings made it into the reference
