//! The control plane's API, driven over real HTTP against a real store.
//! Every test runs twice: on SQLite (`…::sqlite::…`) and on PostgreSQL
//! (`…::postgres::…`, a throwaway cluster per test binary).

mod support;

mod acme;
mod activity;
mod blob_gc;
mod deployments;
mod domains;
mod env;
mod errors;
mod git;
mod limits;
mod manifests;
mod origin;
mod postgres_tls;
mod projects;
mod query_plans;
mod restart;
mod storage;
mod tokens;
mod webhook_bounds;
mod wire;
