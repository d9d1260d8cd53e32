//! The isolate config of `subhosting-protocol.md` §3: parsed once, validated
//! once, then only ever used as an [`IsolateConfig`].

use std::collections::{BTreeMap, HashSet};

use base64::Engine as _;
use serde::Deserialize;
use url::Url;

/// Why a config was refused. `field` is a JSON path into the config
/// (`layers[1].specifier`, `envs.FOO`), so the origin's author can find it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid isolate config: {field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// A validated isolate config. Its fields are private: a value exists only
/// as [`IsolateConfig::from_json`] (or `from_header`) checked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolateConfig {
    entrypoint: Url,
    layers: Vec<LayerSpec>,
    inline_layer: Option<String>,
    envs: BTreeMap<String, String>,
    net: NetPermission,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerSpec {
    /// One JS/TS module at `specifier`.
    Bundle { id: String, specifier: Url },
    /// An ESZIP module graph.
    Eszip { id: String },
}

impl LayerSpec {
    pub fn id(&self) -> &str {
        match self {
            LayerSpec::Bundle { id, .. } | LayerSpec::Eszip { id } => id,
        }
    }
}

/// Outbound network permission of an isolate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetPermission {
    /// `true` or absent.
    All,
    /// `false` or `[]`.
    None,
    /// Only these `host` or `host:port` entries.
    Allow(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    entrypoint: String,
    layers: Vec<RawLayer>,
    #[serde(default)]
    inline_layer: Option<String>,
    #[serde(default)]
    envs: Option<BTreeMap<String, String>>,
    #[serde(default)]
    permissions: Option<RawPermissions>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLayer {
    kind: String,
    id: String,
    #[serde(default)]
    specifier: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPermissions {
    #[serde(default)]
    net: Option<RawNet>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawNet {
    Flag(bool),
    List(Vec<String>),
}

/// The most an `x-deno-config` value may weigh; a header that large is a bug
/// or an attack either way.
const MAX_CONFIG_BYTES: usize = 256 * 1024;

impl IsolateConfig {
    /// Parses the `x-deno-config` header value: JSON, or base64url-encoded
    /// JSON when the value does not start with `{`.
    pub fn from_header(value: &[u8]) -> Result<Self, ConfigError> {
        if value.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::new("", format!("config is larger than {MAX_CONFIG_BYTES} bytes")));
        }
        let trimmed = value.trim_ascii();
        if trimmed.first() == Some(&b'{') {
            return Self::from_json(trimmed);
        }
        let text = std::str::from_utf8(trimmed)
            .map_err(|_| ConfigError::new("", "header is neither JSON nor base64url"))?
            .trim_end_matches('=');
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|e| ConfigError::new("", format!("header is neither JSON nor base64url: {e}")))?;
        Self::from_json(&decoded)
    }

    /// Parses and validates a JSON config.
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(json).map_err(json_error)?;
        raw.validate()
    }

    /// The config as the protocol's JSON: [`Self::from_json`] reads the
    /// same config back from it (what an origin sends, what a runner keeps).
    pub fn to_json(&self) -> serde_json::Value {
        let layers: Vec<serde_json::Value> = self
            .layers()
            .iter()
            .map(|layer| match layer {
                LayerSpec::Bundle { id, specifier } => {
                    serde_json::json!({ "kind": "bundle", "id": id, "specifier": specifier.as_str() })
                }
                LayerSpec::Eszip { id } => serde_json::json!({ "kind": "eszip", "id": id }),
            })
            .collect();
        let net = match self.net() {
            NetPermission::All => serde_json::Value::Bool(true),
            NetPermission::None => serde_json::Value::Bool(false),
            NetPermission::Allow(hosts) => serde_json::json!(hosts),
        };
        let mut json = serde_json::json!({
            "entrypoint": self.entrypoint().as_str(),
            "layers": layers,
            "envs": self.envs(),
            "permissions": { "net": net },
        });
        if let Some(inline) = self.inline_layer() {
            json["inline_layer"] = inline.into();
        }
        json
    }

    /// Where module loading starts; an absolute URL.
    pub fn entrypoint(&self) -> &Url {
        &self.entrypoint
    }

    /// Merged into one module graph; the earlier layer wins on duplicates.
    /// Never empty, ids unique.
    pub fn layers(&self) -> &[LayerSpec] {
        &self.layers
    }

    /// Id of the layer carried in `boot`'s body, if any (one of `layers`).
    pub fn inline_layer(&self) -> Option<&str> {
        self.inline_layer.as_deref()
    }

    /// Exactly the environment the tenant's code sees (`Deno.env`); none of
    /// it is in deno's process environment, and no name of
    /// [`crate::env_policy::DENIED_ENV`] is here.
    pub fn envs(&self) -> &BTreeMap<String, String> {
        &self.envs
    }

    pub fn net(&self) -> &NetPermission {
        &self.net
    }
}

fn json_error(e: serde_json::Error) -> ConfigError {
    // serde names the offending field in its message ("unknown field `x`",
    // "missing field `entrypoint`"); keep it whole.
    let message = e.to_string();
    let field = message.split('`').nth(1).filter(|_| message.contains("field")).unwrap_or("").to_owned();
    ConfigError::new(field, message)
}

