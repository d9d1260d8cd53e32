//! The store's hot queries use indexes (issue 20): every query on a path that
//! must cost the same at any size (`isocloud_controlplane::hot_queries`, the
//! store's own SQL with sample arguments) is explained by the database, and
//! no plan scans a whole table — on SQLite (`EXPLAIN QUERY PLAN`: no `SCAN`
//! step) and on PostgreSQL (`EXPLAIN` with sequential scans priced out, so a
//! plan falls back to one only when no index serves: no `Seq Scan`).

use isocloud_controlplane::{StoreArg, StoreSql, hot_queries};
use sqlx::{Connection, Row};

use crate::backend_tests;
use crate::support::{Backend, TestServer};

backend_tests!(hot_queries_use_indexes_not_table_scans);

fn explained(prefix: &str, sql: &StoreSql) -> StoreSql {
    StoreSql { text: format!("{prefix}{}", sql.text), args: sql.args.clone() }
}

async fn hot_queries_use_indexes_not_table_scans(backend: Backend) {
    let s = TestServer::start(backend).await;
    sqlx::any::install_default_drivers();
    let postgres = s.options.database_url.is_some();
    let url = match &s.options.database_url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}?mode=ro", s.options.data_dir.join("isocloud.db").display()),
    };
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    if postgres {
        sqlx::query("SET enable_seqscan = off").execute(&mut conn).await.unwrap();
    }
    // The probe works: a query without an index is caught.
    let unindexed = StoreSql {
        text: "SELECT id FROM deployments WHERE entrypoint = $1".into(),
        args: vec![StoreArg::Text("main.ts".into())],
    };
    let mut checked = vec![("(probe) deployments by entrypoint, no index", unindexed, false)];
    checked.extend(hot_queries(postgres).into_iter().map(|(name, sql)| (name, sql, true)));
    for (name, sql, must_use_indexes) in checked {
        let plan: Vec<String> = if postgres {
            let rows = explained("EXPLAIN ", &sql)
                .query()
                .fetch_all(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            rows.iter().map(|row| row.get::<String, _>(0)).collect()
        } else {
            let rows = explained("EXPLAIN QUERY PLAN ", &sql)
                .query()
                .fetch_all(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            rows.iter().map(|row| row.get::<String, _>("detail")).collect()
        };
        let scans: Vec<&String> = plan
            .iter()
            .filter(|step| if postgres { step.contains("Seq Scan") } else { step.trim_start().starts_with("SCAN ") })
            .collect();
        if must_use_indexes {
            assert!(scans.is_empty(), "{name} scans a table:\n{}\n{}", sql.text, plan.join("\n"));
        } else {
            assert!(!scans.is_empty(), "{name}: the probe sees no scan:\n{}", plan.join("\n"));
        }
    }
}
