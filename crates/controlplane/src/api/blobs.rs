//! `/blobs`: content-addressed uploads, shared by every project.

use std::collections::HashSet;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_LENGTH;
use futures_util::{StreamExt, TryStreamExt};

use super::{ApiJson, ApiPath, AppState, check};
use crate::error::ApiError;
use crate::validate;
use isocloud_api as wire;

/// Hashes one `missing` call may ask about.
const MAX_HASHES_PER_QUERY: usize = 100_000;

pub(crate) async fn missing(
    State(cp): State<AppState>,
    ApiJson(body): ApiJson<wire::BlobHashesBody>,
) -> Result<Json<wire::MissingBlobs>, ApiError> {
    if body.hashes.len() > MAX_HASHES_PER_QUERY {
        return Err(ApiError::field("hashes", format!("at most {MAX_HASHES_PER_QUERY} per request")));
    }
    for (i, hash) in body.hashes.iter().enumerate() {
        check(format!("hashes[{i}]"), validate::sha256(hash))?;
    }
    let mut seen = HashSet::new();
    let mut missing = Vec::new();
    for hash in &body.hashes {
        if seen.insert(hash.as_str()) && !cp.blobs.has(hash).await? {
            missing.push(hash.clone());
        }
    }
    Ok(Json(wire::MissingBlobs { missing, max_blob_bytes: Some(cp.options.max_blob_bytes) }))
}

pub(crate) async fn upload(
    State(cp): State<AppState>,
    ApiPath(hash): ApiPath<String>,
    request: Request,
) -> Result<(StatusCode, Json<wire::StoredBlob>), ApiError> {
    check("hash", validate::sha256(&hash))?;
    let limit_bytes = cp.options.max_blob_bytes;
    let declared = request.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit_bytes) {
        return Err(ApiError::PayloadTooLarge(format!("the blob is larger than the bound of {limit_bytes} bytes")));
    }
    let body = request.into_body().into_data_stream().map_err(std::io::Error::other).boxed();
    let outcome = cp.blobs.put_stream(&hash, body, limit_bytes).await?;
    let status = if outcome.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(wire::StoredBlob { hash, size: outcome.size_bytes })))
}