impl RawConfig {
    fn validate(self) -> Result<IsolateConfig, ConfigError> {
        let entrypoint = parse_specifier(&self.entrypoint, "entrypoint")?;
        if self.layers.is_empty() {
            return Err(ConfigError::new("layers", "at least one layer is required"));
        }
        let mut ids = HashSet::new();
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.into_iter().enumerate() {
            let at = |f: &str| format!("layers[{i}].{f}");
            if layer.id.is_empty() {
                return Err(ConfigError::new(at("id"), "must not be empty"));
            }
            if !ids.insert(layer.id.clone()) {
                return Err(ConfigError::new(at("id"), format!("duplicate layer id {:?}", layer.id)));
            }
            layers.push(match layer.kind.as_str() {
                "bundle" => {
                    let Some(specifier) = layer.specifier else {
                        return Err(ConfigError::new(at("specifier"), "a bundle layer needs a specifier"));
                    };
                    LayerSpec::Bundle { id: layer.id, specifier: parse_specifier(&specifier, &at("specifier"))? }
                }
                "eszip" => {
                    if layer.specifier.is_some() {
                        return Err(ConfigError::new(at("specifier"), "an eszip layer takes no specifier"));
                    }
                    LayerSpec::Eszip { id: layer.id }
                }
                other => {
                    return Err(ConfigError::new(
                        at("kind"),
                        format!("unknown layer kind {other:?} (expected \"bundle\" or \"eszip\")"),
                    ));
                }
            });
        }
        if let Some(inline) = &self.inline_layer
            && !ids.contains(inline.as_str())
        {
            return Err(ConfigError::new("inline_layer", format!("names no layer: {inline:?}")));
        }
        let envs = self.envs.unwrap_or_default();
        for name in envs.keys() {
            validate_env_name(name).map_err(|m| ConfigError::new(format!("envs.{name}"), m))?;
            crate::env_policy::check_env_name(name).map_err(|m| ConfigError::new(format!("envs.{name}"), m))?;
        }
        for (name, value) in &envs {
            if value.contains('\0') {
                return Err(ConfigError::new(format!("envs.{name}"), "value must not contain NUL"));
            }
        }
        let net = NetPermission::from_raw(self.permissions)?;
        Ok(IsolateConfig { entrypoint, layers, inline_layer: self.inline_layer, envs, net })
    }
}

/// The env-name rule of the protocol: non-empty, no `=`, no NUL.
pub fn validate_env_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("env name must not be empty")
    } else if name.contains('=') {
        Err("env name must not contain '='")
    } else if name.contains('\0') {
        Err("env name must not contain NUL")
    } else {
        Ok(())
    }
}

/// Schemes with a meaning of their own: never a module's name.
const RESERVED_SCHEMES: [&str; 10] =
    ["javascript", "vbscript", "blob", "about", "mailto", "ws", "wss", "ftp", "filesystem", "ext"];

fn parse_specifier(text: &str, field: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(text).map_err(|e| ConfigError::new(field, format!("{text:?} is not an absolute URL: {e}")))?;
    match url.scheme() {
        "file" | "http" | "https" | "data" | "jsr" | "npm" | "node" => Ok(url),
        // A bundler's own name for a module (`netlify:bootstrap-stage2`):
        // opaque, never fetched, reached only through the runner's import
        // map. Not a scheme a browser or deno gives a meaning.
        other if url.cannot_be_a_base() && !RESERVED_SCHEMES.contains(&other) => Ok(url),
        other => Err(ConfigError::new(field, format!("unsupported URL scheme {other:?}"))),
    }
}

impl NetPermission {
    fn from_raw(raw: Option<RawPermissions>) -> Result<Self, ConfigError> {
        match raw.and_then(|p| p.net) {
            None | Some(RawNet::Flag(true)) => Ok(NetPermission::All),
            Some(RawNet::Flag(false)) => Ok(NetPermission::None),
            Some(RawNet::List(list)) if list.is_empty() => Ok(NetPermission::None),
            Some(RawNet::List(list)) => {
                for (i, entry) in list.iter().enumerate() {
                    validate_net_entry(entry).map_err(|m| ConfigError::new(format!("permissions.net[{i}]"), m))?;
                }
                Ok(NetPermission::Allow(list))
            }
        }
    }

    /// Parses the `permissions` object of an apps-folder `isolate.json`.
    pub fn from_json_value(value: serde_json::Value) -> Result<Self, ConfigError> {
        let raw: RawPermissions = serde_json::from_value(value).map_err(json_error)?;
        Self::from_raw(Some(raw))
    }
}

/// A `host` or `host:port` as deno's `--allow-net` takes it. Characters that
/// would let one entry smuggle another (`,`) or a flag are refused.
fn validate_net_entry(entry: &str) -> Result<(), String> {
    if entry.is_empty() {
        return Err("empty host".into());
    }
    let (host, port) = match entry.rsplit_once(':') {
        // IPv6 literals are bracketed: "[::1]:443" or "[::1]".
        Some((h, p)) if !entry.ends_with(']') => (h, Some(p)),
        _ => (entry, None),
    };
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return Err(format!("{entry:?}: port {port:?} is not a number from 0 to 65535"));
    }
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        // No leading '-': such an entry reads as a flag (`--allow-all`) to
        // anything that ever passes it as an argument of its own.
        !host.is_empty()
            && !host.starts_with('-')
            && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '*')
    };
    if host_ok { Ok(()) } else { Err(format!("{entry:?} is not a host or host:port")) }
}

#[cfg(test)]
mod tests;
