//! The exporters' HTTP client: the workspace's reqwest (rustls), so OTLP
//! adds no second HTTP or TLS stack and no OpenSSL.

use bytes::{Bytes, BytesMut};
use opentelemetry_http::{HttpClient, HttpError};

/// A collector's answer is a small protobuf (partial success at most); past
/// this it is cut, so a hostile endpoint cannot make the runner buffer more.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub(crate) struct ReqwestClient(pub(crate) reqwest::Client);

#[async_trait::async_trait]
impl HttpClient for ReqwestClient {
    async fn send_bytes(&self, request: http::Request<Bytes>) -> Result<http::Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let mut response =
            self.0.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body).send().await?;
        let mut answer = BytesMut::new();
        while let Some(chunk) = response.chunk().await? {
            let room = MAX_ANSWER_BYTES.saturating_sub(answer.len());
            answer.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if room <= chunk.len() {
                break;
            }
        }
        let mut out = http::Response::new(answer.freeze());
        *out.status_mut() = response.status();
        *out.headers_mut() = std::mem::take(response.headers_mut());
        Ok(out)
    }
}
