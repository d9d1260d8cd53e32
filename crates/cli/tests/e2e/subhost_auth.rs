//! Subhosting mode, `isocloud runner`: relay tokens in `x-deno-subhost` (protocol §1) — what routes, what
//! is refused with 401 before any origin call, kid selection, `rpc_root` claims, secret files and the TOML
//! config file — against a real origin on loopback and real deno isolates.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;
use jsonwebtoken::Algorithm;
use reqwest::header::HeaderValue;
use serde_json::{Value, json};

/// Answers with what the isolate saw: its URL, its headers and its pid (1,
/// in its own PID namespace), and which isolate it is.
const ECHO: &str = r#"
const ISOLATE = crypto.randomUUID();
Deno.serve((req) => Response.json({
  url: req.url,
  method: req.method,
  headers: Object.fromEntries(req.headers),
  pid: Deno.pid,
  isolate: ISOLATE,
}));
"#;

const OTHER_KID: &str = "other";
const OTHER_SECRET: &str = "other-secret-fedcba9876543210fedcba98";

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

/// GET `path` on the runner's address (as a relay would), with `token` as `x-deno-subhost`.
async fn with_token(runner: &Runner, token: impl TryInto<HeaderValue>, path: &str) -> reqwest::Response {
    let token: HeaderValue = token.try_into().ok().expect("a header value");
    client()
        .get(format!("http://{}{path}", runner.addr))
        .header("x-deno-subhost", token)
        .send()
        .await
        .expect("request to the runner")
}

async fn text_with_token(runner: &Runner, token: &str, path: &str) -> String {
    let response = with_token(runner, token, path).await;
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "body: {body}\nrunner log:\n{}", runner.stderr());
    body
}

async fn json_with_token(runner: &Runner, token: &str, path: &str) -> Value {
    serde_json::from_str(&text_with_token(runner, token, path).await).unwrap()
}

fn token_for(deployment_id: &str) -> String {
    subhost_token(claims_for(deployment_id))
}

/// A header + claims + signature token put together by hand, for what `jsonwebtoken` refuses to mint.
fn raw_token(header: &Value, claims: &Value, signature: &str) -> String {
    format!("{}.{}.{signature}", base64url(header.to_string().as_bytes()), base64url(claims.to_string().as_bytes()))
}

/// An HMAC signature of `header.claims` with `alg`, over a hand-made header.
fn hand_signed(header: &Value, claims: &Value, alg: Algorithm, secret: &str) -> String {
    let message = raw_token(header, claims, "");
    let message = message.trim_end_matches('.');
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, alg).unwrap();
    format!("{message}.{signature}")
}

const WHO: &str = r#"
Deno.serve((req, info) => Response.json({
  remote: info.remoteAddr,
  forwarded_for: req.headers.get("x-forwarded-for"),
  custom: req.headers.get("x-custom"),
}));
"#;

#[tokio::test]
async fn a_verified_relay_names_the_end_user_and_a_client_cannot() {
    let origin = TestOrigin::start().await;
    origin.deploy("who", TestDeployment::inline_js(WHO));
    let runner = origin.runner(&[]);
    let ask = |relayed: Option<&'static str>| {
        let mut request = client()
            .get(format!("http://{}/", runner.addr))
            .header("x-deno-subhost", token_for("who"))
            .header("x-custom", "kept");
        if let Some(chain) = relayed {
            request = request.header("x-forwarded-for", chain);
        }
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }
    };
    // A relay's chain: the end user is its first address.
    let seen = ask(Some("203.0.113.7, 10.0.0.1")).await;
    assert_eq!(seen["custom"], "kept", "the request's own headers pass: {seen}");
    assert_eq!(seen["forwarded_for"], "203.0.113.7", "{seen}");
    assert_eq!(seen["remote"]["hostname"], "203.0.113.7", "{seen}");
    assert_eq!(seen["remote"]["transport"], "tcp", "{seen}");
    // Without one (or with garbage), the relay's own connection stands.
    for chain in [None, Some("not-an-address")] {
        let seen = ask(chain).await;
        assert_eq!(seen["remote"]["hostname"], "127.0.0.1", "{chain:?}: {seen}");
    }
    // A client without a token: what it claims is replaced by its address.
    let apps = AppsDir::new();
    apps.app("who", &[("main.ts", WHO)]);
    let direct = apps.serve(&[]);
    let seen: Value = direct
        .client_for("who.localhost")
        .get(direct.url("who.localhost", "/"))
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-custom", "kept")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["custom"], "kept", "{seen}");
    assert_eq!(seen["forwarded_for"], "127.0.0.1", "{seen}");
    assert_eq!(seen["remote"]["hostname"], "127.0.0.1", "{seen}");
}

