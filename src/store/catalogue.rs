//! The product catalogue: a table this service reads but does not own.
//!
//! Its name, the three columns that matter and the feature its products count
//! are configuration. They are checked once against `information_schema`, and
//! only then spliced into the statements, each identifier double-quoted with
//! embedded quotes doubled: a name that is not a real column never reaches a
//! statement, and a real one cannot change what the statement means.

use std::fmt;

use tokio_postgres::types::Type;

use super::{sql, Store, StoreError};

/// Where the catalogue keeps its products.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogueLayout {
    /// The schema of the table; `None` for the first schema of the search path.
    pub schema: Option<String>,
    /// The table (or view) of products.
    pub table: String,
    /// The product id column, of any type; compared as text.
    pub id_column: String,
    /// The owning user's id column, of any type; compared as text.
    pub user_column: String,
    /// The column that is NULL while a product is live.
    pub deleted_column: String,
    /// The feature each live product holds a slot of.
    pub feature: String,
}

impl Default for CatalogueLayout {
    /// `products(id, user_id, deleted_at)` counting `product_slot`.
    fn default() -> Self {
        Self {
            schema: None,
            table: "products".into(),
            id_column: "id".into(),
            user_column: "user_id".into(),
            deleted_column: "deleted_at".into(),
            feature: crate::usage::DEFAULT_FEATURE.into(),
        }
    }
}

/// Why a layout was refused at start-up.
#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    /// No table of that name is visible.
    #[error(
        "no products table {table:?} in schema {schema:?}; point --products-table \
         (and --products-schema) at the catalogue's table, or pass --no-catalogue"
    )]
    TableNotFound {
        /// The schema searched.
        schema: String,
        /// The table asked for.
        table: String,
    },

    /// The table lacks a configured column.
    #[error(
        "table {table} has no column {column:?} (set by {flag}); its columns are: {available}"
    )]
    ColumnNotFound {
        /// The table, schema-qualified.
        table: String,
        /// The column asked for.
        column: String,
        /// The flag that names it.
        flag: &'static str,
        /// The columns the table has.
        available: String,
    },

    /// The configured feature has no row in `features`.
    #[error("unknown feature {0:?} (set by --products-feature)")]
    UnknownFeature(String),

    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<tokio_postgres::Error> for CatalogueError {
    fn from(err: tokio_postgres::Error) -> Self {
        Self::Store(err.into())
    }
}

impl From<deadpool_postgres::PoolError> for CatalogueError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        Self::Store(err.into())
    }
}

/// A layout checked against the database, with its statements built.
#[derive(Debug, Clone)]
pub struct Catalogue {
    feature: String,
    name: String,
    live_products: String,
    users_after: String,
    count_users: String,
}

impl Catalogue {
    /// Checks `layout` against the database: the table exists, has the three
    /// columns, and the feature is known. Fails with a message naming the
    /// flag to fix.
    pub async fn validate(store: &Store, layout: &CatalogueLayout) -> Result<Self, CatalogueError> {
        let client = store.pool().get().await?;
        let rows = store
            .query(
                &client,
                sql::CATALOGUE_COLUMNS,
                &[(&layout.schema, Type::TEXT), (&layout.table, Type::TEXT)],
            )
            .await?;
        let Some(first) = rows.first() else {
            let schema: String = match &layout.schema {
                Some(schema) => schema.clone(),
                None => store
                    .query_one(&client, "SELECT current_schema()::text", &[])
                    .await?
                    .try_get(0)
                    .map_err(StoreError::from)?,
            };
            return Err(CatalogueError::TableNotFound {
                schema,
                table: layout.table.clone(),
            });
        };
        let schema: String = first.try_get("table_schema").map_err(StoreError::from)?;
        let columns: Vec<String> = rows
            .iter()
            .map(|row| row.try_get("column_name"))
            .collect::<Result<_, _>>()
            .map_err(StoreError::from)?;

        let table = format!("{}.{}", quote_ident(&schema), quote_ident(&layout.table));
        for (column, flag) in [
            (&layout.id_column, "--products-id-column"),
            (&layout.user_column, "--products-user-column"),
            (&layout.deleted_column, "--products-deleted-column"),
        ] {
            if !columns.contains(column) {
                return Err(CatalogueError::ColumnNotFound {
                    table: table.clone(),
                    column: column.clone(),
                    flag,
                    available: columns.join(", "),
                });
            }
        }

        let known: bool = store
            .query_one(
                &client,
                sql::FEATURE_EXISTS,
                &[(&layout.feature, Type::TEXT)],
            )
            .await?
            .try_get(0)
            .map_err(StoreError::from)?;
        if !known {
            return Err(CatalogueError::UnknownFeature(layout.feature.clone()));
        }

        let fill = |template: &str| {
            template
                .replace("{products}", &table)
                .replace("{id}", &quote_ident(&layout.id_column))
                .replace("{user_id}", &quote_ident(&layout.user_column))
                .replace("{deleted_at}", &quote_ident(&layout.deleted_column))
        };
        Ok(Self {
            feature: layout.feature.clone(),
            live_products: fill(sql::CATALOGUE_LIVE_PRODUCTS),
            users_after: fill(sql::CATALOGUE_USERS_AFTER),
            count_users: fill(sql::CATALOGUE_COUNT_USERS),
            name: table,
        })
    }

    /// The feature the catalogue's products count.
    pub fn feature(&self) -> &str {
        &self.feature
    }

    /// `sql/catalogue_live_products.sql` for this layout: `$1` users.
    pub(crate) fn live_products_sql(&self) -> &str {
        &self.live_products
    }

    /// `sql/catalogue_users_after.sql` for this layout: `$1` feature, `$2`
    /// last user seen, `$3` page size.
    pub(crate) fn users_after_sql(&self) -> &str {
        &self.users_after
    }

    /// `sql/catalogue_count_users.sql` for this layout.
    pub(crate) fn count_users_sql(&self) -> &str {
        &self.count_users
    }
}

impl fmt::Display for Catalogue {
    /// The quoted, schema-qualified table, as the statements name it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// `name` as a PostgreSQL quoted identifier: wrapped in double quotes, with
/// every double quote inside doubled, as `quote_ident` does. Whatever `name`
/// holds, the result is one identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::quote_ident;

    /// Quotes are doubled, so no name can close the identifier early.
    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("products"), "\"products\"");
        assert_eq!(quote_ident("Owner Id"), "\"Owner Id\"");
        assert_eq!(
            quote_ident("x\"; DROP TABLE slots; --"),
            "\"x\"\"; DROP TABLE slots; --\""
        );
    }
}
