//! Cursor paging for the API's lists: a page is at most `limit` items in a
//! stable order; when more follow, the answer carries
//! `Link: <same path?limit=N&cursor=C>; rel="next"`, where `C` is an opaque
//! cursor naming the last item given (its sort key). The body stays the
//! plain array it always was. A cursor is base64url of a JSON array of the
//! key's parts; one that does not decode is refused, naming `cursor`.

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine as _;

use super::{ApiError, ApiQuery};

const ENGINE: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// A cursor longer than this is no cursor of ours.
const MAX_CURSOR_BYTES: usize = 2048;

/// What a list request asks for: how many, and after which key.
pub(crate) struct PageRequest {
    pub limit: i64,
    pub after: Option<Vec<String>>,
}

impl PageRequest {
    /// `limit` (`1..=max`, `default` when absent) and `cursor` of `query`;
    /// the cursor must hold `parts` strings.
    pub fn from_query(query: &ApiQuery, default: i64, max: i64, parts: usize) -> Result<Self, ApiError> {
        let limit = query.int("limit", default, 1, max)?;
        let after = query.text("cursor").map(|cursor| decode(cursor, parts)).transpose()?;
        Ok(Self { limit, after })
    }

    /// Rows to fetch: one more than the page, to know whether more follow.
    pub fn fetch(&self) -> i64 {
        self.limit + 1
    }

    /// Cuts `rows` (fetched with [`PageRequest::fetch`]) to the page; the
    /// `Link` header to the next page when there is one, its cursor made
    /// from the last row given by `key`. `path` may carry the list's
    /// filters as a query (`…/logs?deployment=…`); the link keeps them.
    pub fn finish<T>(&self, mut rows: Vec<T>, path: &str, key: impl Fn(&T) -> Vec<String>) -> (HeaderMap, Vec<T>) {
        let mut headers = HeaderMap::new();
        let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
        if rows.len() > limit {
            rows.truncate(limit);
            if let Some(last) = rows.last() {
                let cursor = encode(&key(last));
                // A path may carry the list's filters already (`/audit?project=…`).
                let sep = if path.contains('?') { '&' } else { '?' };
                let link = format!("<{path}{sep}limit={limit}&cursor={cursor}>; rel=\"next\"");
                if let Ok(value) = HeaderValue::from_str(&link) {
                    headers.insert(header::LINK, value);
                }
            }
        }
        (headers, rows)
    }
}

fn encode(parts: &[String]) -> String {
    ENGINE.encode(serde_json::to_vec(parts).expect("strings serialize"))
}

/// The answer to a cursor that is not one the list gave.
pub(crate) fn bad_cursor() -> ApiError {
    ApiError::field("cursor", "is not a cursor this list gave (follow the Link header's next URL)")
}

fn decode(cursor: &str, parts: usize) -> Result<Vec<String>, ApiError> {
    if cursor.len() > MAX_CURSOR_BYTES {
        return Err(bad_cursor());
    }
    let bytes = ENGINE.decode(cursor).map_err(|_| bad_cursor())?;
    let key: Vec<String> = serde_json::from_slice(&bytes).map_err(|_| bad_cursor())?;
    if key.len() != parts {
        return Err(bad_cursor());
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> ApiQuery {
        ApiQuery(pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect())
    }

    #[test]
    fn a_page_links_to_the_next_with_the_last_key_and_the_cursor_comes_back() {
        let page = PageRequest::from_query(&query(&[("limit", "2")]), 50, 1000, 1).unwrap();
        assert_eq!(page.fetch(), 3);
        let (headers, rows) = page.finish(vec!["a", "b", "c"], "/api/v1/projects", |r| vec![(*r).to_owned()]);
        assert_eq!(rows, vec!["a", "b"]);
        let link = headers[header::LINK].to_str().unwrap();
        let cursor = link.split("cursor=").nth(1).unwrap().split('>').next().unwrap();
        assert!(link.starts_with("</api/v1/projects?limit=2&cursor="), "{link}");
        assert!(link.ends_with(">; rel=\"next\""), "{link}");
        let next = PageRequest::from_query(&query(&[("limit", "2"), ("cursor", cursor)]), 50, 1000, 1).unwrap();
        assert_eq!(next.after, Some(vec!["b".to_owned()]));
        // The last page has no link.
        let (headers, rows) = next.finish(vec!["c"], "/api/v1/projects", |r| vec![(*r).to_owned()]);
        assert_eq!(rows, vec!["c"]);
        assert!(headers.get(header::LINK).is_none());
    }

    #[test]
    fn a_cursor_that_is_not_ours_is_refused_naming_it() {
        for cursor in ["%%%", "bm90IGpzb24", &encode(&["a".into(), "b".into()]), &"A".repeat(5000)] {
            let error = PageRequest::from_query(&query(&[("cursor", cursor)]), 50, 1000, 1).err().unwrap();
            assert!(format!("{error:?}").contains("cursor"), "{cursor}: {error:?}");
        }
    }
}
