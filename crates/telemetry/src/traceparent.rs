//! W3C Trace Context's `traceparent` header (version 00): read from a
//! client, written into the isolate's request and onto its outbound calls.

use opentelemetry::trace::{SpanId, TraceFlags, TraceId};

pub const TRACEPARENT_HEADER: &str = "traceparent";

/// A parent named by a `traceparent` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub flags: TraceFlags,
}

impl TraceParent {
    /// `00-<32 hex>-<16 hex>-<2 hex>`, lower-case hex, neither id all
    /// zeros (the spec's rules); a later version's longer value is read by
    /// its first four fields. Anything else is no parent: a new trace starts.
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        let text = std::str::from_utf8(value).ok()?.trim();
        if text.len() < 55 {
            return None;
        }
        let (version, rest) = (&text[..2], &text[2..]);
        if !is_hex(version) || version == "ff" || (version == "00" && text.len() != 55) {
            return None;
        }
        let bytes = rest.as_bytes();
        if bytes[0] != b'-' || bytes[33] != b'-' || bytes[50] != b'-' || (text.len() > 55 && bytes[53] != b'-') {
            return None;
        }
        let (trace, span, flags) = (&rest[1..33], &rest[34..50], &rest[51..53]);
        if !is_hex(trace) || !is_hex(span) || !is_hex(flags) {
            return None;
        }
        let trace_id = TraceId::from_hex(trace).ok()?;
        let span_id = SpanId::from_hex(span).ok()?;
        if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
            return None;
        }
        let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
        Some(TraceParent { trace_id, span_id, flags })
    }

    /// The header's value naming `span_id` of `trace_id`, sampled (every
    /// span the runner makes is exported).
    pub fn format(trace_id: TraceId, span_id: SpanId) -> String {
        format!("00-{trace_id}-{span_id}-01")
    }
}

/// Lower-case hex only, as the spec asks.
fn is_hex(text: &str) -> bool {
    text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_header_names_its_trace_and_parent() {
        let parent = TraceParent::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(parent.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.span_id.to_string(), "00f067aa0ba902b7");
        assert!(parent.flags.is_sampled());
        assert_eq!(TraceParent::format(parent.trace_id, parent.span_id), GOOD);
        let later = format!("01{}-extra", &GOOD[2..]);
        assert_eq!(TraceParent::parse(later.as_bytes()).map(|p| p.trace_id), Some(parent.trace_id));
    }

    #[test]
    fn malformed_headers_start_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(TraceParent::parse(&[0xff; 60]), None);
    }
}
