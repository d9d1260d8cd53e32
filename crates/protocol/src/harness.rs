//! The control protocol between the runner and the harness (`harness/harness.js`,
//! `harness/sync_worker.js`): the one place its messages are declared.
//!
//! Each isolate has a control socket (a unix socket, `control_path` in its
//! bootstrap). The harness opens one connection, its sync-read worker a
//! second. Every message, either way, is one JSON object on one line
//! (`\n`-terminated), tagged by `op`.
//!
//! The harness sends [`HarnessMessage`]s:
//!
//! | `op`          | fields                                   | meaning |
//! |---------------|------------------------------------------|---------|
//! | `ready`       | —                                        | the tenant's handler serves on the isolate's socket |
//! | `waiting`     | —                                        | a pre-started harness waits for its `assign` on this connection |
//! | `start_error` | `code`, `message`                        | the tenant's code cannot start; the harness exits |
//! | `log`         | `level`, `message`, `request_id` (or null) | a console line |
//! | `materialize` | `id`, `path`                             | fetch the asset at `path` (a tree path) into the deployment root, answer `id` |
//! | `tree`        | `id`                                     | write the (deferred) asset manifest where the harness reads it, answer `id` |
//!
//! The runner sends [`RunnerMessage`]s:
//!
//! | `op`     | fields                                   | meaning |
//! |----------|------------------------------------------|---------|
//! | `assign` | those of [`Assignment`]                  | the deployment a pre-started harness runs (on the connection that said `waiting`) |
//! | `answer` | `id`, `ok`, `error` (when not `ok`)      | the outcome of the `materialize` or `tree` call `id` |
//!
//! Nothing the harness says is trusted beyond the deployment's own business:
//! it runs inside the tenant's isolate. The runner reads a line of at most
//! [`MAX_LINE_BYTES`] (a longer one is skipped to its end, and the tenant
//! told); a line that is not a message of this table (unknown `op`, a field
//! missing or of the wrong type, not UTF-8) is ignored; unknown fields are
//! ignored. A `start_error` names only `MODULE_NOT_FOUND`, any other code
//! counts as `ISOLATE_START_FAILED`; a `log` level it does not know is
//! `info`; a `request_id` longer than [`MAX_REQUEST_ID_BYTES`] is dropped
//! (the line kept); a `path` longer than [`MAX_PATH_BYTES`] is refused.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{ErrorCode, LogLevel};

/// Control lines longer than this are a broken or hostile harness: the
/// runner skips the line; the harness cuts console lines well below it.
pub const MAX_LINE_BYTES: usize = 256 * 1024;
/// A `log` line's `request_id` longer than this is dropped.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// A `materialize` of a longer `path` is refused.
pub const MAX_PATH_BYTES: usize = 4096;

/// What the harness sends on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum HarnessMessage {
    /// The tenant's handler serves on the isolate's socket.
    Ready,
    /// A pre-started harness waits for its deployment on this connection,
    /// having loaded (never evaluated) the entry modules of this many
    /// packages of its bound set.
    Waiting {
        #[serde(default)]
        preloaded_packages: u32,
    },
    /// The tenant's code cannot start (the harness exits after it).
    StartError {
        #[serde(deserialize_with = "start_error_code")]
        code: ErrorCode,
        message: String,
    },
    /// A console line, with the id of the request it ran for.
    Log {
        #[serde(deserialize_with = "level_or_info")]
        level: LogLevel,
        message: String,
        #[serde(default)]
        request_id: Option<String>,
    },
    /// Fetch the asset at the tree path `path`; answer call `id`.
    Materialize { id: u64, path: String },
    /// Write the asset manifest (deferred at boot); answer call `id`.
    Tree { id: u64 },
}

impl HarnessMessage {
    /// One control line (without its `\n`) as a message.
    pub fn parse(line: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(line)
    }
}

