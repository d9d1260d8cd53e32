//! Git webhook deliveries a project acted on (migration 0003): a delivery
//! seen before builds nothing. In the store, not in memory, so every
//! control-plane node sharing the database agrees.

use sqlx::AnyConnection;

use super::{Result, col, conflict_on_unique};

/// How long a delivery is remembered. A forge redelivers within hours; an
/// older replay is still stopped by the build's branch-head check.
pub const KEEP_MS: i64 = 7 * 24 * 3600 * 1000;
/// Deliveries remembered per project at most (each one made a deployment).
pub const KEEP_PER_PROJECT: i64 = 1000;

/// A delivery seen before: when, and the deployment it made.
#[derive(Debug, Clone)]
pub struct Seen {
    pub received_at_ms: i64,
    pub deployment_id: String,
}

/// The first of `keys` this project has acted on, if any.
pub async fn seen(conn: &mut AnyConnection, project_id: &str, keys: &[String]) -> Result<Option<Seen>> {
    for key in keys {
        let row = sqlx::query(
            "SELECT received_at_ms, deployment_id FROM webhook_deliveries WHERE project_id = $1 AND delivery_key = $2",
        )
        .bind(project_id)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(row) = row {
            return Ok(Some(Seen {
                received_at_ms: col(&row, "received_at_ms")?,
                deployment_id: col(&row, "deployment_id")?,
            }));
        }
    }
    Ok(None)
}

/// Remembers a delivery under each of `keys` (a key taken by a delivery
/// racing this one is a [`super::StoreError::Conflict`]), and forgets the
/// project's deliveries past the bounds.
pub async fn record(
    conn: &mut AnyConnection,
    project_id: &str,
    keys: &[String],
    deployment_id: &str,
    now_ms: i64,
) -> Result<()> {
    for key in keys {
        sqlx::query(
            "INSERT INTO webhook_deliveries (project_id, delivery_key, received_at_ms, deployment_id) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(project_id)
        .bind(key)
        .bind(now_ms)
        .bind(deployment_id)
        .execute(&mut *conn)
        .await
        .map_err(conflict_on_unique(|| "this delivery was received just now".to_owned()))?;
    }
    prune(conn, project_id, now_ms - KEEP_MS, KEEP_PER_PROJECT * 2).await
}

/// Forgets the project's keys received before `before_ms`, and all but its
/// newest `keep_keys`.
async fn prune(conn: &mut AnyConnection, project_id: &str, before_ms: i64, keep_keys: i64) -> Result<()> {
    sqlx::query("DELETE FROM webhook_deliveries WHERE project_id = $1 AND received_at_ms < $2")
        .bind(project_id)
        .bind(before_ms)
        .execute(&mut *conn)
        .await?;
    // Keys, not deliveries: each delivery has one or two.
    sqlx::query(
        "DELETE FROM webhook_deliveries WHERE project_id = $1 AND delivery_key NOT IN \
         (SELECT delivery_key FROM webhook_deliveries WHERE project_id = $1 \
          ORDER BY received_at_ms DESC, delivery_key LIMIT $2)",
    )
    .bind(project_id)
    .bind(keep_keys)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[tokio::test]
    async fn remembers_and_forgets_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(None, &dir.path().join("test.db")).await.unwrap();
        let mut tx = store.write().await.unwrap();
        crate::store::projects::insert(&mut tx, "p1", &crate::validate::project_name("app").unwrap(), 0).await.unwrap();
        let keys = |n: i64| vec![format!("body:{n}"), format!("id:{n}")];
        record(&mut tx, "p1", &keys(1), "d1", 1_000).await.unwrap();
        assert_eq!(seen(&mut tx, "p1", &keys(1)).await.unwrap().unwrap().deployment_id, "d1");
        assert!(seen(&mut tx, "p1", &[keys(1)[1].clone()]).await.unwrap().is_some(), "by delivery id alone");
        assert!(seen(&mut tx, "p1", &keys(2)).await.unwrap().is_none());
        // The same key again is a conflict (two nodes, one delivery).
        let again = record(&mut tx, "p1", &keys(1), "d9", 1_001).await;
        assert!(matches!(again, Err(crate::store::StoreError::Conflict(_))), "{again:?}");
        drop(tx);

        // Older than the window: forgotten when the next one is recorded.
        let mut tx = store.write().await.unwrap();
        crate::store::projects::insert(&mut tx, "p1", &crate::validate::project_name("app").unwrap(), 0).await.unwrap();
        record(&mut tx, "p1", &keys(1), "d1", 1_000).await.unwrap();
        record(&mut tx, "p1", &keys(2), "d2", 1_000 + KEEP_MS + 1).await.unwrap();
        assert!(seen(&mut tx, "p1", &keys(1)).await.unwrap().is_none(), "kept past {KEEP_MS} ms");
        assert!(seen(&mut tx, "p1", &keys(2)).await.unwrap().is_some());
        // Past the count: the oldest go first (body:2 and id:2 are newest).
        for n in 3..=6 {
            sqlx::query("INSERT INTO webhook_deliveries VALUES ($1, $2, $3, $4)")
                .bind("p1")
                .bind(format!("body:{n}"))
                .bind(KEEP_MS + n)
                .bind("d")
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        prune(&mut tx, "p1", 0, 3).await.unwrap();
        let left: Vec<String> = sqlx::query_scalar("SELECT delivery_key FROM webhook_deliveries ORDER BY delivery_key")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        assert_eq!(left, ["body:2", "body:6", "id:2"]);
    }
}
