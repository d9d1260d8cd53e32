//! One control plane, several origin listeners: the root a caller names
//! (`--rpc-root`) and the other nodes that answer for it
//! (`--rpc-root-fallback`). A request whose connection cannot be made goes
//! to the next root; the root that answered is asked first after that. The
//! runner's RPCs ([`crate::RemoteOrigin`]) and the edge's routing feed,
//! certificate feed and ACME lookups all go through this one type; the
//! edge shares one instance among the three, so the node its feed found is
//! the one the others ask first.

use std::sync::atomic::{AtomicUsize, Ordering};

use url::Url;

use crate::RpcTrust;

/// The roots of one origin, in the order named, and which one answered
/// last.
#[derive(Debug)]
pub struct FailoverRoots {
    /// The root, then its fallbacks; no root twice.
    roots: Vec<Url>,
    /// The root that last answered, where the next request starts.
    current: AtomicUsize,
    /// Certificates the roots may present beside the public roots, for the
    /// clients that ask them.
    trust: RpcTrust,
}

impl FailoverRoots {
    /// `root`, then each of `fallbacks` not already named.
    pub fn new(root: Url, fallbacks: impl IntoIterator<Item = Url>) -> Self {
        let mut roots = vec![root];
        for fallback in fallbacks {
            if !roots.contains(&fallback) {
                roots.push(fallback);
            }
        }
        Self { roots, current: AtomicUsize::new(0), trust: RpcTrust::default() }
    }

    /// These roots, whose https certificates may also come from `trust`.
    pub fn with_trust(mut self, trust: RpcTrust) -> Self {
        self.trust = trust;
        self
    }

    /// What a client asking these roots trusts beside the public roots.
    pub fn trust(&self) -> &RpcTrust {
        &self.trust
    }

    /// Every root, the one named first.
    pub fn roots(&self) -> &[Url] {
        &self.roots
    }

    /// The index (in [`Self::roots`]) of the root the next request starts at.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.roots.len()
    }

    /// Sends the request `build` makes for a root, starting at the root
    /// that last answered. Only a connection that cannot be made (refused,
    /// unroutable, or not made within the client's connect timeout) passes
    /// it to the next root: nothing was sent, so any request may go again.
    /// A root that answered, whatever status it answered, is the answer, and
    /// one that took the connection and then timed out is the error — it
    /// may have acted on the request, and it is asked first next time too.
    /// `what` names the caller in the log line a move writes.
    pub async fn send(
        &self,
        what: &str,
        build: impl Fn(&Url) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let first = self.current();
        let mut last_error = None;
        for step in 0..self.roots.len() {
            let index = (first + step) % self.roots.len();
            match build(&self.roots[index]).send().await {
                Ok(response) => {
                    if index != first {
                        self.current.store(index, Ordering::Relaxed);
                        tracing::warn!(
                            what,
                            root = %self.roots[index],
                            unreachable = %self.roots[first],
                            "the root did not take the connection; its next root answered"
                        );
                    }
                    return Ok(response);
                }
                Err(e) if e.is_connect() => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.expect("there is always one root"))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// How a stand-in root answers each request.
    #[derive(Clone, Copy)]
    enum Answer {
        Status(u16),
        /// Takes the connection, never answers.
        Hang,
    }

    /// A root on loopback that answers every request with `answer`; the
    /// counter is the requests it read.
    async fn root(answer: Answer) -> (Url, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/v0/", listener.local_addr().unwrap())).unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.fetch_add(1, Ordering::SeqCst);
                    match answer {
                        Answer::Status(status) => {
                            let reply =
                                format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
                            let _ = stream.write_all(reply.as_bytes()).await;
                        }
                        Answer::Hang => tokio::time::sleep(Duration::from_secs(30)).await,
                    }
                });
            }
        });
        (url, requests)
    }

    /// A root that takes no connection: a port bound, then let go.
    fn dead_root() -> Url {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Url::parse(&format!("http://{}/v0/", listener.local_addr().unwrap())).unwrap()
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).build().unwrap()
    }

    async fn status(roots: &FailoverRoots, client: &reqwest::Client) -> Result<u16, reqwest::Error> {
        let response = roots
            .send("test", |root| client.get(root.join("ping").unwrap()).timeout(Duration::from_millis(300)))
            .await?;
        Ok(response.status().as_u16())
    }

    #[tokio::test]
    async fn a_refused_connection_moves_to_the_next_root_and_stays_there() {
        let client = client();
        let dead = dead_root();
        let (live, requests) = root(Answer::Status(200)).await;
        // The probe: the dead root alone gets no answer, and it is a connect error.
        let alone = FailoverRoots::new(dead.clone(), []);
        assert!(status(&alone, &client).await.unwrap_err().is_connect());

        let roots = FailoverRoots::new(dead.clone(), [live.clone(), dead.clone()]);
        assert_eq!(roots.roots(), [dead, live], "no root twice");
        assert_eq!(status(&roots, &client).await.unwrap(), 200);
        assert_eq!(roots.current(), 1, "the root that answered is asked first now");
        assert_eq!(status(&roots, &client).await.unwrap(), 200);
        assert_eq!(roots.current(), 1);
        assert_eq!(requests.load(Ordering::SeqCst), 2);
    }

    /// Past the last root the first is asked again.
    #[tokio::test]
    async fn the_roots_wrap_around() {
        let client = client();
        let (live, requests) = root(Answer::Status(204)).await;
        let roots = FailoverRoots::new(live, [dead_root()]);
        roots.current.store(1, Ordering::Relaxed);
        assert_eq!(status(&roots, &client).await.unwrap(), 204);
        assert_eq!((roots.current(), requests.load(Ordering::SeqCst)), (0, 1));
    }

    /// A root that answers 5xx has answered: the error is the caller's, and
    /// the fallback is not asked.
    #[tokio::test]
    async fn a_root_answering_an_error_status_keeps_the_request() {
        let client = client();
        let (failing, failing_requests) = root(Answer::Status(503)).await;
        let (live, live_requests) = root(Answer::Status(200)).await;
        let roots = FailoverRoots::new(failing, [live]);
        assert_eq!(status(&roots, &client).await.unwrap(), 503);
        assert_eq!(status(&roots, &client).await.unwrap(), 503);
        assert_eq!(roots.current(), 0);
        assert_eq!((failing_requests.load(Ordering::SeqCst), live_requests.load(Ordering::SeqCst)), (2, 0));
    }

    /// A root that took the connection and then hangs may have acted on
    /// the request: its timeout is the answer, not a move.
    #[tokio::test]
    async fn a_root_that_hangs_after_connecting_keeps_the_request() {
        let client = client();
        let (hanging, hanging_requests) = root(Answer::Hang).await;
        let (live, live_requests) = root(Answer::Status(200)).await;
        let roots = FailoverRoots::new(hanging, [live]);
        let error = status(&roots, &client).await.unwrap_err();
        assert!(error.is_timeout() && !error.is_connect(), "{error:?}");
        assert_eq!(roots.current(), 0);
        assert_eq!((hanging_requests.load(Ordering::SeqCst), live_requests.load(Ordering::SeqCst)), (1, 0));
    }
}