/// The harness may name one code of its own; anything else is a failed start.
fn start_error_code<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ErrorCode, D::Error> {
    Ok(match String::deserialize(deserializer)?.as_str() {
        "MODULE_NOT_FOUND" => ErrorCode::ModuleNotFound,
        _ => ErrorCode::IsolateStartFailed,
    })
}

fn level_or_info<'de, D: Deserializer<'de>>(deserializer: D) -> Result<LogLevel, D::Error> {
    Ok(match String::deserialize(deserializer)?.as_str() {
        "debug" => LogLevel::Debug,
        "warning" => LogLevel::Warning,
        "error" => LogLevel::Error,
        _ => LogLevel::Info,
    })
}

/// What the runner sends on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RunnerMessage {
    /// The deployment a pre-started harness runs.
    Assign(Assignment),
    /// The outcome of the harness's call `id` (`materialize`, `tree`).
    Answer {
        id: u64,
        ok: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

impl RunnerMessage {
    pub fn answer(id: u64, result: Result<(), String>) -> Self {
        match result {
            Ok(()) => RunnerMessage::Answer { id, ok: true, error: None },
            Err(error) => RunnerMessage::Answer { id, ok: false, error: Some(error) },
        }
    }

    /// The message as one control line, `\n` included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("a runner message serializes");
        line.push(b'\n');
        line
    }
}

/// What the harness of a pre-started isolate is told when it gets its
/// deployment: where to start, and the environment the tenant sees (the
/// rest of the bootstrap a cold isolate reads from its file).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The tenant's entrypoint, a `file:` URL.
    pub entrypoint: String,
    /// The deployment root, as the isolate sees it.
    pub src_root: String,
    /// The asset manifest, as the isolate sees it.
    pub tree_path: String,
    /// The manifest is written when the harness first asks (`tree`).
    pub tree_deferred: bool,
    /// The tenant's envs, which the harness installs before its code runs.
    pub envs: BTreeMap<String, String>,
    pub node_servers: NodeServers,
}

/// The envs are the tenant's secrets: their names only.
impl std::fmt::Debug for Assignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assignment")
            .field("entrypoint", &self.entrypoint)
            .field("src_root", &self.src_root)
            .field("tree_path", &self.tree_path)
            .field("tree_deferred", &self.tree_deferred)
            .field("envs", &self.envs.keys().collect::<Vec<_>>())
            .field("node_servers", &self.node_servers)
            .finish()
    }
}

/// Whether the harness takes over `node:http`'s `listen()` before the
/// tenant's code runs. On the wire: `true`, `false`, `"if-packages-use-it"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeServers {
    Always,
    Never,
    /// When the package store marks that a package uses `node:http`.
    IfPackagesUseIt,
}

const IF_PACKAGES_USE_IT: &str = "if-packages-use-it";

impl Serialize for NodeServers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            NodeServers::Always => serializer.serialize_bool(true),
            NodeServers::Never => serializer.serialize_bool(false),
            NodeServers::IfPackagesUseIt => serializer.serialize_str(IF_PACKAGES_USE_IT),
        }
    }
}