#[tokio::test]
async fn a_valid_token_routes_to_the_deployment_and_the_isolate_never_sees_it() {
    let origin = TestOrigin::start().await;
    origin.deploy("hello", TestDeployment::inline_js(ECHO));
    let runner = origin.runner(&[]);
    let token = token_for("hello");

    let response = client()
        .post(format!("http://{}/some/path?x=1&y=two", runner.addr))
        .header("x-deno-subhost", &token)
        .header("x-forwarded-host", "shop.example.com")
        .header("x-custom", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "runner log:\n{}", runner.stderr());
    assert!(response.headers().get("x-isocloud-error").is_none());
    let seen: Value = response.json().await.unwrap();
    // The end user's host, path and query, not the runner's address.
    assert_eq!(seen["url"], "http://shop.example.com/some/path?x=1&y=two", "{seen}");
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["headers"]["host"], "shop.example.com", "{seen}");
    assert_eq!(seen["headers"]["x-custom"], "kept", "{seen}");
    // The token is gone: neither its header nor its value reach tenant code.
    let headers = seen["headers"].as_object().unwrap();
    assert!(!headers.contains_key("x-deno-subhost"), "{seen}");
    assert!(!seen.to_string().contains(&token), "the token leaked into the isolate: {seen}");
    assert_eq!(seen["pid"], 1, "deno is pid 1 of its own namespace: {seen}");
    let pid = runner.isolate_pid("hello").await;
    assert!(runner.isolate_pids().contains(&pid), "the isolate is a child of the runner");
    let isolate = seen["isolate"].clone();
    assert!(isolate.as_str().is_some_and(|id| id.len() == 36), "{seen}");

    // Without x-forwarded-host, the isolate sees the host the relay connected to.
    let seen = json_with_token(&runner, &token, "/p").await;
    assert_eq!(seen["url"], format!("http://127.0.0.1:{}/p", runner.addr.port()), "{seen}");
    assert_eq!(seen["isolate"], isolate, "the same isolate serves the deployment");

    // Tokens inside the small clock leeway are still good.
    let now = now_s();
    let slightly_expired = subhost_token(json!({ "deployment_id": "hello", "iat": now - 60, "exp": now - 3 }));
    assert_eq!(json_with_token(&runner, &slightly_expired, "/").await["isolate"], isolate);
    let slightly_early =
        subhost_token(json!({ "deployment_id": "hello", "iat": now + 3, "nbf": now + 3, "exp": now + 60 }));
    assert_eq!(json_with_token(&runner, &slightly_early, "/").await["isolate"], isolate);
    assert_eq!(runner.isolate_pid("hello").await, pid);

    // The runner's RPC JWTs verified at the origin, and it booted once.
    assert_eq!(*origin.state.auth_failures.lock().unwrap(), Vec::<String>::new());
    assert_eq!(origin.calls_to("boot"), 1, "{:?}", origin.calls());
    assert!(origin.calls().contains(&"boot hello".to_owned()), "{:?}", origin.calls());
    assert!(origin.state.rpc_kids.lock().unwrap().iter().all(|kid| kid == KID));
}

