"""The app of docs/alembic.md (``main.py`` is written out from the page by tests/test_alembic.py)."""
