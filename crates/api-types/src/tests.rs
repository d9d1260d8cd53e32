use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::*;

fn project() -> Project {
    Project {
        id: "p1".into(),
        name: "hello".into(),
        created_at: "2026-12-06T08:00:00.000Z".into(),
        updated_at: "2026-12-06T08:01:00.000Z".into(),
        production_deployment_id: Some("d1".into()),
        production_url: Some("http://hello.example.test".into()),
        git: Some(ProjectGit {
            repository: "https://git.test/a.git".into(),
            branch: "main".into(),
            entrypoint: "main.ts".into(),
        }),
    }
}

fn deployment() -> Deployment {
    Deployment {
        id: "d1".into(),
        project: "hello".into(),
        created_at: "2026-12-06T08:00:00.000Z".into(),
        status: "failed".into(),
        error: Some("build failed".into()),
        entrypoint: "file:///src/main.ts".into(),
        url: "http://hello-d1.example.test".into(),
        production: false,
        git: Some(DeploymentGit { commit: "abc".into(), message: "fix".into(), branch: "main".into() }),
        env_names: vec!["A".into(), "B".into()],
        files: 3,
        size_bytes: 1234,
    }
}

fn build() -> Build {
    Build {
        id: "d1".into(),
        status: "ready".into(),
        error: None,
        log: Some("installed".into()),
        npm_packages: vec!["@scope/x@1.0.0".into(), "y@2.0.0".into()],
    }
}

fn domain() -> Domain {
    Domain {
        domain: "shop.test".into(),
        project: Some("hello".into()),
        created_at: "2026-12-06T08:00:00.000Z".into(),
        verified: true,
        verified_at: Some("2026-12-06T08:02:00.000Z".into()),
        verification: Verification {
            txt_name: "_isocloud.shop.test".into(),
            txt_value: "tok".into(),
            http_url: "http://shop.test/.well-known/isocloud/tok".into(),
            http_body: "tok".into(),
        },
        certificate: Some(Certificate {
            not_after: "2027-01-01T00:00:00.000Z".into(),
            names: vec!["shop.test".into()],
            source: "acme".into(),
        }),
        acme: Some(AcmeStatus {
            status: "failed".into(),
            error: Some("connection refused".into()),
            failures: 2,
            next_attempt_at: "2027-01-01T00:02:00.000Z".into(),
            last_attempt_at: Some("2027-01-01T00:00:00.000Z".into()),
        }),
    }
}

fn log_entry() -> LogEntry {
    LogEntry {
        id: 7,
        deployment_id: "d1".into(),
        timestamp: "2026-12-06T08:00:00.000Z".into(),
        kind: "console".into(),
        level: Some("info".into()),
        message: "hi".into(),
        request_id: None,
    }
}

fn usage() -> Usage {
    Usage {
        deployment_id: "d1".into(),
        interval_start: "2026-12-06T08:00:00.000Z".into(),
        interval_end: "2026-12-06T08:01:00.000Z".into(),
        requests: 1,
        errors: 2,
        cpu_ms: 3,
        wall_ms: 4,
        ingress_bytes: 5,
        egress_bytes: 6,
        peak_memory_bytes: 7,
        fetch_requests: 8,
        fetch_sent_bytes: 9,
        fetch_received_bytes: 10,
        status_1xx: 0,
        status_2xx: 1,
        status_3xx: 0,
        status_4xx: 0,
        status_5xx: 0,
        latency_counts: vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    }
}

fn point() -> AnalyticsPoint {
    AnalyticsPoint {
        t: "2026-12-06T08:00:00.000Z".into(),
        requests: 1,
        errors: 0,
        cpu_ms: 2,
        wall_ms: 3,
        peak_memory_bytes: 4,
        ingress_bytes: 5,
        egress_bytes: 6,
        status_1xx: 0,
        status_2xx: 1,
        status_3xx: 0,
        status_4xx: 0,
        status_5xx: 0,
        latency_p50_ms: Some(5),
        latency_p99_ms: None,
        latency_counts: vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    }
}

/// Serialises, decodes, and checks the value came back whole.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
    let text = serde_json::to_string(value).unwrap();
    let back: T = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    assert_eq!(&back, value);
}

/// Removes each top-level field in turn: decoding must fail, naming it.
fn every_field_is_required<T: Serialize + DeserializeOwned>(value: &T) {
    let Value::Object(full) = serde_json::to_value(value).unwrap() else { panic!("not an object") };
    assert!(!full.is_empty());
    for key in full.keys() {
        let mut without = full.clone();
        without.remove(key);
        let error = match serde_json::from_value::<T>(Value::Object(without)) {
            Ok(_) => panic!("decoded without `{key}`"),
            Err(e) => e.to_string(),
        };
        assert_eq!(error, format!("missing field `{key}`"));
    }
}

