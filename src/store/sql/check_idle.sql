-- Sessions of this database left inside an open transaction for at least $1
-- seconds. The service sends every change as one statement outside any
-- explicit transaction, so it never leaves one; a row here is a session that
-- holds locks (and may block users' calls) while doing nothing.
SELECT pid, coalesce(application_name, '') AS application_name, state,
       extract(epoch FROM now() - state_change)::float8 AS idle_seconds,
       left(query, 200) AS query
  FROM pg_stat_activity
 WHERE datname = current_database()
   AND state IN ('idle in transaction', 'idle in transaction (aborted)')
   AND pid <> pg_backend_pid()
   AND now() - state_change >= make_interval(secs => $1::float8)
 ORDER BY pid
