#!/usr/bin/env bash
# Checks, on 1,000,000 audit events, that the statements reading the audit
# trail go through their indexes: a user's page of ListEvents must not scan
# usage_events, under a generic plan (what a long-lived prepared statement
# ends up with) as well as a custom one, and the summary's refusal count must
# use the partial index of refusals. Prints each plan with its timings and
# buffer counts, and exits non-zero when a plan scans the table.
#
# Usage: scripts/explain_events.sh [postgres URL of a maintenance database]
# Needs psql. Creates and finally drops the database usage_explain.
set -euo pipefail

admin_url="${1:-${USAGE_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}}"
db=usage_explain
url="${admin_url%/*}/$db"
root="$(cd "$(dirname "$0")/.." && pwd)"
events=1000000
users=10000

psql -q "$admin_url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
trap 'psql -q "$admin_url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT

for migration in "$root"/migrations/V*__*.sql; do
    psql -q -v ON_ERROR_STOP=1 "$url" -f "$migration"
done

echo "generating $events events over $users users"
psql -q -v ON_ERROR_STOP=1 "$url" <<SQL
INSERT INTO usage_events (occurred_at, user_id, feature_name, product_id, action,
                          delta, usage_before, usage_after)
SELECT now() - make_interval(secs => ($events - i) * 0.5),
       'user-' || lpad((i % $users)::text, 5, '0'), 'product_slot', 'p' || i,
       CASE WHEN i % 10 = 0 THEN 'denied' ELSE 'reserve' END,
       CASE WHEN i % 10 = 0 THEN 0 ELSE 1 END, 0,
       CASE WHEN i % 10 = 0 THEN 0 ELSE 1 END
  FROM generate_series(1, $events) AS i;
ANALYZE usage_events;
SQL

user_page="$(cat "$root/src/store/sql/list_events_user.sql")"
refusals="$(cat "$root/src/store/sql/summary_refusals.sql")"
plans="$(psql -v ON_ERROR_STOP=1 "$url" <<SQL
PREPARE user_page(text, text, text[], timestamptz, timestamptz, bigint, bigint) AS
$user_page;
PREPARE refusals(text) AS
$refusals;

\echo '== user page, first page, generic plan'
SET plan_cache_mode = force_generic_plan;
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF)
EXECUTE user_page('user-00042', 'product_slot', NULL, NULL, NULL, 9223372036854775807, 100);
\echo '== user page, denied only, since 3 days ago, after id 900000, generic plan'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF)
EXECUTE user_page('user-00040', 'product_slot', ARRAY['denied'], now() - interval '3 days',
                  NULL, 900000, 100);
\echo '== user page, first page, custom plan'
SET plan_cache_mode = force_custom_plan;
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF)
EXECUTE user_page('user-00042', 'product_slot', NULL, NULL, NULL, 9223372036854775807, 100);
\echo '== summary refusals, 24 hours and 7 days'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE refusals('product_slot');
SQL
)"
echo "$plans"

if grep -q "Seq Scan on usage_events" <<<"$plans"; then
    echo "FAIL: a plan scans usage_events" >&2
    exit 1
fi
echo "OK: no plan scans usage_events"
