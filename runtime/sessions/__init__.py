"""Saved sessions: documents in JSON files or in the store, and their index in the store.

- ``service.py`` — the SessionService: save, list, patch, delete, resume, import, restore.
- ``docs.py`` — where documents live (``RuntimeConfig.session_storage``): the SessionDocs seam, the
  store implementation (``session_docs`` rows) and what both share (the index row).
- ``filedocs.py`` — the files implementation: the change protocol of files.py driven against the store.
- ``files.py`` — the session files: the document format, its checks, staging and atomic replacement.
- ``portable.py`` — export and import: a session as a portable JSON document or as Markdown.
"""

from .service import COMMIT_TIMEOUT, SessionService, upsert_index

__all__ = ["COMMIT_TIMEOUT", "SessionService", "upsert_index"]
