//! `isocloud edge` for the tests that put one in front of runners (`edge`,
//! `multi_node`), and the ranking the edge uses to pick a runner.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{KID, Runner, SECRET};

/// `isocloud edge` on free ports, killed on drop.
pub struct Edge {
    child: Child,
    pub addr: SocketAddr,
    /// The HTTPS listener, when started with `--tls-listen`.
    pub tls: Option<SocketAddr>,
    admin: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Edge {
    /// An edge fed by the origin listener at `origin`, in front of `runners`,
    /// with `extra` flags.
    pub fn start(origin: SocketAddr, runners: &[&Runner], extra: &[&str]) -> Edge {
        Self::start_with_root(&format!("http://{origin}/"), runners, extra)
    }

    /// [`Edge::start`] fed by the origin listener at `rpc_root` (`https://…`
    /// for one serving TLS).
    pub fn start_with_root(rpc_root: &str, runners: &[&Runner], extra: &[&str]) -> Edge {
        let key = format!("{KID}={SECRET}");
        let mut command = Command::new(env!("CARGO_BIN_EXE_isocloud"));
        command.args(["edge", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--rpc-root", rpc_root]);
        command.args(["--subhost-secret", &key]).args(extra);
        for runner in runners {
            command.args(["--runner", &format!("http://{}", runner.addr)]);
        }
        let mut child = command
            .env("ISOCLOUD_LOG", "info,isocloud::edge=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn isocloud edge");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (pipe, sink) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if std::env::var_os("ISOCLOUD_TEST_VERBOSE").is_some() {
                    eprintln!("[edge] {line}");
                }
                let mut sink = sink.lock().unwrap();
                sink.push_str(&line);
                sink.push('\n');
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut addr, mut admin, mut tls) = (None, None, None);
        let wants_tls = extra.contains(&"--tls-listen");
        while addr.is_none() || admin.is_none() || (wants_tls && tls.is_none()) {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                panic!("the edge exited before listening:\n{}", stderr.lock().unwrap());
            };
            if let Some(rest) = line.strip_prefix("isocloud: listening on http://") {
                addr = Some(rest.parse().unwrap());
            }
            if let Some(rest) = line.strip_prefix("isocloud: admin on http://") {
                admin = Some(rest.parse().unwrap());
            }
            if let Some(rest) = line.strip_prefix("isocloud: tls on https://") {
                tls = Some(rest.parse().unwrap());
            }
        }
        // Keep draining stdout so the edge never blocks on a full pipe.
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
        Edge { child, addr: addr.unwrap(), tls, admin: admin.unwrap(), stderr }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn client(&self, host: &str) -> reqwest::Client {
        reqwest::Client::builder().resolve(host, self.addr).timeout(Duration::from_secs(30)).build().unwrap()
    }

    pub fn url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.addr.port())
    }

    pub async fn get(&self, host: &str, path: &str) -> reqwest::Response {
        self.client(host).get(self.url(host, path)).send().await.expect("the edge answers")
    }

    /// Status and body of GET `path` on `host`.
    pub async fn text(&self, host: &str, path: &str) -> (u16, String) {
        let response = self.get(host, path).await;
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// Like [`Self::text`], but no answer at all is status 0 with the
    /// error, for loops that count failures rather than stop at one.
    pub async fn try_text(&self, host: &str, path: &str) -> (u16, String) {
        let client =
            reqwest::Client::builder().resolve(host, self.addr).timeout(Duration::from_secs(20)).build().unwrap();
        match client.get(self.url(host, path)).send().await {
            Ok(response) => (response.status().as_u16(), response.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// Waits (10 s at most) until `host` answers 200 through the edge.
    pub async fn wait_served(&self, host: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = self.try_text(host, "/").await;
            if status == 200 {
                return body;
            }
            assert!(Instant::now() < deadline, "{host} not served: {status} {body}; edge:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `/runners` of the admin listener: each runner's name and whether it is in.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The admin listener's `/healthz`: status and text.
    pub async fn health(&self) -> (u16, String) {
        let response = reqwest::get(format!("http://{}/healthz", self.admin)).await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    pub async fn runners(&self) -> Vec<Value> {
        reqwest::get(format!("http://{}/runners", self.admin)).await.unwrap().json().await.unwrap()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin)).await.unwrap().text().await.unwrap()
    }
}

/// The runners in the order the edge ranks them for `deployment_id`.
pub fn ranking<'a>(deployment_id: &str, runners: &[&'a Runner]) -> Vec<&'a Runner> {
    let names: Vec<String> = runners.iter().map(|r| format!("http://{}/", r.addr)).collect();
    isocloud_edge::rendezvous::rank(deployment_id, &names).into_iter().map(|i| runners[i]).collect()
}

/// How many isolates of `deployment_id` run on `runner`.
pub async fn isolates_of(runner: &Runner, deployment_id: &str) -> usize {
    runner.isolates().await.iter().filter(|i| i["deployment_id"] == deployment_id).count()
}
