"""Saved sessions: JSON files in the data directory (the source of truth) and their index in the store.

- ``service.py`` — the SessionService: save, list, patch, delete, resume, import, restore.
- ``files.py`` — the session files: the document format, its checks, staging and atomic replacement.
- ``portable.py`` — export and import: a session as a portable JSON document or as Markdown.
"""

from .service import COMMIT_TIMEOUT, SessionService, upsert_index

__all__ = ["COMMIT_TIMEOUT", "SessionService", "upsert_index"]
