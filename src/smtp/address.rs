//! Envelope addresses: a lenient parser that keeps every anomaly visible (source routes,
//! quoted local parts, `%`/`!`/`@` in the local part, address literals, trailing dots), so
//! relay control can refuse each trick explicitly instead of a strict parser guessing.

use std::fmt;

/// RFC 5321 §4.5.3.1.1 and .2: local part ≤ 64 octets, domain ≤ 255, path ≤ 256.
pub const LOCAL_MAX: usize = 64;
pub const DOMAIN_MAX: usize = 255;
pub const PATH_MAX: usize = 256;

/// An envelope address as the client sent it, with its parts split out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Text between `<` and `>` exactly as received; relayed upstream unchanged.
    pub raw: String,
    /// `@a,@b:` prefix present (RFC 5321 §4.1.1.3 source route).
    pub source_route: bool,
    /// The local part as written (quotes included when quoted).
    pub local: String,
    /// The local part was a quoted string.
    pub local_quoted: bool,
    /// The domain as written; `None` for a bare local part such as `<postmaster>`.
    pub domain: Option<String>,
    /// The address holds non-ASCII characters (needs SMTPUTF8).
    pub utf8: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("missing closing '>'")]
    Unterminated,
    #[error("unterminated quoted string")]
    UnterminatedQuote,
    #[error("invalid character in address")]
    BadCharacter,
    #[error("address too long")]
    TooLong,
    #[error("text after the address must be separated by a space")]
    TrailingGarbage,
}

impl Address {
    /// The null reverse-path `<>`.
    pub fn is_null(&self) -> bool {
        self.raw.is_empty()
    }

    /// The domain in lower case with no other change (a trailing dot stays, so it cannot
    /// match a configured domain).
    pub fn domain_lower(&self) -> Option<String> {
        self.domain.as_deref().map(str::to_lowercase)
    }

    /// `<postmaster>` without a domain, which RFC 5321 §4.5.1 requires every server to accept.
    pub fn is_bare_postmaster(&self) -> bool {
        self.domain.is_none() && !self.source_route && self.local.eq_ignore_ascii_case("postmaster")
    }

    /// True when the local part is a plain dot-atom or a quoted string free of routing
    /// characters, i.e. it cannot be re-interpreted as another address by a downstream MTA.
    pub fn local_is_plain(&self) -> bool {
        if self.local_quoted {
            let inner = &self.local[1..self.local.len() - 1];
            return !inner.contains(['@', '%', '!', '\\']);
        }
        is_dot_atom(&self.local, |c| c != '%' && c != '!' && c != '@')
    }

    /// True when the domain is a syntactically valid host name (letters, digits, hyphens,
    /// UTF-8 labels; no empty label, so no trailing dot) rather than a literal or junk.
    pub fn domain_is_hostname(&self) -> bool {
        self.domain.as_deref().is_some_and(is_hostname)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}>", self.raw)
    }
}

/// RFC 5322 atext plus `.` as separator, with an extra filter on characters.
fn is_dot_atom(s: &str, allow: impl Fn(char) -> bool) -> bool {
    !s.is_empty()
        && s.split('.').all(|atom| {
            !atom.is_empty()
                && atom.chars().all(|c| {
                    allow(c)
                        && (c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii())
                })
        })
}

/// A host name: labels of letters, digits and hyphens (or non-ASCII for IDNs), not starting or
/// ending with a hyphen, at most 63 octets each.
pub fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= DOMAIN_MAX
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
        })
}

/// Parses a reverse-path or forward-path at the start of `arg` (`<...>`, or a bare address up
/// to the first space as lenient MTAs accept). Returns the address and the rest of the line.
pub fn parse_path(arg: &str) -> Result<(Address, &str), AddressError> {
    let (content, rest) = if let Some(inner) = arg.strip_prefix('<') {
        let end = find_unquoted(inner, '>')?.ok_or(AddressError::Unterminated)?;
        (&inner[..end], &inner[end + 1..])
    } else {
        let end = arg.find([' ', '\t']).unwrap_or(arg.len());
        (&arg[..end], &arg[end..])
    };
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return Err(AddressError::TrailingGarbage);
    }
    Ok((parse_mailbox(content)?, rest.trim_start_matches([' ', '\t'])))
}

/// Index of the first `needle` outside a quoted string.
fn find_unquoted(s: &str, needle: char) -> Result<Option<usize>, AddressError> {
    let mut in_quote = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            c if c == needle && !in_quote => return Ok(Some(i)),
            _ => {}
        }
    }
    if in_quote {
        Err(AddressError::UnterminatedQuote)
    } else {
        Ok(None)
    }
}

