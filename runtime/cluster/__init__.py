"""Several hosts on one PostgreSQL (issue 15): the parts of the runtime that only exist in a cluster.

- ``leases.py`` — one owner per thread: the lease SQL on ``thread_leases`` (database clock only) and the
  ``LeaseKeeper`` of a host (acquire before an engine starts, renew every ttl/3, retire engines whose
  lease is not known valid, sweep expired owners' running turns).
- ``listener.py`` — one LISTEN connection per host: a notification for a thread wakes this host's
  event streams of that thread, which re-read the events table after their position.

On SQLite none of this runs: there is one host and no lease.
"""
