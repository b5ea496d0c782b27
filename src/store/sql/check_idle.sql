-- Sessions of this database left inside an open transaction for at least $1
-- seconds. The service sends every change as one statement outside any
-- explicit transaction, so it never leaves one; a row here is a session that
-- holds locks (and may block users' calls) while doing nothing.
--
-- The one exception is a backfill or a pass over every user, which keeps a
-- transaction open holding nothing but its advisory lock (one of the keys in
-- $2) so that no other such job starts: it blocks no call. A bigint advisory
-- key shows in pg_locks split in two: its high half as classid, its low half
-- as objid.
SELECT a.pid, coalesce(a.application_name, '') AS application_name, a.state,
       extract(epoch FROM now() - a.state_change)::float8 AS idle_seconds,
       left(a.query, 200) AS query
  FROM pg_stat_activity AS a
 WHERE a.datname = current_database()
   AND a.state IN ('idle in transaction', 'idle in transaction (aborted)')
   AND a.pid <> pg_backend_pid()
   AND now() - a.state_change >= make_interval(secs => $1::float8)
   AND NOT EXISTS (
         SELECT FROM pg_locks AS l
          WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.objsubid = 1
            AND (l.classid::bigint << 32 | l.objid::bigint) = ANY ($2::bigint[]))
 ORDER BY a.pid
