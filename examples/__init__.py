"""The demo app: a small CRUD API on users and items (sync in ``app.py``, async in ``async_app.py``)."""
