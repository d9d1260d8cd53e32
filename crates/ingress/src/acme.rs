//! HTTP-01 answers (RFC 8555 §8.3) on the public listener: `GET
//! /.well-known/acme-challenge/<token>` for a token pending for that Host
//! answers its key authorization. Only that exact path and only a pending
//! token: every other request — another path, a token not pending for the
//! Host, a lookup that did not answer in time — routes as before, so a
//! tenant's own `/.well-known/acme-challenge/` still reaches its app.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::body::{ResponseBody, full};

pub const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// The pending HTTP-01 challenges (the control plane's store). Asked only
/// for requests of the exact challenge path: implementations bound their
/// lookups and answer `None` when in doubt.
pub trait AcmeChallenges: Send + Sync + 'static {
    /// `host`: lowercase, without port; `token`: the path's last segment.
    fn key_authorization<'a>(
        &'a self,
        host: &'a str,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Option<String>> + Send + 'a>>;
}

/// The host and token of a request that asks for an HTTP-01 answer: `GET`
/// (or `HEAD`) of `/.well-known/acme-challenge/<token>`, no query, one
/// segment of base64url (at most 128 bytes), and a Host.
pub fn challenge_of<B>(request: &Request<B>, host: Option<&str>) -> Option<(String, String)> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return None;
    }
    if request.uri().query().is_some() {
        return None;
    }
    let token = request.uri().path().strip_prefix(CHALLENGE_PATH)?;
    let is_token =
        (1..=128).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !is_token {
        return None;
    }
    let host = host?;
    // Without a port, lowercase (an IPv6 literal is no domain of ours).
    let host = if host.starts_with('[') { return None } else { host.split(':').next().unwrap_or(host) };
    Some((host.to_ascii_lowercase(), token.to_owned()))
}

/// The answer: the key authorization as `text/plain`, never cached.
pub fn answer(key_authorization: String) -> Response<ResponseBody> {
    let mut response = Response::new(full(Bytes::from(key_authorization)));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, uri: &str) -> Request<()> {
        Request::builder().method(method).uri(uri).body(()).unwrap()
    }

    #[test]
    fn only_the_exact_challenge_path_asks() {
        let token = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";
        let good = request(Method::GET, &format!("/.well-known/acme-challenge/{token}"));
        assert_eq!(
            challenge_of(&good, Some("WWW.Shop.test:8080")),
            Some(("www.shop.test".to_owned(), token.to_owned()))
        );
        assert!(challenge_of(&good, None).is_none(), "no Host");
        assert!(challenge_of(&good, Some("[::1]:80")).is_none());
        for uri in [
            "/.well-known/acme-challenge/",
            "/.well-known/acme-challenge/a/b",
            "/.well-known/acme-challenge/a?x=1",
            "/.well-known/acme-challenge/a%2Fb",
            "/.well-known/acme-challenge/..",
            "/.well-known/acme-challengeX",
            "/well-known/acme-challenge/a",
        ] {
            assert!(challenge_of(&request(Method::GET, uri), Some("a.test")).is_none(), "{uri}");
        }
        let long = format!("/.well-known/acme-challenge/{}", "a".repeat(129));
        assert!(challenge_of(&request(Method::GET, &long), Some("a.test")).is_none());
        let post = request(Method::POST, &format!("/.well-known/acme-challenge/{token}"));
        assert!(challenge_of(&post, Some("a.test")).is_none());
    }
}
