//! Owns the HAProxy PROXY protocol header parser (versions 1 and 2): sans-IO, bounded, panic-free.
//!
//! A load balancer in front of thassp prepends one header to each connection that carries the
//! real client's address. [`parse`] looks at the first bytes received and says whether the
//! header is complete (and how long it is), incomplete, or invalid. It does no I/O: the caller
//! reads at most [`MAX_HEADER`] bytes, calls [`parse`] after each read, and hands everything after
//! the consumed bytes to the SMTP session. Only ever enable this on listeners that sit behind a
//! trusted balancer: whoever can connect directly can otherwise claim any address.
//!
//! Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest v1 header, CRLF included (from the spec).
pub const V1_MAX_LINE: usize = 107;

/// The 12 bytes that start every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The largest v2 length field (addresses + TLVs) we accept.
///
/// The wire format allows up to 65535, but real senders (HAProxy, nginx, cloud balancers) emit
/// the address block (at most 216 bytes, for AF_UNIX) plus a few TLVs (ALPN, authority, SSL
/// details, unique id, cloud endpoint ids): a few hundred bytes. 4096 leaves ample room for
/// those while bounding what a single pre-session connection may make us buffer.
pub const V2_MAX_LEN: usize = 4096;

/// The most bytes [`parse`] ever looks at: a v2 header with the largest accepted length (the v1
/// limit, [`V1_MAX_LINE`], is smaller). A caller that has this many bytes always gets a verdict.
pub const MAX_HEADER: usize = 16 + V2_MAX_LEN;

const V1_PREFIX: &[u8] = b"PROXY ";

/// What a complete header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// PROXY with addresses: the connection was relayed for `source` (the real client) and
    /// originally addressed to `destination`.
    Proxy {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// v2 LOCAL (health check from the balancer itself), v1 `UNKNOWN`, or a family we carry no
    /// address for (v2 UNSPEC, UDP, AF_UNIX): use the real peer address.
    Local,
}

/// Which field of a v1 header an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1Field {
    SourceAddress,
    DestinationAddress,
    SourcePort,
    DestinationPort,
}

impl V1Field {
    /// The fields after `TCP4`/`TCP6`, in wire order.
    const ALL: [V1Field; 4] = [
        V1Field::SourceAddress,
        V1Field::DestinationAddress,
        V1Field::SourcePort,
        V1Field::DestinationPort,
    ];
}

impl fmt::Display for V1Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            V1Field::SourceAddress => "source address",
            V1Field::DestinationAddress => "destination address",
            V1Field::SourcePort => "source port",
            V1Field::DestinationPort => "destination port",
        })
    }
}

/// The address family a v1 `TCP4`/`TCP6` line announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1Proto {
    Tcp4,
    Tcp6,
}

impl V1Proto {
    fn ip(self) -> &'static str {
        match self {
            V1Proto::Tcp4 => "IPv4",
            V1Proto::Tcp6 => "IPv6",
        }
    }

    fn other_ip(self) -> &'static str {
        match self {
            V1Proto::Tcp4 => "IPv6",
            V1Proto::Tcp6 => "IPv4",
        }
    }
}

impl fmt::Display for V1Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            V1Proto::Tcp4 => "TCP4",
            V1Proto::Tcp6 => "TCP6",
        })
    }
}

/// Why the start of a connection is not an acceptable PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The first bytes are neither `PROXY ` nor the v2 signature (nor a prefix of them).
    #[error("not a PROXY protocol header (expected \"PROXY \" or the v2 signature)")]
    NotProxy,
    #[error("PROXY v1 header: no CRLF within {V1_MAX_LINE} bytes")]
    V1TooLong,
    #[error("PROXY v1 header: stray CR or LF (the line must end with a single CRLF)")]
    V1LineEnding,
    #[error("PROXY v1 header: fields must be separated by exactly one space, none leading or trailing")]
    V1Spacing,
    #[error("PROXY v1 header: unknown protocol (expected TCP4, TCP6 or UNKNOWN)")]
    V1Protocol,
    #[error("PROXY v1 header: {0} missing")]
    V1MissingField(V1Field),
    #[error("PROXY v1 header: extra field after the destination port")]
    V1ExtraField,
    #[error("PROXY v1 header: {field} is not a valid {} literal (required by {proto})", proto.ip())]
    V1Address { field: V1Field, proto: V1Proto },
    #[error("PROXY v1 header: {field} is an {} literal but the protocol is {proto}", proto.other_ip())]
    V1FamilyMismatch { field: V1Field, proto: V1Proto },
    #[error("PROXY v1 header: {0} is not a decimal number 0-65535 (no sign, no leading zero)")]
    V1Port(V1Field),
    #[error("PROXY v2 header: unsupported version {0} (only version 2 exists)")]
    V2Version(u8),
    #[error("PROXY v2 header: unknown command {0} (expected 0 LOCAL or 1 PROXY)")]
    V2Command(u8),
    #[error("PROXY v2 header: invalid address family/protocol byte {0:#04x}")]
    V2Family(u8),
    #[error("PROXY v2 header: length {len} too short for the {family} address block ({need} bytes)")]
    V2AddressTooShort {
        family: &'static str,
        need: u16,
        len: u16,
    },
    #[error("PROXY v2 header: length {0} above the accepted cap of {V2_MAX_LEN} bytes")]
    V2TooLong(u16),
}

