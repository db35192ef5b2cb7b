//! The schema files, embedded, and their rendering for a chosen table name.

use crate::TableName;

/// One schema step, as written in `migrations/<backend>/`.
pub(crate) struct Migration {
    /// Applied in increasing order; recorded in the history table.
    pub version: i64,
    /// The file name, for the history and the logs.
    pub name: &'static str,
    /// The SQL, written for the default table name `outbox`.
    pub sql: &'static str,
}

/// The history table of `outbox migrate`: named after the outbox table, so it cannot clash
/// with the host service's own `_sqlx_migrations` (or another outbox table's history).
pub(crate) fn history_table(table: &TableName) -> String {
    format!("{table}_schema_history")
}

/// The SQL with every word that starts with `outbox` (the table, its indexes, trigger,
/// function and notification channel) renamed after `table`.
pub(crate) fn render(sql: &str, table: &TableName) -> String {
    const WORD: &str = "outbox";
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(at) = rest.find(WORD) {
        let starts_word = rest[..at]
            .chars()
            .next_back()
            .or_else(|| out.chars().next_back())
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        out.push_str(&rest[..at]);
        out.push_str(if starts_word { table.as_str() } else { WORD });
        rest = &rest[at + WORD.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_only_words_starting_with_outbox() {
        let t = TableName::new("orders_box").unwrap();
        let sql = "CREATE TABLE outbox (x); CREATE INDEX outbox_idx ON outbox (x); \
                   SELECT pg_notify('outbox', ''); -- my_outbox stays";
        assert_eq!(
            render(sql, &t),
            "CREATE TABLE orders_box (x); CREATE INDEX orders_box_idx ON orders_box (x); \
             SELECT pg_notify('orders_box', ''); -- my_outbox stays"
        );
    }
}