fn parse_mailbox(content: &str) -> Result<Address, AddressError> {
    if content.len() > PATH_MAX {
        return Err(AddressError::TooLong);
    }
    if content.chars().any(|c| c.is_control()) {
        return Err(AddressError::BadCharacter);
    }
    let mut addr = Address {
        raw: content.to_string(),
        source_route: false,
        local: String::new(),
        local_quoted: false,
        domain: None,
        utf8: !content.is_ascii(),
    };
    if content.is_empty() {
        return Ok(addr);
    }
    // Angle brackets outside quotes (possible in a bare, unbracketed address, route
    // included) would change where the path ends once thassp relays it as `<raw>`.
    if find_unquoted(content, '<')?.is_some() || find_unquoted(content, '>')?.is_some() {
        return Err(AddressError::BadCharacter);
    }
    let mut mailbox = content;
    if content.starts_with('@') {
        let colon = find_unquoted(content, ':')?.ok_or(AddressError::BadCharacter)?;
        addr.source_route = true;
        mailbox = &content[colon + 1..];
    }
    // Spaces are only valid inside a quoted local part.
    let mut in_quote = false;
    let mut escaped = false;
    let mut last_at = None;
    for (i, c) in mailbox.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            '@' if !in_quote => last_at = Some(i),
            // Angle brackets outside quotes (possible in a bare, unbracketed address) would
            // change where the path ends once thassp relays it as `<raw>`.
            ' ' | '\t' | '<' | '>' if !in_quote => return Err(AddressError::BadCharacter),
            _ => {}
        }
    }
    if in_quote {
        return Err(AddressError::UnterminatedQuote);
    }
    let (local, domain) = match last_at {
        Some(i) => (&mailbox[..i], Some(&mailbox[i + 1..])),
        None => (mailbox, None),
    };
    if local.len() > LOCAL_MAX || domain.is_some_and(|d| d.len() > DOMAIN_MAX) {
        return Err(AddressError::TooLong);
    }
    addr.local_quoted = local.len() >= 2 && local.starts_with('"') && local.ends_with('"');
    addr.local = local.to_string();
    addr.domain = domain.map(str::to_string);
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Address {
        parse_path(s).unwrap().0
    }

    #[test]
    fn plain_and_null() {
        let a = p("<John.Doe@Example.COM>");
        assert_eq!(a.local, "John.Doe");
        assert_eq!(a.domain_lower().as_deref(), Some("example.com"));
        assert!(a.local_is_plain() && a.domain_is_hostname());
        assert!(p("<>").is_null());
        let (a, rest) = parse_path("<a@b.c> SIZE=10").unwrap();
        assert_eq!(a.raw, "a@b.c");
        assert_eq!(rest, "SIZE=10");
        assert_eq!(p("bare@example.com").domain.as_deref(), Some("example.com"));
        assert!(p("<postmaster>").is_bare_postmaster());
    }

    #[test]
    fn tricks_are_visible() {
        assert!(!p("<user%other.example@ours.example>").local_is_plain());
        assert!(!p("<other!user@ours.example>").local_is_plain());
        let a = p("<user@other.example@ours.example>");
        assert_eq!(a.domain.as_deref(), Some("ours.example"));
        assert!(!a.local_is_plain());
        assert!(p("<@a.example,@b.example:user@ours.example>").source_route);
        assert!(!p("<\"user@other\"@ours.example>").local_is_plain());
        assert!(p("<\"john doe\"@ours.example>").local_is_plain());
        assert!(!p("<user@[192.0.2.1]>").domain_is_hostname());
        assert!(!p("<user@ours.example.>").domain_is_hostname());
        assert!(!p("<.user@ours.example>").local_is_plain());
        assert!(!p("<us..er@ours.example>").local_is_plain());
    }

    #[test]
    fn errors() {
        assert_eq!(parse_path("<a@b"), Err(AddressError::Unterminated));
        assert_eq!(parse_path("<\"a@b>"), Err(AddressError::UnterminatedQuote));
        assert_eq!(parse_path("<a b@c>"), Err(AddressError::BadCharacter));
        assert_eq!(parse_path("<a@b>x"), Err(AddressError::TrailingGarbage));
        // Found by fuzzing: relayed as `<a>b@c.example>` it would end early upstream.
        assert_eq!(parse_path("a>b@c.example"), Err(AddressError::BadCharacter));
        assert_eq!(parse_path("@e>:b@x.example"), Err(AddressError::BadCharacter));
        let long = format!("<{}@example.com>", "a".repeat(65));
        assert_eq!(parse_path(&long), Err(AddressError::TooLong));
        // A quoted '>' does not end the path.
        assert_eq!(p("<\"a>b\"@c.example>").local, "\"a>b\"");
    }
}