/// Parses a header at the start of `buf`.
///
/// `Ok(None)`: need more bytes (only when what is there so far is a valid prefix; an empty `buf`
/// is one). `Ok(Some((header, consumed)))`: done; bytes after `consumed` belong to the SMTP
/// session. Never looks past [`MAX_HEADER`] bytes (v1: [`V1_MAX_LINE`]), so with that many
/// bytes in `buf` the answer is never `Ok(None)`. Garbage is rejected from its first byte.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    match buf.first() {
        None => Ok(None),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(ProxyError::NotProxy),
    }
}

/// Whether `buf` and `sig` agree on their common length.
fn agrees(buf: &[u8], sig: &[u8]) -> bool {
    let n = buf.len().min(sig.len());
    buf.get(..n) == sig.get(..n)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    if !agrees(buf, V1_PREFIX) {
        return Err(ProxyError::NotProxy);
    }
    let window = buf.get(..V1_MAX_LINE).unwrap_or(buf);
    let Some(body) = window.get(V1_PREFIX.len()..) else {
        return Ok(None);
    };
    if let Some(end) = body.windows(2).position(|w| w == b"\r\n") {
        let line = body.get(..end).unwrap_or_default();
        let consumed = V1_PREFIX.len() + end + 2;
        return Ok(v1_fields(line, true)?.map(|header| (header, consumed)));
    }
    if buf.len() >= V1_MAX_LINE {
        return Err(ProxyError::V1TooLong);
    }
    match body.strip_suffix(b"\r") {
        // The CR may start the final CRLF: the line so far must then be complete and valid.
        Some(line) => v1_fields(line, true).map(|_| None),
        None => v1_fields(body, false).map(|_| None),
    }
}

/// Checks the v1 line after `PROXY ` (without CRLF). `complete`: the line ends here, so return
/// the header; otherwise `body` is what arrived so far and only has to be a valid prefix.
fn v1_fields(body: &[u8], complete: bool) -> Result<Option<Header>, ProxyError> {
    let mut parts = body.splitn(2, |&b| b == b' ');
    let proto = parts.next().unwrap_or_default();
    let rest = parts.next();
    if proto == b"UNKNOWN" {
        // The receiver must ignore anything after UNKNOWN up to the CRLF.
        return Ok(complete.then_some(Header::Local));
    }
    if body.iter().any(|&b| b == b'\r' || b == b'\n') {
        return Err(ProxyError::V1LineEnding);
    }
    let proto = match proto {
        b"TCP4" => V1Proto::Tcp4,
        b"TCP6" => V1Proto::Tcp6,
        b"" if rest.is_some() => return Err(ProxyError::V1Spacing),
        partial
            if rest.is_none()
                && !complete
                && [&b"TCP4"[..], b"TCP6", b"UNKNOWN"]
                    .iter()
                    .any(|p| p.starts_with(partial)) =>
        {
            return Ok(None);
        }
        _ => return Err(ProxyError::V1Protocol),
    };
    let Some(rest) = rest else {
        return if complete {
            Err(ProxyError::V1MissingField(V1Field::SourceAddress))
        } else {
            Ok(None)
        };
    };

    let mut ips = [None; 2];
    let mut ports = [None; 2];
    let mut count = 0;
    let mut pieces = rest.split(|&b| b == b' ').peekable();
    while let Some(piece) = pieces.next() {
        let partial = !complete && pieces.peek().is_none();
        if piece.is_empty() && !partial {
            return Err(ProxyError::V1Spacing);
        }
        let field = *V1Field::ALL.get(count).ok_or(ProxyError::V1ExtraField)?;
        match field {
            V1Field::SourceAddress | V1Field::DestinationAddress => {
                if let Some(slot) = ips.get_mut(count) {
                    *slot = v1_address(piece, proto, field, partial)?;
                }
            }
            V1Field::SourcePort | V1Field::DestinationPort => {
                if let Some(slot) = ports.get_mut(count - 2) {
                    *slot = v1_port(piece, field, partial)?;
                }
            }
        }
        count += 1;
    }
    if !complete {
        return Ok(None);
    }
    if let Some(&missing) = V1Field::ALL.get(count) {
        return Err(ProxyError::V1MissingField(missing));
    }
    match (ips, ports) {
        ([Some(src), Some(dst)], [Some(sport), Some(dport)]) => Ok(Some(Header::Proxy {
            source: SocketAddr::new(src, sport),
            destination: SocketAddr::new(dst, dport),
        })),
        // Unreachable: four complete fields were each checked above.
        _ => Err(ProxyError::V1MissingField(V1Field::SourceAddress)),
    }
}

