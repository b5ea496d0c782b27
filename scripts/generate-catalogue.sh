#!/usr/bin/env bash
# Creates the catalogue's products table in DATABASE_URL (if missing) and fills
# it with USERS users and PRODUCTS products (see generate_catalogue.sql).
#
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench \
#     scripts/generate-catalogue.sh 100000 1000000
set -euo pipefail
cd "$(dirname "$0")/.."
users=${1:-100000}
products=${2:-1000000}
url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}

exists=$(psql "$url" -tAc "SELECT to_regclass('products') IS NOT NULL")
if [ "$exists" != t ]; then
    psql "$url" -v ON_ERROR_STOP=1 -q -f tests/fixtures/catalogue.sql
fi
psql "$url" -v ON_ERROR_STOP=1 -q \
    -c "SET catalogue.users = $users" \
    -c "SET catalogue.products = $products" \
    -f scripts/generate_catalogue.sql
psql "$url" -tAc "SELECT format('%s products (%s live) of %s users',
                         count(*), count(*) FILTER (WHERE deleted_at IS NULL),
                         count(DISTINCT user_id)) FROM products"