#[test]
fn every_type_round_trips() {
    round_trip(&Whoami {
        token_name: "ci".into(),
        token_id: "t1".into(),
        scope: "project:hello:deploy".into(),
        project: Some("hello".into()),
    });
    round_trip(&project());
    round_trip(&Project { production_deployment_id: None, production_url: None, git: None, ..project() });
    round_trip(&deployment());
    round_trip(&Deployment { error: None, git: None, env_names: vec![], ..deployment() });
    round_trip(&build());
    round_trip(&Build { log: None, error: Some("no".into()), npm_packages: vec![], ..build() });
    round_trip(&EnvVar { name: "API_KEY".into(), updated_at: "2026-12-06T08:00:00.000Z".into() });
    round_trip(&domain());
    round_trip(&Domain {
        project: None,
        verified: false,
        verified_at: None,
        certificate: None,
        acme: None,
        ..domain()
    });
    round_trip(&log_entry());
    round_trip(&MissingBlobs { missing: vec!["ab".into()], max_blob_bytes: Some(64 << 20) });
    round_trip(&MissingBlobs { missing: vec!["ab".into()], max_blob_bytes: None });
    round_trip(&StoredBlob { hash: "ab".into(), size: 9 });
    round_trip(&usage());
    round_trip(&Analytics { step_s: 60, latency_le_ms: vec![5, 10], points: vec![point(), point()] });
}

#[test]
fn a_missing_field_is_an_error_naming_it() {
    every_field_is_required(&Whoami {
        token_name: "ci".into(),
        token_id: "t1".into(),
        scope: "project:hello:deploy".into(),
        project: Some("hello".into()),
    });
    every_field_is_required(&project());
    every_field_is_required(&project().git.unwrap());
    every_field_is_required(&deployment());
    every_field_is_required(&deployment().git.unwrap());
    every_field_is_required(&build());
    every_field_is_required(&EnvVar { name: "A".into(), updated_at: "t".into() });
    every_field_is_required(&domain());
    every_field_is_required(&domain().verification);
    every_field_is_required(&domain().certificate.unwrap());
    every_field_is_required(&domain().acme.unwrap());
    every_field_is_required(&log_entry());
    every_field_is_required(&MissingBlobs { missing: vec![], max_blob_bytes: None });
    every_field_is_required(&StoredBlob { hash: "ab".into(), size: 9 });
    every_field_is_required(&usage());
    every_field_is_required(&Analytics { step_s: 60, latency_le_ms: vec![5], points: vec![] });
    every_field_is_required(&point());
}

#[test]
fn a_renamed_field_is_not_read_as_empty() {
    // What a server that renamed `url` would send: the old reading of this
    // answer gave `url: ""`; now it is refused, naming the field.
    let mut value = serde_json::to_value(deployment()).unwrap();
    let url = value.as_object_mut().unwrap().remove("url").unwrap();
    value["public_url"] = url;
    let error = serde_json::from_value::<Deployment>(value).unwrap_err();
    assert_eq!(error.to_string(), "missing field `url`");
}

#[test]
fn null_options_and_unknown_fields_decode() {
    let text = r#"{"id":1,"deployment_id":"d","timestamp":"t","type":"boot","level":null,"message":"m",
        "request_id":null,"added_later":{"x":1}}"#;
    let entry: LogEntry = serde_json::from_str(text).unwrap();
    assert_eq!((entry.kind.as_str(), entry.level, entry.request_id), ("boot", None, None));
}