/// Checks a v1 address field. `partial`: it may still grow, so only a cheap prefix check.
fn v1_address(
    text: &[u8],
    proto: V1Proto,
    field: V1Field,
    partial: bool,
) -> Result<Option<IpAddr>, ProxyError> {
    let bad = ProxyError::V1Address { field, proto };
    if partial {
        // Longest literals: "255.255.255.255", "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255".
        let fits = match proto {
            V1Proto::Tcp4 => text.len() <= 15 && text.iter().all(|&b| b.is_ascii_digit() || b == b'.'),
            V1Proto::Tcp6 => {
                text.len() <= 45
                    && text
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            }
        };
        return if fits { Ok(None) } else { Err(bad) };
    }
    let text = std::str::from_utf8(text).map_err(|_| bad)?;
    let (v4, v6) = (text.parse::<Ipv4Addr>(), text.parse::<Ipv6Addr>());
    match (proto, v4, v6) {
        (V1Proto::Tcp4, Ok(ip), _) => Ok(Some(IpAddr::V4(ip))),
        (V1Proto::Tcp6, _, Ok(ip)) => Ok(Some(IpAddr::V6(ip))),
        (V1Proto::Tcp4, _, Ok(_)) | (V1Proto::Tcp6, Ok(_), _) => {
            Err(ProxyError::V1FamilyMismatch { field, proto })
        }
        _ => Err(bad),
    }
}

/// Checks a v1 port field: 0-65535 in plain decimal. `partial`: it may still grow.
fn v1_port(text: &[u8], field: V1Field, partial: bool) -> Result<Option<u16>, ProxyError> {
    let bad = ProxyError::V1Port(field);
    if text.len() > 5 || !text.iter().all(u8::is_ascii_digit) || (text.len() > 1 && text.starts_with(b"0")) {
        return Err(bad);
    }
    let value = text.iter().fold(0u32, |acc, &d| acc * 10 + u32::from(d - b'0'));
    let port = u16::try_from(value).map_err(|_| bad)?;
    match (text.is_empty(), partial) {
        (_, true) => Ok(None),
        (true, false) => Err(bad),
        (false, false) => Ok(Some(port)),
    }
}

/// A v2 family/protocol byte we accept with the PROXY command.
struct V2Family {
    name: &'static str,
    /// Size of its address block.
    need: u16,
    /// Whether we carry its addresses: `Some(false)` IPv4, `Some(true)` IPv6, `None` ignored.
    ipv6: Option<bool>,
}

fn v2_family(byte: u8) -> Option<V2Family> {
    let (name, need, ipv6) = match byte {
        0x00 => ("UNSPEC", 0, None),
        0x11 => ("TCP over IPv4", 12, Some(false)),
        0x12 => ("UDP over IPv4", 12, None),
        0x21 => ("TCP over IPv6", 36, Some(true)),
        0x22 => ("UDP over IPv6", 36, None),
        0x31 => ("AF_UNIX stream", 216, None),
        0x32 => ("AF_UNIX datagram", 216, None),
        _ => return None,
    };
    Some(V2Family { name, need, ipv6 })
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    if !agrees(buf, &V2_SIGNATURE) {
        return Err(ProxyError::NotProxy);
    }
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(None);
    };
    let version = ver_cmd >> 4;
    if version != 2 {
        return Err(ProxyError::V2Version(version));
    }
    let proxy = match ver_cmd & 0x0f {
        0 => false,
        1 => true,
        command => return Err(ProxyError::V2Command(command)),
    };
    let Some(&fam) = buf.get(13) else {
        return Ok(None);
    };
    // With LOCAL the family (and the whole block) is to be ignored.
    let family = if proxy {
        Some(v2_family(fam).ok_or(ProxyError::V2Family(fam))?)
    } else {
        None
    };
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return Ok(None);
    };
    let len = u16::from_be_bytes([hi, lo]);
    if usize::from(len) > V2_MAX_LEN {
        return Err(ProxyError::V2TooLong(len));
    }
    let too_short = |f: &V2Family| ProxyError::V2AddressTooShort {
        family: f.name,
        need: f.need,
        len,
    };
    if let Some(f) = &family
        && len < f.need
    {
        return Err(too_short(f));
    }
    let consumed = 16 + usize::from(len);
    let Some(block) = buf.get(16..consumed) else {
        return Ok(None);
    };
    let header = match &family {
        Some(f @ V2Family { ipv6: Some(ipv6), .. }) => {
            v2_addresses(block, *ipv6).ok_or_else(|| too_short(f))?
        }
        _ => Header::Local,
    };
    Ok(Some((header, consumed)))
}

