//! deno's messages in isocloud's words. deno's permission and loader errors
//! end in advice for its own command line ("run again with the --allow-net
//! flag", "--no-npm is specified"); a tenant cannot pass flags, so every
//! log line and error an isolate produces is rewritten by this table before
//! it reaches an origin or a visitor: what isocloud allows, and what to do.

use std::borrow::Cow;

/// One piece of deno's advice and what isocloud says instead.
pub struct Advice {
    pub deno_says: &'static str,
    pub isocloud_says: &'static str,
}

/// Longest first where one contains another.
pub static ADVICE: &[Advice] = &[
    Advice {
        deno_says: ", run again with the --allow-net flag",
        isocloud_says: " (not allowed by the deployment's permissions.net)",
    },
    Advice {
        deno_says: ", run again with the --allow-read flag",
        isocloud_says: " (an isolate reads only its deployment's own files)",
    },
    Advice { deno_says: ", run again with the --allow-write flag", isocloud_says: " (an isolate writes no files)" },
    Advice { deno_says: ", run again with the --allow-run flag", isocloud_says: " (an isolate starts no processes)" },
    Advice { deno_says: ", run again with the --allow-ffi flag", isocloud_says: " (an isolate loads no native code)" },
    Advice {
        deno_says: ", run again with the --allow-sys flag",
        isocloud_says: " (an isolate gets no system information)",
    },
    Advice {
        deno_says: ", run again with the --allow-import flag",
        isocloud_says: " (imports are resolved when the deployment is built; a running isolate fetches no module)",
    },
    Advice {
        deno_says: "npm specifiers were requested; but --no-npm is specified",
        isocloud_says: "npm: packages are installed when a deployment is built, and this one was not built with them \
                        (deploy it with `isocloud deploy`, or put them in its ESZIP)",
    },
    Advice {
        deno_says: "--no-remote is specified",
        isocloud_says: "remote modules are fetched when a deployment is built, never by a running isolate",
    },
    Advice {
        deno_says: "--cached-only is specified",
        isocloud_says: "it was not part of the deployment's build (a running isolate fetches no module)",
    },
];

/// `text` with deno's command-line advice replaced ([`ADVICE`]).
pub fn in_isocloud_words(text: &str) -> Cow<'_, str> {
    if !text.contains("--") {
        return Cow::Borrowed(text);
    }
    let mut out = Cow::Borrowed(text);
    for advice in ADVICE {
        if out.contains(advice.deno_says) {
            out = Cow::Owned(out.replace(advice.deno_says, advice.isocloud_says));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_advice_becomes_what_isocloud_allows() {
        let deno = "NotCapable: Requires net access to \"example.com:443\", run again with the --allow-net flag";
        assert_eq!(
            in_isocloud_words(deno),
            "NotCapable: Requires net access to \"example.com:443\" (not allowed by the deployment's permissions.net)"
        );
        let deno = "error: Uncaught (in promise) NotCapable: Requires write access to \"/src/x\", run again with the --allow-write flag";
        assert!(in_isocloud_words(deno).ends_with("\"/src/x\" (an isolate writes no files)"));
        for advice in ADVICE {
            assert!(!in_isocloud_words(&format!("x {} y", advice.deno_says)).contains(advice.deno_says));
            assert!(!advice.isocloud_says.contains("--"), "{}", advice.isocloud_says);
        }
    }

    #[test]
    fn other_text_is_left_as_it_is() {
        assert!(matches!(in_isocloud_words("plain -- text"), Cow::Borrowed(_)));
        assert!(matches!(in_isocloud_words("hello"), Cow::Borrowed(_)));
    }
}