/// The exact text the server's `json!()` views wrote before these types
/// existed: the same names, shapes, nulls and order.
#[test]
fn the_wire_text_is_unchanged() {
    let cases: [(String, &str); 4] = [
        (
            serde_json::to_string(&project()).unwrap(),
            r#"{"id":"p1","name":"hello","created_at":"2026-12-06T08:00:00.000Z","updated_at":"2026-12-06T08:01:00.000Z","production_deployment_id":"d1","production_url":"http://hello.example.test","git":{"repository":"https://git.test/a.git","branch":"main","entrypoint":"main.ts"}}"#,
        ),
        (
            serde_json::to_string(&Deployment { git: None, ..deployment() }).unwrap(),
            r#"{"id":"d1","project":"hello","created_at":"2026-12-06T08:00:00.000Z","status":"failed","error":"build failed","entrypoint":"file:///src/main.ts","url":"http://hello-d1.example.test","production":false,"git":null,"env_names":["A","B"],"files":3,"size_bytes":1234}"#,
        ),
        (
            serde_json::to_string(&Domain { certificate: None, acme: None, ..domain() }).unwrap(),
            r#"{"domain":"shop.test","project":"hello","created_at":"2026-12-06T08:00:00.000Z","verified":true,"verified_at":"2026-12-06T08:02:00.000Z","verification":{"txt_name":"_isocloud.shop.test","txt_value":"tok","http_url":"http://shop.test/.well-known/isocloud/tok","http_body":"tok"},"certificate":null,"acme":null}"#,
        ),
        (
            serde_json::to_string(&log_entry()).unwrap(),
            r#"{"id":7,"deployment_id":"d1","timestamp":"2026-12-06T08:00:00.000Z","type":"console","level":"info","message":"hi","request_id":null}"#,
        ),
    ];
    for (written, before) in cases {
        assert_eq!(written, before);
    }
}