/// Reads the address block: source and destination addresses, then source and destination ports.
fn v2_addresses(block: &[u8], ipv6: bool) -> Option<Header> {
    let n = if ipv6 { 16 } else { 4 };
    let ip = |bytes: &[u8]| -> Option<IpAddr> {
        if ipv6 {
            Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?))
        } else {
            Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?))
        }
    };
    let port =
        |at: usize| -> Option<u16> { Some(u16::from_be_bytes(block.get(at..at + 2)?.try_into().ok()?)) };
    Some(Header::Proxy {
        source: SocketAddr::new(ip(block.get(..n)?)?, port(2 * n)?),
        destination: SocketAddr::new(ip(block.get(n..2 * n)?)?, port(2 * n + 2)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn proxied(source: &str, destination: &str) -> Header {
        Header::Proxy {
            source: sa(source),
            destination: sa(destination),
        }
    }

    /// Every strict prefix of a valid header is "need more bytes".
    fn assert_prefixes_incomplete(header: &[u8]) {
        for k in 0..header.len() {
            assert_eq!(parse(&header[..k]), Ok(None), "prefix of {k} bytes of {header:?}");
        }
    }

    /// Checks `header` parses to `expected`, consumes exactly itself, leaves trailing bytes alone
    /// and that all its prefixes are incomplete.
    fn assert_header(header: &[u8], expected: Header) {
        assert_eq!(parse(header), Ok(Some((expected, header.len()))), "{header:?}");
        let mut with_smtp = header.to_vec();
        with_smtp.extend_from_slice(b"EHLO example.org\r\n");
        assert_eq!(parse(&with_smtp), Ok(Some((expected, header.len()))));
        assert_prefixes_incomplete(header);
    }

    fn v1_err(line: &[u8]) -> ProxyError {
        match parse(line) {
            Err(e) => e,
            other => panic!("{:?} gave {other:?}", String::from_utf8_lossy(line)),
        }
    }

    fn v2(ver_cmd: u8, fam: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(ver_cmd);
        out.push(fam);
        out.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn v4_block() -> Vec<u8> {
        let mut b = vec![192, 0, 2, 1, 198, 51, 100, 7];
        b.extend_from_slice(&51234u16.to_be_bytes());
        b.extend_from_slice(&25u16.to_be_bytes());
        b
    }

    fn v6_block() -> Vec<u8> {
        let mut b = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        b.extend_from_slice(&"2001:db8::25".parse::<Ipv6Addr>().unwrap().octets());
        b.extend_from_slice(&65535u16.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b
    }

    /// A few TLVs as HAProxy sends them: ALPN, authority, and a NOOP padding one.
    fn tlvs() -> Vec<u8> {
        let mut t = vec![0x01, 0x00, 0x04];
        t.extend_from_slice(b"smtp");
        t.extend_from_slice(&[0x02, 0x00, 0x0b]);
        t.extend_from_slice(b"mx.example.");
        t.extend_from_slice(&[0x04, 0x00, 0x03, 0, 0, 0]);
        t
    }

    #[test]
    fn empty_needs_more() {
        assert_eq!(parse(b""), Ok(None));
    }

    #[test]
    fn v1_tcp4() {
        assert_header(
            b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 25\r\n",
            proxied("192.0.2.1:51234", "198.51.100.7:25"),
        );
        assert_header(
            b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
            proxied("0.0.0.0:0", "255.255.255.255:65535"),
        );
    }

    #[test]
    fn v1_tcp6() {
        assert_header(
            b"PROXY TCP6 2001:db8::1 2001:db8::25 51234 25\r\n",
            proxied("[2001:db8::1]:51234", "[2001:db8::25]:25"),
        );
        assert_header(
            b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n",
            proxied("[::ffff:192.0.2.1]:1", "[::1]:2"),
        );
    }

    #[test]
    fn v1_longest_tcp6_line() {
        let ff = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let line = format!("PROXY TCP6 {ff} {ff} 65535 65535\r\n");
        assert!(line.len() <= V1_MAX_LINE);
        assert_header(
            line.as_bytes(),
            proxied(&format!("[{ff}]:65535"), &format!("[{ff}]:65535")),
        );
    }

    #[test]
    fn v1_unknown() {
        assert_header(b"PROXY UNKNOWN\r\n", Header::Local);
        assert_header(
            b"PROXY UNKNOWN 192.0.2.1 198.51.100.7 51234 25\r\n",
            Header::Local,
        );
        assert_header(
            b"PROXY UNKNOWN  whatever\tthe\x00balancer \xffsays\r\n",
            Header::Local,
        );
    }

    #[test]
    fn v1_line_at_the_limit() {
        // Exactly 107 bytes including CRLF: accepted.
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(V1_MAX_LINE - 2, b'x');
        line.extend_from_slice(b"\r\n");
        assert_eq!(line.len(), V1_MAX_LINE);
        assert_header(&line, Header::Local);

        // One more: the CRLF ends at byte 108.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LINE - 1, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long), Err(ProxyError::V1TooLong));
        assert_eq!(parse(&long[..V1_MAX_LINE - 1]), Ok(None));
        assert_eq!(parse(&long[..V1_MAX_LINE]), Err(ProxyError::V1TooLong));
    }

    #[test]
    fn v1_missing_crlf_after_107_bytes() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(500, b'x');
        assert_eq!(parse(&line[..106]), Ok(None));
        assert_eq!(parse(&line[..107]), Err(ProxyError::V1TooLong));
        assert_eq!(parse(&line), Err(ProxyError::V1TooLong));
    }

    #[test]
    fn v1_spacing() {
        use ProxyError::V1Spacing;
        for line in [
            &b"PROXY  TCP4 192.0.2.1 198.51.100.7 1 2\r\n"[..],
            b"PROXY TCP4  192.0.2.1 198.51.100.7 1 2\r\n",
            b"PROXY TCP4 192.0.2.1  198.51.100.7 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.7  1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.7 1  2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2 \r\n",
        ] {
            assert_eq!(v1_err(line), V1Spacing, "{:?}", String::from_utf8_lossy(line));
        }
        // Detected before the CRLF arrives.
        assert_eq!(v1_err(b"PROXY TCP4 192.0.2.1  "), V1Spacing);
        // A tab is not a space.
        assert!(parse(b"PROXY TCP4\t192.0.2.1 198.51.100.7 1 2\r\n").is_err());
    }

    #[test]
    fn v1_bad_addresses() {
        use V1Field::*;
        use V1Proto::*;
        let cases: &[(&[u8], ProxyError)] = &[
            (
                b"PROXY TCP4 256.0.2.1 198.51.100.7 1 2\r\n",
                ProxyError::V1Address {
                    field: SourceAddress,
                    proto: Tcp4,
                },
            ),
            (
                b"PROXY TCP4 192.0.2 198.51.100.7 1 2\r\n",
                ProxyError::V1Address {
                    field: SourceAddress,
                    proto: Tcp4,
                },
            ),
            (
                b"PROXY TCP4 192.0.2.01 198.51.100.7 1 2\r\n",
                ProxyError::V1Address {
                    field: SourceAddress,
                    proto: Tcp4,
                },
            ),
            (
                b"PROXY TCP4 192.0.2.1 example.org 1 2\r\n",
                ProxyError::V1Address {
                    field: DestinationAddress,
                    proto: Tcp4,
                },
            ),
            (
                b"PROXY TCP6 2001:db8:::1 ::1 1 2\r\n",
                ProxyError::V1Address {
                    field: SourceAddress,
                    proto: Tcp6,
                },
            ),
            (
                b"PROXY TCP6 ::1 fe80::1%eth0 1 2\r\n",
                ProxyError::V1Address {
                    field: DestinationAddress,
                    proto: Tcp6,
                },
            ),
            (
                b"PROXY TCP6 [::1] ::1 1 2\r\n",
                ProxyError::V1Address {
                    field: SourceAddress,
                    proto: Tcp6,
                },
            ),
            // Family mismatch, both ways.
            (
                b"PROXY TCP4 ::1 198.51.100.7 1 2\r\n",
                ProxyError::V1FamilyMismatch {
                    field: SourceAddress,
                    proto: Tcp4,
                },
            ),
            (
                b"PROXY TCP4 192.0.2.1 2001:db8::1 1 2\r\n",
                ProxyError::V1FamilyMismatch {
                    field: DestinationAddress,
                    proto: Tcp4,
                },
            ),
            (
                b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n",
                ProxyError::V1FamilyMismatch {
                    field: SourceAddress,
                    proto: Tcp6,
                },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(v1_err(line), *want, "{:?}", String::from_utf8_lossy(line));
        }
        // A colon can never be part of an IPv4 literal: rejected before the line is complete.
        assert_eq!(
            v1_err(b"PROXY TCP4 2001:"),
            ProxyError::V1Address {
                field: SourceAddress,
                proto: Tcp4
            }
        );
    }

    #[test]
    fn v1_bad_ports() {
        use V1Field::*;
        let cases: &[(&[u8], ProxyError)] = &[
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 65536 25\r\n",
                ProxyError::V1Port(SourcePort),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 1 65536\r\n",
                ProxyError::V1Port(DestinationPort),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 +25 25\r\n",
                ProxyError::V1Port(SourcePort),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 -1 25\r\n",
                ProxyError::V1Port(SourcePort),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 025 25\r\n",
                ProxyError::V1Port(SourcePort),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 1 123456\r\n",
                ProxyError::V1Port(DestinationPort),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 1 0x19\r\n",
                ProxyError::V1Port(DestinationPort),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(v1_err(line), *want, "{:?}", String::from_utf8_lossy(line));
        }
        // Out of range is known at the fifth digit.
        assert_eq!(
            v1_err(b"PROXY TCP4 192.0.2.1 198.51.100.7 99999"),
            ProxyError::V1Port(SourcePort)
        );
    }

    #[test]
    fn v1_bad_structure() {
        use ProxyError::*;
        let cases: &[(&[u8], ProxyError)] = &[
            (b"proxy TCP4 192.0.2.1 198.51.100.7 1 2\r\n", NotProxy),
            (b"PROXY tcp4 192.0.2.1 198.51.100.7 1 2\r\n", V1Protocol),
            (b"PROXY TCP5 192.0.2.1 198.51.100.7 1 2\r\n", V1Protocol),
            (b"PROXY UDP4 192.0.2.1 198.51.100.7 1 2\r\n", V1Protocol),
            (b"PROXY UNKNOWNX\r\n", V1Protocol),
            (b"PROXY \r\n", V1Protocol),
            (b"PROXY TCP4\r\n", V1MissingField(V1Field::SourceAddress)),
            (
                b"PROXY TCP4 192.0.2.1\r\n",
                V1MissingField(V1Field::DestinationAddress),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7\r\n",
                V1MissingField(V1Field::SourcePort),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 1\r\n",
                V1MissingField(V1Field::DestinationPort),
            ),
            (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2 3\r\n", V1ExtraField),
            (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\n", V1LineEnding),
            (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\rEHLO\r\n", V1LineEnding),
            (b"PROXY TCP4\n", V1LineEnding),
        ];
        for (line, want) in cases {
            assert_eq!(v1_err(line), *want, "{:?}", String::from_utf8_lossy(line));
        }
        // A CR that cannot start the final CRLF (the line is incomplete) is an error right away.
        assert_eq!(
            v1_err(b"PROXY TCP4 192.0.2.1\r"),
            V1MissingField(V1Field::DestinationAddress)
        );
        // But a CR at the end of a complete line waits for the LF.
        assert_eq!(parse(b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\r"), Ok(None));
    }

    #[test]
    fn v1_errors_before_crlf() {
        assert_eq!(v1_err(b"PROXY X"), ProxyError::V1Protocol);
        assert_eq!(v1_err(b"PROXY TCP4X"), ProxyError::V1Protocol);
        assert_eq!(
            v1_err(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3"),
            ProxyError::V1ExtraField
        );
        assert_eq!(
            v1_err(b"PROXY TCP4 1.2.3.4.5.6.7.8.9"),
            ProxyError::V1Address {
                field: V1Field::SourceAddress,
                proto: V1Proto::Tcp4
            }
        );
    }

    #[test]
    fn v2_tcp4() {
        let expected = proxied("192.0.2.1:51234", "198.51.100.7:25");
        assert_header(&v2(0x21, 0x11, &v4_block()), expected);
        let mut with_tlvs = v4_block();
        with_tlvs.extend_from_slice(&tlvs());
        let header = v2(0x21, 0x11, &with_tlvs);
        assert_eq!(header.len(), 16 + 12 + tlvs().len());
        assert_header(&header, expected);
    }

    #[test]
    fn v2_tcp6() {
        let expected = proxied("[2001:db8::1]:65535", "[2001:db8::25]:0");
        assert_header(&v2(0x21, 0x21, &v6_block()), expected);
        let mut with_tlvs = v6_block();
        with_tlvs.extend_from_slice(&tlvs());
        assert_header(&v2(0x21, 0x21, &with_tlvs), expected);
    }

    #[test]
    fn v2_local_ignores_the_block() {
        assert_header(&v2(0x20, 0x00, &[]), Header::Local);
        // The balancer may still send addresses, TLVs, even a nonsense family: all ignored.
        assert_header(&v2(0x20, 0x11, &v4_block()), Header::Local);
        assert_header(&v2(0x20, 0xff, &tlvs()), Header::Local);
        assert_header(&v2(0x20, 0x21, &[1, 2, 3]), Header::Local);
    }

    #[test]
    fn v2_families_without_addresses() {
        // UNSPEC, UDP and AF_UNIX: valid, but the real peer address is used.
        assert_header(&v2(0x21, 0x00, &[]), Header::Local);
        assert_header(&v2(0x21, 0x00, &tlvs()), Header::Local);
        assert_header(&v2(0x21, 0x12, &v4_block()), Header::Local);
        assert_header(&v2(0x21, 0x22, &v6_block()), Header::Local);
        let mut unix = vec![0u8; 216];
        unix[..9].copy_from_slice(b"/run/sock");
        assert_header(&v2(0x21, 0x31, &unix), Header::Local);
        assert_header(&v2(0x21, 0x32, &unix), Header::Local);
    }

    #[test]
    fn v2_bad_version_command_family() {
        use ProxyError::*;
        assert_eq!(parse(&v2(0x11, 0x11, &v4_block())), Err(V2Version(1)));
        assert_eq!(parse(&v2(0x31, 0x11, &v4_block())), Err(V2Version(3)));
        assert_eq!(parse(&v2(0x01, 0x11, &v4_block())), Err(V2Version(0)));
        assert_eq!(parse(&v2(0x22, 0x11, &v4_block())), Err(V2Command(2)));
        assert_eq!(parse(&v2(0x2f, 0x11, &v4_block())), Err(V2Command(15)));
        for fam in [0x01, 0x10, 0x13, 0x20, 0x23, 0x30, 0x41, 0xff] {
            assert_eq!(
                parse(&v2(0x21, fam, &v4_block())),
                Err(V2Family(fam)),
                "{fam:#04x}"
            );
        }
        // Known as soon as the byte arrives.
        assert_eq!(parse(&v2(0x31, 0x11, &[])[..13]), Err(V2Version(3)));
        assert_eq!(parse(&v2(0x21, 0x13, &[])[..14]), Err(V2Family(0x13)));
    }

    #[test]
    fn v2_address_block_too_short() {
        let err = |fam, len| parse(&v2(0x21, fam, &vec![0; len])[..16]);
        assert_eq!(
            err(0x11, 11),
            Err(ProxyError::V2AddressTooShort {
                family: "TCP over IPv4",
                need: 12,
                len: 11
            })
        );
        assert_eq!(
            err(0x11, 0),
            Err(ProxyError::V2AddressTooShort {
                family: "TCP over IPv4",
                need: 12,
                len: 0
            })
        );
        assert_eq!(
            err(0x21, 12),
            Err(ProxyError::V2AddressTooShort {
                family: "TCP over IPv6",
                need: 36,
                len: 12
            })
        );
        assert_eq!(
            err(0x31, 215),
            Err(ProxyError::V2AddressTooShort {
                family: "AF_UNIX stream",
                need: 216,
                len: 215
            })
        );
    }

    #[test]
    fn v2_length_cap() {
        let mut at_cap = v4_block();
        at_cap.resize(V2_MAX_LEN, 0);
        let header = v2(0x21, 0x11, &at_cap);
        assert_eq!(header.len(), MAX_HEADER);
        assert_eq!(
            parse(&header),
            Ok(Some((proxied("192.0.2.1:51234", "198.51.100.7:25"), MAX_HEADER)))
        );
        assert_eq!(parse(&header[..MAX_HEADER - 1]), Ok(None));

        // Above the cap: refused from the length field alone, for LOCAL too.
        let mut head = V2_SIGNATURE.to_vec();
        head.extend_from_slice(&[0x21, 0x11, 0x10, 0x01]);
        assert_eq!(parse(&head), Err(ProxyError::V2TooLong(4097)));
        head[12] = 0x20;
        head[14..16].copy_from_slice(&[0xff, 0xff]);
        assert_eq!(parse(&head), Err(ProxyError::V2TooLong(65535)));
    }

    #[test]
    fn garbage_fails_fast() {
        for garbage in [
            &b"E"[..],
            b"EHLO example.org\r\n",
            b"\x16\x03\x01",
            b"\0",
            b" PROXY TCP4",
            b"PROX\r\n",
            b"PROXY\r\n",
            b"PROXYTCP4",
            b"\r\n\r\n\r\n",
            b"\r\n\r\n\0\r\nQUIT\r",
            b"\r\nQUIT\r\n",
            b"\n",
        ] {
            assert_eq!(parse(garbage), Err(ProxyError::NotProxy), "{garbage:?}");
        }
        assert_eq!(parse(b"P"), Ok(None));
        assert_eq!(parse(b"PROXY"), Ok(None));
        assert_eq!(parse(b"\r"), Ok(None));
        assert_eq!(parse(b"\r\n"), Ok(None));
        assert_eq!(parse(&V2_SIGNATURE), Ok(None));
    }

    #[test]
    fn messages_name_the_problem() {
        let msg = ProxyError::V1FamilyMismatch {
            field: V1Field::SourceAddress,
            proto: V1Proto::Tcp4,
        }
        .to_string();
        assert_eq!(
            msg,
            "PROXY v1 header: source address is an IPv6 literal but the protocol is TCP4"
        );
        let msg = ProxyError::V1Address {
            field: V1Field::DestinationAddress,
            proto: V1Proto::Tcp6,
        }
        .to_string();
        assert_eq!(
            msg,
            "PROXY v1 header: destination address is not a valid IPv6 literal (required by TCP6)"
        );
        assert_eq!(
            ProxyError::V2Family(0x13).to_string(),
            "PROXY v2 header: invalid address family/protocol byte 0x13"
        );
        assert!(ProxyError::V2TooLong(5000).to_string().contains("4096"));
    }

    /// xorshift64*: small, deterministic, good enough to shake a parser.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
    }

    /// Properties any input must keep (beyond not panicking).
    fn check_invariants(buf: &[u8], rng: &mut Rng) -> usize {
        let result = parse(buf);
        let kind = match &result {
            Ok(Some(_)) => 0,
            Ok(None) => 1,
            Err(_) => 2,
        };
        let mut longer = buf.to_vec();
        for _ in 0..=rng.below(4) {
            longer.push(rng.byte());
        }
        match result {
            Ok(Some((header, consumed))) => {
                assert!(consumed <= buf.len() && consumed <= MAX_HEADER, "{buf:?}");
                assert_eq!(parse(&buf[..consumed]), Ok(Some((header, consumed))), "{buf:?}");
                assert_eq!(parse(&longer), Ok(Some((header, consumed))), "{buf:?}");
                let k = rng.below(consumed);
                assert_eq!(parse(&buf[..k]), Ok(None), "prefix {k} of {buf:?}");
            }
            Ok(None) => assert!(buf.len() < MAX_HEADER, "{buf:?}"),
            Err(_) => assert!(parse(&longer).is_err(), "error then not: {buf:?} {longer:?}"),
        }
        kind
    }

    #[test]
    fn fuzz_no_panic() {
        let mut seeds: Vec<Vec<u8>> = vec![
            b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 25\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.1 65535 0\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            v2(0x21, 0x11, &v4_block()),
            v2(0x21, 0x21, &v6_block()),
            v2(0x20, 0x00, &[]),
            v2(0x21, 0x31, &[0; 216]),
        ];
        let mut with_tlvs = v4_block();
        with_tlvs.extend_from_slice(&tlvs());
        seeds.push(v2(0x21, 0x11, &with_tlvs));
        const TOKENS: &[&[u8]] = &[
            b"TCP4",
            b"TCP6",
            b"UNKNOWN",
            b" ",
            b" ",
            b" ",
            b"192.0.2.1",
            b"::1",
            b"2001:db8::",
            b"65535",
            b"65536",
            b"0",
            b"25",
            b"\r\n",
            b"\r",
            b"\n",
            b":",
            b".",
            b"9",
            b"ffff",
            b"+",
            b"-",
            b"\0",
        ];

        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut outcomes = [0usize; 3];
        for round in 0..20_000 {
            let mut buf = match round % 3 {
                0 => {
                    // Random bytes, mostly starting the way a header would.
                    let mut b: Vec<u8> = (0..rng.below(64)).map(|_| rng.byte()).collect();
                    match (rng.below(3), b.first_mut()) {
                        (0, Some(first)) => *first = b'P',
                        (1, Some(_)) => b.splice(..1, V2_SIGNATURE).for_each(drop),
                        _ => {}
                    }
                    b
                }
                1 => {
                    // A valid header, mutated.
                    let mut b = seeds[rng.below(seeds.len())].clone();
                    for _ in 0..=rng.below(4) {
                        let at = rng.below(b.len() + 1);
                        match rng.below(5) {
                            0 if at < b.len() => b[at] ^= 1 << rng.below(8),
                            1 if at < b.len() => b[at] = rng.byte(),
                            2 if at < b.len() => {
                                b.remove(at);
                            }
                            3 => b.insert(at, rng.byte()),
                            _ => b.truncate(at),
                        }
                    }
                    b
                }
                _ => {
                    // v1-looking token soup.
                    let mut b = b"PROXY ".to_vec();
                    for _ in 0..rng.below(16) {
                        b.extend_from_slice(TOKENS[rng.below(TOKENS.len())]);
                    }
                    b
                }
            };
            if rng.below(4) == 0 {
                buf.extend_from_slice(b"EHLO x\r\n");
            }
            outcomes[check_invariants(&buf, &mut rng)] += 1;
        }
        // The generator must reach all three outcomes, not just bounce off the first byte.
        assert!(
            outcomes.iter().all(|&n| n >= 500),
            "outcomes (done, need more, error): {outcomes:?}"
        );
    }
}