impl<'de> Deserialize<'de> for NodeServers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Bool(bool),
            Text(String),
        }
        match Wire::deserialize(deserializer)? {
            Wire::Bool(true) => Ok(NodeServers::Always),
            Wire::Bool(false) => Ok(NodeServers::Never),
            Wire::Text(text) if text == IF_PACKAGES_USE_IT => Ok(NodeServers::IfPackagesUseIt),
            Wire::Text(text) => Err(serde::de::Error::custom(format!("unknown node_servers value {text:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<HarnessMessage, serde_json::Error> {
        HarnessMessage::parse(line.as_bytes())
    }

    #[test]
    fn every_harness_message_parses_as_the_harness_writes_it() {
        assert_eq!(parse(r#"{"op":"ready"}"#).unwrap(), HarnessMessage::Ready);
        assert_eq!(parse(r#"{"op":"waiting"}"#).unwrap(), HarnessMessage::Waiting { preloaded_packages: 0 });
        assert_eq!(
            parse(r#"{"op":"waiting","preloaded_packages":3}"#).unwrap(),
            HarnessMessage::Waiting { preloaded_packages: 3 }
        );
        assert!(parse(r#"{"op":"waiting","preloaded_packages":-1}"#).is_err());
        assert_eq!(
            parse(r#"{"op":"start_error","code":"MODULE_NOT_FOUND","message":"no main.ts"}"#).unwrap(),
            HarnessMessage::StartError { code: ErrorCode::ModuleNotFound, message: "no main.ts".into() }
        );
        assert_eq!(
            parse(r#"{"op":"log","level":"warning","message":"hi","request_id":"r1"}"#).unwrap(),
            HarnessMessage::Log { level: LogLevel::Warning, message: "hi".into(), request_id: Some("r1".into()) }
        );
        assert_eq!(
            parse(r#"{"op":"log","level":"info","message":"hi","request_id":null}"#).unwrap(),
            HarnessMessage::Log { level: LogLevel::Info, message: "hi".into(), request_id: None }
        );
        // The sync worker adds `id` to what the main thread gave it.
        assert_eq!(
            parse(r#"{"op":"materialize","path":"/a.txt","id":7}"#).unwrap(),
            HarnessMessage::Materialize { id: 7, path: "/a.txt".into() }
        );
        assert_eq!(parse(r#"{"op":"tree","id":1}"#).unwrap(), HarnessMessage::Tree { id: 1 });
    }

    #[test]
    fn a_harness_cannot_pick_a_code_or_level_of_its_own() {
        let code = |code: &str| match parse(&format!(r#"{{"op":"start_error","code":"{code}","message":""}}"#)) {
            Ok(HarnessMessage::StartError { code, .. }) => code,
            other => panic!("{other:?}"),
        };
        assert_eq!(code("MODULE_NOT_FOUND"), ErrorCode::ModuleNotFound);
        assert_eq!(code("ISOLATE_START_FAILED"), ErrorCode::IsolateStartFailed);
        assert_eq!(code("CPU_TIME_LIMIT"), ErrorCode::IsolateStartFailed);
        assert_eq!(code("INTERNAL"), ErrorCode::IsolateStartFailed);
        let level = |level: &str| match parse(&format!(r#"{{"op":"log","level":"{level}","message":""}}"#)) {
            Ok(HarnessMessage::Log { level, .. }) => level,
            other => panic!("{other:?}"),
        };
        assert_eq!(level("debug"), LogLevel::Debug);
        assert_eq!(level("error"), LogLevel::Error);
        assert_eq!(level("fatal"), LogLevel::Info);
        assert_eq!(level(""), LogLevel::Info);
    }

    #[test]
    fn malformed_lines_are_not_messages() {
        for line in [
            // Unknown op, no op, op of the runner's.
            r#"{"op":"shutdown"}"#,
            r#"{"level":"info","message":"x"}"#,
            r#"{"op":"assign","entrypoint":"file:///src/main.ts"}"#,
            r#"{"op":"answer","id":1,"ok":true}"#,
            // Missing fields.
            r#"{"op":"log","level":"info"}"#,
            r#"{"op":"log","message":"x"}"#,
            r#"{"op":"materialize","path":"/a"}"#,
            r#"{"op":"materialize","id":1}"#,
            r#"{"op":"tree"}"#,
            r#"{"op":"start_error","message":"x"}"#,
            // Wrong types.
            r#"{"op":7}"#,
            r#"{"op":"log","level":3,"message":"x"}"#,
            r#"{"op":"log","level":"info","message":["x"]}"#,
            r#"{"op":"log","level":"info","message":"x","request_id":5}"#,
            r#"{"op":"materialize","id":"1","path":"/a"}"#,
            r#"{"op":"materialize","id":-1,"path":"/a"}"#,
            r#"{"op":"materialize","id":1.5,"path":"/a"}"#,
            r#"{"op":"materialize","id":18446744073709551616,"path":"/a"}"#,
            r#"{"op":"tree","id":null}"#,
            r#"{"op":"start_error","code":null,"message":"x"}"#,
            // Not an object, not JSON, cut off, trailing garbage.
            r#"["op","ready"]"#,
            r#""ready""#,
            "null",
            "",
            "ready",
            r#"{"op":"rea"#,
            r#"{"op":"ready"} {"op":"ready"}"#,
        ] {
            assert!(parse(line).is_err(), "{line} parsed");
        }
    }

    #[test]
    fn invalid_utf8_is_not_a_message() {
        let mut line = br#"{"op":"log","level":"info","message":""#.to_vec();
        line.extend_from_slice(&[0xff, 0xfe, b'"', b'}']);
        assert!(HarnessMessage::parse(&line).is_err());
        assert!(HarnessMessage::parse(&[0xc3]).is_err());
        // The same line in UTF-8 is one.
        assert!(parse(r#"{"op":"log","level":"info","message":"é"}"#).is_ok());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        assert_eq!(parse(r#"{"op":"ready","id":3,"extra":{"a":[1]}}"#).unwrap(), HarnessMessage::Ready);
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let line = format!(r#"{{"op":"ready","extra":{}{}}}"#, "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse(&line).is_err());
    }

    #[test]
    fn runner_messages_are_the_lines_the_harness_reads() {
        let answer = |id, result| {
            serde_json::from_slice::<serde_json::Value>(&RunnerMessage::answer(id, result).to_line()).unwrap()
        };
        assert_eq!(answer(3, Ok(())), serde_json::json!({"op": "answer", "id": 3, "ok": true}));
        assert_eq!(
            answer(4, Err("gone".into())),
            serde_json::json!({"op": "answer", "id": 4, "ok": false, "error": "gone"})
        );
        let assignment = Assignment {
            entrypoint: "file:///src/main.ts".into(),
            src_root: "/src".into(),
            tree_path: "/isocloud/tree.json".into(),
            tree_deferred: false,
            envs: BTreeMap::from([("GREETING".into(), "hi".into())]),
            node_servers: NodeServers::IfPackagesUseIt,
        };
        let line = RunnerMessage::Assign(assignment.clone()).to_line();
        assert!(line.ends_with(b"}\n") && !line[..line.len() - 1].contains(&b'\n'));
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&line).unwrap(),
            serde_json::json!({
                "op": "assign",
                "entrypoint": "file:///src/main.ts",
                "src_root": "/src",
                "tree_path": "/isocloud/tree.json",
                "tree_deferred": false,
                "envs": {"GREETING": "hi"},
                "node_servers": "if-packages-use-it",
            })
        );
        assert_eq!(serde_json::from_slice::<RunnerMessage>(&line).unwrap(), RunnerMessage::Assign(assignment.clone()));
        // A newline in a value is escaped: one message stays one line.
        let mut multiline = assignment;
        multiline.envs.insert("TEXT".into(), "a\nb".into());
        let line = RunnerMessage::Assign(multiline).to_line();
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        for (value, wire) in [
            (NodeServers::Always, "true"),
            (NodeServers::Never, "false"),
            (NodeServers::IfPackagesUseIt, "\"if-packages-use-it\""),
        ] {
            assert_eq!(serde_json::to_string(&value).unwrap(), wire);
            assert_eq!(serde_json::from_str::<NodeServers>(wire).unwrap(), value);
        }
        assert!(serde_json::from_str::<NodeServers>("\"sometimes\"").is_err());
    }

    #[test]
    fn an_assignment_debug_shows_env_names_not_values() {
        let assignment = Assignment {
            entrypoint: "file:///src/main.ts".into(),
            src_root: "/src".into(),
            tree_path: "/t".into(),
            tree_deferred: true,
            envs: BTreeMap::from([("TOKEN".into(), "s3cret".into())]),
            node_servers: NodeServers::Never,
        };
        let debug = format!("{:?}", RunnerMessage::Assign(assignment));
        assert!(debug.contains("TOKEN") && !debug.contains("s3cret"), "{debug}");
    }
}
