-- The columns of the catalogue's table $2 in schema $1 (NULL: the first schema
-- of the search path), as the database names them. Used once at start-up to
-- check the configured layout before any statement names it.
SELECT c.table_schema::text AS table_schema,
       c.column_name::text  AS column_name,
       c.data_type::text    AS data_type
  FROM information_schema.columns AS c
 WHERE c.table_schema = coalesce($1::text, current_schema())
   AND c.table_name = $2::text
 ORDER BY c.ordinal_position