#[test]
fn request_bodies_refuse_a_field_they_do_not_know_and_round_trip() {
    let body = ProjectNameBody { name: "hello".into() };
    let json = serde_json::to_string(&body).unwrap();
    assert_eq!(json, r#"{"name":"hello"}"#);
    assert_eq!(serde_json::from_str::<ProjectNameBody>(&json).unwrap(), body);
    let typo = serde_json::from_str::<ProjectNameBody>(r#"{"nmae":"hello"}"#).unwrap_err().to_string();
    assert!(typo.contains("unknown field `nmae`"), "{typo}");
    let domain: NewDomainBody = serde_json::from_str(r#"{"domain":"example.com"}"#).unwrap();
    assert_eq!(domain.project, None, "a domain may be added unattached");
    assert!(serde_json::from_str::<DeploymentRefBody>(r#"{"deployment_id":"x","production":true}"#).is_err());
}

fn create_deployment() -> CreateDeploymentBody {
    CreateDeploymentBody {
        entrypoint: "main.ts".into(),
        files: [
            ("main.ts".to_owned(), FileRef { hash: "a".repeat(64), size: 120 }),
            ("static/logo.svg".to_owned(), FileRef { hash: "b".repeat(64), size: 3051 }),
        ]
        .into_iter()
        .collect(),
        eszip: Some("c".repeat(64)),
        permissions: Some(serde_json::json!({"net": ["api.example.com"]})),
        git: Some(CommitBody { commit: "d".repeat(40), message: "first line".into(), branch: "main".into() }),
        production: true,
    }
}

/// The text the client wrote before the type was shared: `files` and
/// `production` always, the optional parts only when set.
#[test]
fn create_deployment_round_trips_and_writes_what_the_client_wrote() {
    let body = create_deployment();
    let json = serde_json::to_string(&body).unwrap();
    assert_eq!(serde_json::from_str::<CreateDeploymentBody>(&json).unwrap(), body);
    let bare = CreateDeploymentBody { entrypoint: "main.ts".into(), ..CreateDeploymentBody::default() };
    assert_eq!(serde_json::to_string(&bare).unwrap(), r#"{"entrypoint":"main.ts","files":{},"production":false}"#);
    // What the server takes as absent: everything but the entrypoint, and
    // a commit without a message.
    let sparse: CreateDeploymentBody =
        serde_json::from_str(r#"{"entrypoint":"m.ts","permissions":null,"git":{"commit":"c","branch":"main"}}"#)
            .unwrap();
    assert_eq!((sparse.files.len(), sparse.permissions, sparse.production), (0, None, false));
    assert_eq!(sparse.git.unwrap().message, "");
}

#[test]
fn a_path_named_twice_is_kept_to_be_refused() {
    let text = r#"{"entrypoint":"a.ts","files":{"a.ts":{"hash":"x","size":1},"b.ts":{"hash":"y","size":2},
        "a.ts":{"hash":"z","size":3}}}"#;
    let body: CreateDeploymentBody = serde_json::from_str(text).unwrap();
    assert_eq!(body.files.named_twice(), Some("a.ts"));
    assert_eq!(body.files["a.ts"].hash, "x", "the first one is kept");
    assert_eq!(body.files.len(), 2);
    assert_eq!(create_deployment().files.named_twice(), None);
}

#[test]
fn attach_domain_round_trips_and_needs_its_field() {
    for body in [AttachDomainBody { project: Some("hello".into()) }, AttachDomainBody { project: None }] {
        let json = serde_json::to_string(&body).unwrap();
        assert_eq!(serde_json::from_str::<AttachDomainBody>(&json).unwrap(), body);
    }
    assert_eq!(serde_json::to_string(&AttachDomainBody { project: None }).unwrap(), r#"{"project":null}"#);
    let error = serde_json::from_str::<AttachDomainBody>("{}").unwrap_err().to_string();
    assert!(error.starts_with("missing field `project`"), "{error}: `{{}}` is not a detach");
}

/// Each new body, and each object nested in the deployment body, refuses a
/// field it does not know, naming it.
#[test]
fn the_deployment_and_attach_bodies_refuse_unknown_fields_naming_them() {
    let unknown = |error: String, name: &str| {
        assert!(error.contains(&format!("unknown field `{name}`")), "{error}");
    };
    let mut value = serde_json::to_value(create_deployment()).unwrap();
    value["prod"] = true.into();
    unknown(serde_json::from_value::<CreateDeploymentBody>(value).unwrap_err().to_string(), "prod");
    let mut value = serde_json::to_value(create_deployment()).unwrap();
    value["files"]["main.ts"]["sha256"] = "x".into();
    unknown(serde_json::from_value::<CreateDeploymentBody>(value).unwrap_err().to_string(), "sha256");
    let mut value = serde_json::to_value(create_deployment()).unwrap();
    value["git"]["author"] = "x".into();
    unknown(serde_json::from_value::<CreateDeploymentBody>(value).unwrap_err().to_string(), "author");
    unknown(
        serde_json::from_str::<AttachDomainBody>(r#"{"project":null,"domain":"a.test"}"#).unwrap_err().to_string(),
        "domain",
    );
}

fn missing_blobs_error() -> ErrorEnvelope {
    ErrorEnvelope {
        error: ApiErrorBody {
            code: code::MISSING_BLOBS.into(),
            message: "2 blob(s) are not uploaded: ab, cd".into(),
            field: None,
            missing: Some(vec!["ab".into(), "cd".into()]),
        },
    }
}

fn field_error() -> ErrorEnvelope {
    ErrorEnvelope {
        error: ApiErrorBody {
            field: Some("name".into()),
            ..ApiErrorBody::new(code::INVALID_FIELD, "name: must be 1–50 of a-z0-9-")
        },
    }
}

/// Each shape of the error answer round-trips, and writes what the server's
/// `json!()` wrote before: `field` and `missing` only when they apply (an
/// empty `missing` is still sent), after `code` and `message`.
#[test]
fn error_envelopes_round_trip_and_keep_their_text() {
    let plain = ErrorEnvelope { error: ApiErrorBody::new(code::NOT_FOUND, "no such project `x`") };
    let empty_missing = ErrorEnvelope {
        error: ApiErrorBody { missing: Some(Vec::new()), ..ApiErrorBody::new(code::MISSING_BLOBS, "m") },
    };
    let cases = [
        (
            missing_blobs_error(),
            r#"{"error":{"code":"MISSING_BLOBS","message":"2 blob(s) are not uploaded: ab, cd","missing":["ab","cd"]}}"#,
        ),
        (
            field_error(),
            r#"{"error":{"code":"INVALID_FIELD","message":"name: must be 1–50 of a-z0-9-","field":"name"}}"#,
        ),
        (plain, r#"{"error":{"code":"NOT_FOUND","message":"no such project `x`"}}"#),
        (empty_missing, r#"{"error":{"code":"MISSING_BLOBS","message":"m","missing":[]}}"#),
    ];
    for (envelope, text) in cases {
        round_trip(&envelope);
        assert_eq!(serde_json::to_string(&envelope).unwrap(), text);
        assert_eq!(serde_json::from_str::<ErrorEnvelope>(text).unwrap(), envelope);
    }
    assert_eq!(missing_blobs_error().error.missing(), ["ab", "cd"]);
    assert!(field_error().error.missing().is_empty());
}

/// `code` and `message` are required; `field`, `missing` and fields a newer
/// server adds may be absent or present.
#[test]
fn an_error_needs_its_code_and_message() {
    for key in ["code", "message"] {
        let mut value = serde_json::to_value(field_error()).unwrap();
        value["error"].as_object_mut().unwrap().remove(key);
        let error = serde_json::from_value::<ErrorEnvelope>(value).unwrap_err();
        assert_eq!(error.to_string(), format!("missing field `{key}`"));
    }
    let newer = r#"{"error":{"code":"TEAPOT","message":"m","retry_after_s":3},"request_id":"r"}"#;
    let decoded: ErrorEnvelope = serde_json::from_str(newer).unwrap();
    assert_eq!(decoded.error, ApiErrorBody::new("TEAPOT", "m"));
}