#[tokio::test]
async fn every_bad_token_is_refused_with_401_before_any_origin_call() {
    let origin = TestOrigin::start().await;
    origin.deploy("hello", TestDeployment::inline_js(ECHO));
    let allowed = format!("{KID}={}", origin.rpc_root());
    let runner = origin.runner(&["--allow-rpc-root", &allowed]);
    let now = now_s();
    let good_claims = claims_for("hello");
    let good_header = json!({ "alg": "HS256", "typ": "JWT", "kid": KID });
    let valid = token_for("hello");
    let valid_head = valid.split_once('.').unwrap().0;
    let valid_signature = valid.rsplit_once('.').unwrap().1;
    let port = origin.addr.port();

    let cases: Vec<(&str, HeaderValue, &str)> = vec![
        (
            "alg none, empty signature",
            raw_token(&json!({ "alg": "none", "typ": "JWT", "kid": KID }), &good_claims, "").try_into().unwrap(),
            "\"none\"",
        ),
        (
            "alg none, with a valid HS256 signature",
            hand_signed(&json!({ "alg": "none", "typ": "JWT", "kid": KID }), &good_claims, Algorithm::HS256, SECRET)
                .try_into()
                .unwrap(),
            "\"none\"",
        ),
        (
            "alg hs256 (lowercase)",
            hand_signed(&json!({ "alg": "hs256", "typ": "JWT", "kid": KID }), &good_claims, Algorithm::HS256, SECRET)
                .try_into()
                .unwrap(),
            "\"hs256\"",
        ),
        (
            "HS384",
            token_with(Algorithm::HS384, Some(KID), SECRET, good_claims.clone()).try_into().unwrap(),
            "\"HS384\"",
        ),
        (
            "HS512",
            token_with(Algorithm::HS512, Some(KID), SECRET, good_claims.clone()).try_into().unwrap(),
            "\"HS512\"",
        ),
        (
            "header says HS256, signature is HS512",
            hand_signed(&good_header, &good_claims, Algorithm::HS512, SECRET).try_into().unwrap(),
            "signature",
        ),
        (
            "signed with the wrong secret",
            token_with(Algorithm::HS256, Some(KID), "not-the-secret-0123456789abcdef", good_claims.clone())
                .try_into()
                .unwrap(),
            "signature",
        ),
        (
            "claims swapped after signing",
            format!(
                "{valid_head}.{}.{valid_signature}",
                base64url(claims_for("someone-else").to_string().as_bytes())
            )
            .try_into()
            .unwrap(),
            "signature",
        ),
        ("empty signature", format!("{}.", valid.rsplit_once('.').unwrap().0).try_into().unwrap(), "signature"),
        (
            "unknown kid",
            token_with(Algorithm::HS256, Some("mallory"), SECRET, good_claims.clone()).try_into().unwrap(),
            "unknown kid",
        ),
        ("no exp", subhost_token(json!({ "deployment_id": "hello", "iat": now })).try_into().unwrap(), "no exp"),
        (
            "expired beyond the leeway",
            subhost_token(json!({ "deployment_id": "hello", "iat": now - 120, "exp": now - 30 })).try_into().unwrap(),
            "expired",
        ),
        (
            "exp as a string",
            subhost_token(json!({ "deployment_id": "hello", "iat": now, "exp": (now + 300).to_string() })).try_into().unwrap(),
            "exp",
        ),
        (
            "nbf in the future",
            subhost_token(json!({ "deployment_id": "hello", "iat": now, "nbf": now + 60, "exp": now + 300 })).try_into().unwrap(),
            "not valid yet",
        ),
        (
            "iat in the future",
            subhost_token(json!({ "deployment_id": "hello", "iat": now + 60, "exp": now + 300 })).try_into().unwrap(),
            "not valid yet",
        ),
        ("no deployment_id", subhost_token(json!({ "iat": now, "exp": now + 300 })).try_into().unwrap(), "deployment_id"),
        (
            "empty deployment_id",
            subhost_token(json!({ "deployment_id": "", "iat": now, "exp": now + 300 })).try_into().unwrap(),
            "deployment_id",
        ),
        (
            "numeric deployment_id",
            subhost_token(json!({ "deployment_id": 7, "iat": now, "exp": now + 300 })).try_into().unwrap(),
            "deployment_id",
        ),
        (
            "rpc_root on another host",
            subhost_token(json!({ "deployment_id": "hello", "iat": now, "exp": now + 300, "rpc_root": "http://evil.example/v0/" }))
                .try_into()
                .unwrap(),
            "rpc_root",
        ),
        (
            "rpc_root escaping the prefix with ..",
            subhost_token(json!({
                "deployment_id": "hello", "iat": now, "exp": now + 300,
                "rpc_root": format!("http://127.0.0.1:{port}/v0/../evil/"),
            }))
            .try_into()
            .unwrap(),
            "rpc_root",
        ),
        (
            "rpc_root sharing the prefix's text only",
            subhost_token(json!({
                "deployment_id": "hello", "iat": now, "exp": now + 300,
                "rpc_root": format!("http://127.0.0.1:{port}/v0evil/"),
            }))
            .try_into()
            .unwrap(),
            "rpc_root",
        ),
        (
            "rpc_root with userinfo pointing elsewhere",
            subhost_token(json!({
                "deployment_id": "hello", "iat": now, "exp": now + 300,
                "rpc_root": format!("http://127.0.0.1:{port}@evil.example/v0/"),
            }))
            .try_into()
            .unwrap(),
            "rpc_root",
        ),
        ("garbage: not.a.jwt", HeaderValue::from_static("not.a.jwt"), "malformed"),
        ("garbage: abc", HeaderValue::from_static("abc"), "malformed"),
        ("garbage: empty", HeaderValue::from_static(""), "malformed"),
        ("garbage: four parts", format!("{valid}.extra").try_into().unwrap(), "malformed"),
        (
            "garbage: claims not base64url",
            format!("{valid_head}.!!!.{valid_signature}").try_into().unwrap(),
            "x-deno-subhost",
        ),
        (
            "validly signed claims that are not an object",
            hand_signed(&good_header, &json!([1, 2]), Algorithm::HS256, SECRET).try_into().unwrap(),
            "not a JSON object",
        ),
        ("not UTF-8", HeaderValue::from_bytes(b"\xff\xfe\xfd.\x80.\x81").unwrap(), "not a valid token"),
        (
            "valid token with a non-ASCII tail",
            HeaderValue::from_bytes(format!("{valid}\u{e9}").as_bytes()).unwrap(),
            "not a valid token",
        ),
        (
            "longer than 8 KiB",
            subhost_token(json!({ "deployment_id": "hello", "iat": now, "exp": now + 300, "pad": "x".repeat(9000) }))
                .try_into()
                .unwrap(),
            "8 KiB",
        ),
    ];
    for (what, token, fragment) in cases {
        let response = with_token(&runner, token, "/").await;
        let message = expect_error(response, 401, "UNAUTHORIZED").await;
        assert!(
            message.to_lowercase().contains(&fragment.to_lowercase()),
            "{what}: message {message:?} should mention {fragment:?}"
        );
        assert!(!message.contains(SECRET), "{what}: the message shows the secret");
        assert_eq!(origin.calls(), Vec::<String>::new(), "{what}: the origin was called");
    }
    assert_eq!(runner.isolate_pids(), Vec::<u32>::new(), "no isolate was started");

    // The runner still serves a good token afterwards.
    let seen = json_with_token(&runner, &valid, "/after").await;
    assert!(seen["url"].as_str().unwrap().ends_with("/after"), "{seen}");
    assert_eq!(*origin.state.auth_failures.lock().unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn with_one_subhoster_a_token_without_kid_falls_back_to_it() {
    let origin = TestOrigin::start().await;
    origin.deploy("hello", TestDeployment::inline_js(ECHO));
    let runner = origin.runner(&[]);

    let no_kid = token_with(Algorithm::HS256, None, SECRET, claims_for("hello"));
    let seen = json_with_token(&runner, &no_kid, "/no-kid").await;
    assert!(seen["url"].as_str().unwrap().ends_with("/no-kid"), "{seen}");
    // The fallback does not skip the signature check.
    let forged = token_with(Algorithm::HS256, None, "not-the-secret-0123456789abcdef", claims_for("hello"));
    let message = expect_error(with_token(&runner, forged.as_str(), "/").await, 401, "UNAUTHORIZED").await;
    assert!(message.contains("signature"), "{message}");
    // No --allow-rpc-root: an rpc_root claim may name the configured origin
    // (what an absent claim means), and nothing else.
    let now = now_s();
    let aimed_at = |rpc_root: String| {
        token_with(
            Algorithm::HS256,
            None,
            SECRET,
            json!({ "deployment_id": "hello", "iat": now, "exp": now + 300, "rpc_root": rpc_root }),
        )
    };
    let seen = json_with_token(&runner, &aimed_at(origin.rpc_root()), "/default-root").await;
    assert!(seen["url"].as_str().unwrap().ends_with("/default-root"), "{seen}");
    let calls = origin.fetch_calls().len();
    let elsewhere = aimed_at(format!("http://{}/other/", origin.addr));
    let message = expect_error(with_token(&runner, elsewhere.as_str(), "/").await, 401, "UNAUTHORIZED").await;
    assert!(message.contains("rpc_root"), "{message}");
    assert_eq!(origin.fetch_calls().len(), calls, "a refused claim made an origin call");
    // RPCs are signed as the subhoster the fallback picked.
    assert_eq!(*origin.state.auth_failures.lock().unwrap(), Vec::<String>::new());
    assert!(!origin.state.rpc_kids.lock().unwrap().is_empty());
    assert!(origin.state.rpc_kids.lock().unwrap().iter().all(|kid| kid == KID));
}

#[tokio::test]
async fn with_several_subhosters_the_kid_picks_the_secret() {
    let origin = TestOrigin::start().await;
    origin.accept_subhoster(OTHER_KID, OTHER_SECRET);
    origin.deploy("hello", TestDeployment::inline_js(ECHO));
    let root = origin.rpc_root();
    let acme = format!("{KID}={SECRET}");
    let other = format!("{OTHER_KID}={OTHER_SECRET}");
    let runner = Runner::start(&["runner", "--rpc-root", &root, "--subhost-secret", &acme, "--subhost-secret", &other]);

    // Without a kid the runner cannot tell whose secret to use: refused, whoever signed it.
    for secret in [SECRET, OTHER_SECRET] {
        let no_kid = token_with(Algorithm::HS256, None, secret, claims_for("hello"));
        let message = expect_error(with_token(&runner, no_kid.as_str(), "/").await, 401, "UNAUTHORIZED").await;
        assert!(message.contains("no kid"), "{message}");
    }
    // kid `other` with acme's secret is a bad signature.
    let crossed = token_with(Algorithm::HS256, Some(OTHER_KID), SECRET, claims_for("hello"));
    let message = expect_error(with_token(&runner, crossed.as_str(), "/").await, 401, "UNAUTHORIZED").await;
    assert!(message.contains("signature"), "{message}");
    assert_eq!(origin.calls(), Vec::<String>::new());

    // kid `other` with other's secret works, and the runner signs its RPCs as `other`.
    let other_token = token_with(Algorithm::HS256, Some(OTHER_KID), OTHER_SECRET, claims_for("hello"));
    let seen_other = json_with_token(&runner, &other_token, "/").await;
    assert_eq!(*origin.state.auth_failures.lock().unwrap(), Vec::<String>::new());
    assert_eq!(origin.state.rpc_kids.lock().unwrap().first().map(String::as_str), Some(OTHER_KID));
    // kid `acme` with acme's secret works too; the two subhosters' "hello" are separate isolates.
    let seen_acme = json_with_token(&runner, &token_for("hello"), "/").await;
    assert_ne!(seen_acme["isolate"], seen_other["isolate"], "two subhosters' deployments share an isolate");
    let hellos: Vec<u64> = runner
        .isolates()
        .await
        .iter()
        .filter(|i| i["deployment_id"] == "hello")
        .map(|i| i["pid"].as_u64().unwrap())
        .collect();
    assert!(hellos.len() == 2 && hellos[0] != hellos[1], "two processes serve the two \"hello\"s: {hellos:?}");
    assert_eq!(origin.calls_to("boot"), 2, "{:?}", origin.calls());
    let kids = origin.state.rpc_kids.lock().unwrap().clone();
    assert!(kids.contains(&KID.to_owned()) && kids.contains(&OTHER_KID.to_owned()), "{kids:?}");
    assert_eq!(*origin.state.auth_failures.lock().unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn an_allowed_rpc_root_claim_sends_the_rpcs_to_that_origin() {
    let first = TestOrigin::start().await;
    let second = TestOrigin::start().await;
    first.deploy("hello", TestDeployment::inline_js("Deno.serve(() => new Response('served by the first origin'));"));
    second.deploy("hello", TestDeployment::inline_js("Deno.serve(() => new Response('served by the second origin'));"));
    let second_root = second.rpc_root();
    let allowed = format!("{KID}={second_root}");
    let runner = first.runner(&["--allow-rpc-root", &allowed]);

    let now = now_s();
    let aimed =
        subhost_token(json!({ "deployment_id": "hello", "iat": now, "exp": now + 300, "rpc_root": second_root }));
    assert_eq!(text_with_token(&runner, &aimed, "/").await, "served by the second origin");
    assert!(second.calls().contains(&"boot hello".to_owned()), "{:?}", second.calls());
    assert_eq!(first.calls(), Vec::<String>::new(), "the default origin was called");
    assert_eq!(*second.state.auth_failures.lock().unwrap(), Vec::<String>::new());

    // Without the claim, the subhoster's configured origin serves.
    assert_eq!(text_with_token(&runner, &token_for("hello"), "/").await, "served by the first origin");
    assert_eq!(first.calls_to("boot"), 1, "{:?}", first.calls());
    assert_eq!(second.calls_to("boot"), 1, "{:?}", second.calls());
    assert_eq!(*first.state.auth_failures.lock().unwrap(), Vec::<String>::new());
}

/// Issue 11 row 10: `--allow-rpc-root` prefixes are per subhoster. `other`
/// may aim its RPCs at origin B, `acme` at origin C; acme's token naming B is
/// refused with 401 before any call reaches B (which would otherwise get a
/// `boot` signed as acme), and the other way round.
#[tokio::test]
async fn a_subhosters_rpc_root_claim_cannot_aim_at_another_subhosters_origin() {
    let home = TestOrigin::start().await;
    let b = TestOrigin::start().await;
    let c = TestOrigin::start().await;
    for origin in [&home, &b, &c] {
        origin.accept_subhoster(OTHER_KID, OTHER_SECRET);
    }
    b.deploy("hello", TestDeployment::inline_js("Deno.serve(() => new Response('served by B'));"));
    c.deploy("hello", TestDeployment::inline_js("Deno.serve(() => new Response('served by C'));"));
    let root = home.rpc_root();
    let acme = format!("{KID}={SECRET}");
    let other = format!("{OTHER_KID}={OTHER_SECRET}");
    let other_b = format!("{OTHER_KID}={}", b.rpc_root());
    let acme_c = format!("{KID}={}", c.rpc_root());
    let runner = Runner::start(&[
        "runner",
        "--rpc-root",
        &root,
        "--subhost-secret",
        &acme,
        "--subhost-secret",
        &other,
        "--allow-rpc-root",
        &other_b,
        "--allow-rpc-root",
        &acme_c,
    ]);
    let now = now_s();
    let aimed = |kid: &str, secret: &str, rpc_root: String| {
        token_with(
            Algorithm::HS256,
            Some(kid),
            secret,
            json!({ "deployment_id": "hello", "iat": now, "exp": now + 300, "rpc_root": rpc_root }),
        )
    };

    // The probe: each subhoster reaches its own allowed origin.
    assert_eq!(text_with_token(&runner, &aimed(OTHER_KID, OTHER_SECRET, b.rpc_root()), "/").await, "served by B");
    let signed_as = |origin: &TestOrigin, kid: &str| {
        let kids = origin.state.rpc_kids.lock().unwrap().clone();
        !kids.is_empty() && kids.iter().all(|k| k == kid)
    };
    assert!(signed_as(&b, OTHER_KID), "{:?}", b.state.rpc_kids.lock().unwrap());
    assert_eq!(text_with_token(&runner, &aimed(KID, SECRET, c.rpc_root()), "/").await, "served by C");
    assert!(signed_as(&c, KID), "{:?}", c.state.rpc_kids.lock().unwrap());
    let (b_calls, c_calls) = (b.fetch_calls().len(), c.fetch_calls().len());

    // Crossed: refused, and neither origin hears of it.
    for (kid, secret, target) in [(KID, SECRET, b.rpc_root()), (OTHER_KID, OTHER_SECRET, c.rpc_root())] {
        let crossed = aimed(kid, secret, target.clone());
        let message = expect_error(with_token(&runner, crossed.as_str(), "/").await, 401, "UNAUTHORIZED").await;
        assert!(message.contains("rpc_root") && message.contains("not allowed"), "{kid} → {target}: {message}");
        // Under the other's prefix is no better than the prefix itself.
        let deeper = aimed(kid, secret, format!("{target}t1/"));
        expect_error(with_token(&runner, deeper.as_str(), "/").await, 401, "UNAUTHORIZED").await;
    }
    assert_eq!(b.fetch_calls().len(), b_calls, "B got a call for acme: {:?}", b.calls());
    assert_eq!(c.fetch_calls().len(), c_calls, "C got a call for other: {:?}", c.calls());
    assert!(signed_as(&b, OTHER_KID) && signed_as(&c, KID), "an RPC signed as the wrong subhoster");
    assert_eq!(home.calls(), Vec::<String>::new(), "nothing fell back to the default origin");
}

#[test]
fn a_bare_allow_rpc_root_prefix_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("{KID}={SECRET}");
    let (status, stdout, stderr) = run_to_exit(
        &[
            "runner",
            "--rpc-root",
            "http://127.0.0.1:9/v0/",
            "--subhost-secret",
            &secret,
            "--allow-rpc-root",
            "http://127.0.0.1:9/",
        ],
        dir.path(),
    );
    assert!(!status.success(), "exit status {status}");
    assert!(stderr.contains("allow_rpc_root") && stderr.contains("KID=PREFIX"), "stderr:\n{stderr}");
    assert!(!stdout.contains("listening"), "it started listening:\n{stdout}");
}

#[tokio::test]
async fn subhost_secret_file_works_like_subhost_secret() {
    let origin = TestOrigin::start().await;
    origin.deploy("hello", TestDeployment::inline_js(ECHO));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acme.secret");
    // A trailing newline, as `echo SECRET > file` leaves it, is not part of the secret.
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    let root = origin.rpc_root();
    let spec = format!("{KID}={}", path.display());
    let runner = Runner::start(&["runner", "--rpc-root", &root, "--subhost-secret-file", &spec]);

    let seen = json_with_token(&runner, &token_for("hello"), "/from-file").await;
    assert!(seen["url"].as_str().unwrap().ends_with("/from-file"), "{seen}");
    let forged = token_with(Algorithm::HS256, Some(KID), &format!("{SECRET}\n"), claims_for("hello"));
    expect_error(with_token(&runner, forged.as_str(), "/").await, 401, "UNAUTHORIZED").await;
    // The runner's RPC tokens are signed with the file's secret.
    assert_eq!(*origin.state.auth_failures.lock().unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn a_config_file_sets_the_same_options() {
    let first = TestOrigin::start().await;
    let second = TestOrigin::start().await;
    first.accept_subhoster(OTHER_KID, OTHER_SECRET);
    first.deploy("hello", TestDeployment::inline_js("Deno.serve(() => new Response('first'));"));
    second.deploy("hello", TestDeployment::inline_js("Deno.serve(() => new Response('second'));"));
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("other.secret");
    std::fs::write(&secret_file, OTHER_SECRET).unwrap();
    let config = dir.path().join("isocloud.toml");
    std::fs::write(
        &config,
        format!(
            "rpc_root = {:?}\nsubhost_secret = [{:?}]\nsubhost_secret_file = [{:?}]\nallow_rpc_root = [{:?}]\n\
             origin_timeout_s = 5\n",
            first.rpc_root(),
            format!("{KID}={SECRET}"),
            format!("{OTHER_KID}={}", secret_file.display()),
            format!("{KID}={}", second.rpc_root()),
        ),
    )
    .unwrap();
    let runner = Runner::start(&["runner", "--config", config.to_str().unwrap()]);

    assert_eq!(text_with_token(&runner, &token_for("hello"), "/").await, "first");
    let other = token_with(Algorithm::HS256, Some(OTHER_KID), OTHER_SECRET, claims_for("hello"));
    assert_eq!(text_with_token(&runner, &other, "/").await, "first");
    let now = now_s();
    let aimed =
        subhost_token(json!({ "deployment_id": "hello", "iat": now, "exp": now + 300, "rpc_root": second.rpc_root() }));
    assert_eq!(text_with_token(&runner, &aimed, "/").await, "second");
    let bad = token_with(Algorithm::HS256, Some(KID), OTHER_SECRET, claims_for("hello"));
    expect_error(with_token(&runner, bad.as_str(), "/").await, 401, "UNAUTHORIZED").await;
    assert_eq!(*first.state.auth_failures.lock().unwrap(), Vec::<String>::new());
    assert_eq!(*second.state.auth_failures.lock().unwrap(), Vec::<String>::new());
}

/// Runs the binary to its exit (at most 30 s) and returns its exit status and output.
fn run_to_exit(args: &[&str], state_dir: &Path) -> (std::process::ExitStatus, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_isocloud"))
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state_dir)
        .arg("--deno")
        .arg(deno_path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn isocloud");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "isocloud kept running with a bad config; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_config_file_with_an_unknown_key_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("isocloud.toml");
    std::fs::write(
        &config,
        format!(
            "rpc_root = \"http://127.0.0.1:9/v0/\"\nsubhost_secret = [\"{KID}={SECRET}\"]\n\
             subhost_secrets = [\"typo={SECRET}\"]\n"
        ),
    )
    .unwrap();
    let (status, stdout, stderr) = run_to_exit(&["runner", "--config", config.to_str().unwrap()], dir.path());
    assert!(!status.success(), "exit status {status}");
    assert!(stderr.contains("subhost_secrets"), "stderr does not name the key:\n{stderr}");
    assert!(!stderr.contains(SECRET), "stderr shows the secret:\n{stderr}");
    assert!(!stdout.contains("listening"), "it started listening:\n{stdout}");

    // The same file without the typo starts (and is stopped by the runner kit).
    std::fs::write(&config, format!("rpc_root = \"http://127.0.0.1:9/v0/\"\nsubhost_secret = [\"{KID}={SECRET}\"]\n"))
        .unwrap();
    let runner = Runner::start(&["runner", "--config", config.to_str().unwrap()]);
    assert!(runner.addr.port() != 0);
}

/// A relay keeps one h2c connection (HTTP/2 with prior knowledge, no TLS)
/// to the runner and multiplexes every tenant's requests over it: each
/// stream carries its own token and reaches its own deployment, bodies
/// stream both ways, and a refused stream does not end the connection.
#[tokio::test]
async fn a_relay_multiplexes_tenants_over_one_h2c_connection() {
    use http_body_util::{BodyExt, Full};

    let origin = TestOrigin::start().await;
    let handler = |name: &str| {
        format!(
            "Deno.serve(async (req) => new Response(`{name} ${{req.method}} ${{new URL(req.url).pathname}} \
             ${{req.headers.has('x-deno-subhost')}} ${{(await req.text()).length}}`));"
        )
    };
    origin.deploy("alpha", TestDeployment::inline_js(&handler("alpha")));
    origin.deploy("beta", TestDeployment::inline_js(&handler("beta")));
    let runner = origin.runner(&[]);

    let stream = tokio::net::TcpStream::connect(runner.addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("the runner speaks h2c");
    let connection = tokio::spawn(connection);

    let send = |deployment: &'static str, i: usize, token: String| {
        let mut sender = sender.clone();
        async move {
            let body = "x".repeat(i * 1000);
            let request = hyper::Request::post(format!("http://{deployment}.example/r{i}"))
                .header("x-deno-subhost", token)
                .body(Full::new(bytes::Bytes::from(body)))
                .unwrap();
            let response = sender.send_request(request).await.expect("a stream of the shared connection");
            assert_eq!(response.version(), hyper::Version::HTTP_2);
            let status = response.status().as_u16();
            let code = response.headers().get("x-isocloud-error").map(|v| v.to_str().unwrap().to_owned());
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, code, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    let answers = futures_util::future::join_all((0..24).map(|i| {
        let deployment = if i % 2 == 0 { "alpha" } else { "beta" };
        send(deployment, i, subhost_token(claims_for(deployment)))
    }))
    .await;
    for (i, (status, code, body)) in answers.into_iter().enumerate() {
        let deployment = if i % 2 == 0 { "alpha" } else { "beta" };
        assert_eq!((status, code), (200, None), "{body}");
        assert_eq!(body, format!("{deployment} POST /r{i} false {}", i * 1000));
    }

    // A bad token on one stream is that stream's 401; the connection lives on.
    let (status, code, _) = send("alpha", 1, "not.a.token".to_owned()).await;
    assert_eq!((status, code.as_deref()), (401, Some("UNAUTHORIZED")));
    let (status, _, body) = send("beta", 2, subhost_token(claims_for("beta"))).await;
    assert_eq!((status, body.as_str()), (200, "beta POST /r2 false 2000"));
    assert!(!connection.is_finished(), "one connection carried every stream");
    assert_eq!(origin.calls_to("boot"), 2, "{:?}", origin.calls());
}
