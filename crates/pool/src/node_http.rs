//! Which package sets may start a Node server: the harness loads
//! `node:http` (tens of milliseconds of a cold start) only for a set whose
//! scripts name it, marked in the set's folder when it is laid out.

/// In a set's folder: its packages use `node:http` (see the harness).
pub(crate) const NODE_HTTP_MARKER: &str = "node_modules/.isocloud-uses-node-http";

pub(crate) fn is_script(path: &str) -> bool {
    path.rsplit_once('.').is_some_and(|(_, ext)| matches!(ext, "js" | "cjs" | "mjs"))
}

/// Whether a package file imports or requires Node's `http` module.
pub(crate) fn names_node_http(source: &[u8]) -> bool {
    const NEEDLES: [&[u8]; 6] = [
        b"require(\"http\")",
        b"require('http')",
        b"require(\"node:http\")",
        b"require('node:http')",
        b"\"node:http\"",
        b"'node:http'",
    ];
    NEEDLES.iter().any(|needle| memchr::memmem::find(source, needle).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_http_is_found_in_package_sources() {
        assert!(names_node_http(b"var http = require('http');"));
        assert!(names_node_http(b"import { createServer } from \"node:http\";"));
        assert!(!names_node_http(b"export const Hono = class {};"));
        assert!(is_script("/node_modules/.deno/a@1/node_modules/a/index.cjs") && !is_script("/x/README.md"));
    }
}
