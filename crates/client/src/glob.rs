//! The `--include`/`--exclude` patterns of `isocloud deploy`, a small
//! `.gitignore`-like subset: `*` and `?` within one path segment, `[abc]`,
//! `[a-z]`, `[!x]`, and `**` for any number of segments. A pattern without
//! a `/` matches a file or folder name at any depth (`*.log`,
//! `node_modules`); one with a `/` matches the path from the deployed
//! folder (`/dist`, `static/**/*.map`); a trailing `/` matches folders only.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    segments: Vec<Segment>,
    /// Matches the last path segment only, at any depth.
    name_only: bool,
    dir_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`: zero or more whole segments.
    AnyDepth,
    Tokens(Vec<Token>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(char),
    AnyChar,
    AnyRun,
    Class { negated: bool, ranges: Vec<(char, char)> },
}

impl Glob {
    pub fn parse(text: &str) -> Result<Glob, String> {
        let mut pattern = text.trim();
        let dir_only = pattern.ends_with('/');
        pattern = pattern.trim_end_matches('/');
        let anchored = pattern.starts_with('/');
        pattern = pattern.trim_start_matches('/');
        if pattern.is_empty() {
            return Err(format!("`{text}` matches nothing: give a name or a path"));
        }
        let name_only = !anchored && !pattern.contains('/');
        let segments = pattern
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| if s == "**" { Ok(Segment::AnyDepth) } else { parse_segment(s).map(Segment::Tokens) })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("invalid pattern `{text}`: {e}"))?;
        Ok(Glob { segments, name_only, dir_only })
    }

    /// `path` is relative to the deployed folder, `/`-separated.
    pub fn matches(&self, path: &str, is_dir: bool) -> bool {
        if self.dir_only && !is_dir {
            return false;
        }
        let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if self.name_only {
            return parts.last().is_some_and(|name| match_segments(&self.segments, &[name]));
        }
        match_segments(&self.segments, &parts)
    }
}

fn parse_segment(segment: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = segment.chars().peekable();
    while let Some(c) = chars.next() {
        tokens.push(match c {
            '*' => {
                // `a**b` within a segment means the same as `a*b`.
                while chars.peek() == Some(&'*') {
                    chars.next();
                }
                Token::AnyRun
            }
            '?' => Token::AnyChar,
            '\\' => Token::Literal(chars.next().ok_or("a trailing `\\` escapes nothing")?),
            '[' => {
                let negated = matches!(chars.peek(), Some('!' | '^'));
                if negated {
                    chars.next();
                }
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let c = chars.next().ok_or("unclosed `[`")?;
                    if c == ']' && !first {
                        break;
                    }
                    first = false;
                    if chars.peek() == Some(&'-') {
                        chars.next();
                        match chars.peek().copied() {
                            Some(']') | None => {
                                ranges.push((c, c));
                                ranges.push(('-', '-'));
                            }
                            Some(end) => {
                                chars.next();
                                if end < c {
                                    return Err(format!("range `{c}-{end}` is backwards"));
                                }
                                ranges.push((c, end));
                            }
                        }
                    } else {
                        ranges.push((c, c));
                    }
                }
                Token::Class { negated, ranges }
            }
            c => Token::Literal(c),
        });
    }
    Ok(tokens)
}

/// Dynamic programming over (pattern segment, path segment): `**` with
/// backtracking would be exponential in the number of `**`.
fn match_segments(pattern: &[Segment], parts: &[&str]) -> bool {
    // matches[i][j]: pattern[i..] matches parts[j..].
    let mut matches = vec![vec![false; parts.len() + 1]; pattern.len() + 1];
    matches[pattern.len()][parts.len()] = true;
    for i in (0..pattern.len()).rev() {
        for j in (0..=parts.len()).rev() {
            matches[i][j] = match &pattern[i] {
                Segment::AnyDepth => matches[i + 1][j] || (j < parts.len() && matches[i][j + 1]),
                Segment::Tokens(tokens) => j < parts.len() && matches[i + 1][j + 1] && match_tokens(tokens, parts[j]),
            };
        }
    }
    matches[0][0]
}

/// Wildcard matching with one backtrack point (the last `*`): linear in
/// practice, never exponential.
fn match_tokens(tokens: &[Token], text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    let (mut t, mut c) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while c < chars.len() {
        match tokens.get(t) {
            Some(Token::AnyRun) => {
                star = Some((t, c));
                t += 1;
            }
            Some(token) if single(token, chars[c]) => {
                t += 1;
                c += 1;
            }
            _ => match star {
                Some((star_t, star_c)) => {
                    t = star_t + 1;
                    c = star_c + 1;
                    star = Some((star_t, star_c + 1));
                }
                None => return false,
            },
        }
    }
    tokens[t.min(tokens.len())..].iter().all(|token| *token == Token::AnyRun)
}

fn single(token: &Token, c: char) -> bool {
    match token {
        Token::Literal(l) => *l == c,
        Token::AnyChar => true,
        Token::AnyRun => false,
        Token::Class { negated, ranges } => ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)) != *negated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, path: &str) -> bool {
        Glob::parse(pattern).unwrap().matches(path, false)
    }

    #[test]
    fn names_match_at_any_depth() {
        assert!(m("*.log", "a.log"));
        assert!(m("*.log", "deep/er/a.log"));
        assert!(!m("*.log", "a.log.txt"));
        assert!(m("node_modules", "x/node_modules"));
        assert!(m("?.ts", "src/a.ts"));
        assert!(!m("?.ts", "src/ab.ts"));
    }

    #[test]
    fn paths_match_from_the_root() {
        assert!(m("/dist", "dist"));
        assert!(!m("/dist", "src/dist"));
        assert!(m("static/*.svg", "static/a.svg"));
        assert!(!m("static/*.svg", "static/x/a.svg"));
        assert!(m("static/**/*.map", "static/a.map"));
        assert!(m("static/**/*.map", "static/x/y/a.map"));
        assert!(m("**/tests/**", "a/tests/b/c.ts"));
        assert!(m("src/**", "src/a/b"));
        assert!(!m("src/**", "lib/a"));
    }

    #[test]
    fn classes_and_escapes() {
        assert!(m("[ab].ts", "a.ts"));
        assert!(!m("[!ab].ts", "a.ts"));
        assert!(m("[a-c]x", "bx"));
        assert!(m("[a-]x", "-x"));
        assert!(m("\\*.ts", "*.ts"));
        assert!(!m("\\*.ts", "a.ts"));
        assert!(m("*a*b*c*", "xxaxxbxxcxx"));
        assert!(!m("*a*b*c*", "xxaxxcxxbxx"));
    }

    #[test]
    fn a_trailing_slash_means_folders_only() {
        let g = Glob::parse("build/").unwrap();
        assert!(g.matches("build", true));
        assert!(!g.matches("build", false));
    }

    #[test]
    fn bad_patterns_are_errors() {
        for bad in ["[abc", "", "/", "a\\", "[z-a]"] {
            assert!(Glob::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_blow_up_on_many_stars() {
        let pattern = "*a".repeat(30) + "b";
        let text = "a".repeat(200);
        assert!(!m(&pattern, &text));
        let deep = "**/".repeat(20) + "x";
        assert!(!m(&deep, &"a/".repeat(20)));
    }
}
