//! The `attachments` check (`[checks.attachments]`): refuses messages carrying dangerous
//! files, recognised by name, by declared MIME type and by content, also inside zip archives
//! and attached messages.
//!
//! # What is looked at
//!
//! Every MIME part (except multipart containers), including those of attached
//! `message/rfc822` messages up to `max_message_depth` deep:
//!
//! - **Names**: every `filename` of `Content-Disposition` and every `name` of `Content-Type`
//!   (both, since mail clients disagree on which wins), RFC 2231 (`filename*=utf-8''…`,
//!   continuations) and RFC 2047 (`=?utf-8?b?…?=`) forms decoded. A name is normalised as
//!   Windows would save it: the last path component (`/` and `\`), trailing dots, spaces and
//!   control characters removed, lower case; a name with a NUL is also checked as cut at the
//!   NUL. A name is blocked when it ends with `.EXT` for a blocked extension, so double
//!   extensions (`invoice.pdf.exe`) are caught by their last one, and unless it ends with an
//!   allowed one.
//! - **Declared type**: the part's `Content-Type` against `blocked_mime_types`.
//! - **Content** (`sniff`): executables whatever their name: Windows PE (`MZ` with a `PE`,
//!   `NE`, `LE` or `LX` header where `e_lfanew` points), ELF, Mach-O (and Java class files,
//!   which share the universal Mach-O magic), Windows shortcuts (`.lnk`). An executable is
//!   refused even when its name's extension is allowed, unless that extension is itself an
//!   executable one ([`EXECUTABLE_EXTENSIONS`]): allowing `exe` lets `setup.exe` through, allowing
//!   `pdf` does not let a PE named `invoice.pdf` through. Parts declared as text are decoded
//!   again as bytes for this, so a binary labelled `text/plain` is still seen.
//! - **Zip archives** (`scan_archives`; recognised by their magic bytes or a `.zip` name, so
//!   also `.docx`, `.jar`, …): the central directory only — entry names are checked like
//!   attachment names, and an encrypted entry flags the archive (`encrypted_archives`; names
//!   are readable even then). The first [`HEAD_BYTES`] of each of the first
//!   [`MAX_SNIFFED_ENTRIES`] entries are inflated to sniff executables and find nested zips.
//!   A nested zip is inflated (to be opened in turn) only when it is at most `max_nested_size`,
//!   its declared compression ratio at most `max_ratio`, its inflated size stays within what
//!   it declared, and the message's total stays within `max_total_inflated`; the top-level
//!   archive is never inflated. Archives nested deeper than `max_archive_depth` are not opened.
//!
//! Whatever could not be fully inspected — a corrupt archive, a nested archive over a limit
//! (a zip bomb), too deep, more than [`MAX_ZIP_ENTRIES`] entries, too many MIME parts, attached
//! messages nested too deep or unparseable — is a finding for `unscannable`.
//!
//! # Verdict
//!
//! Each finding has an action: blocked names, types and sniffed executables `action`, encrypted
//! archives `encrypted_archives`, the rest `unscannable`. The strongest action found decides
//! (reject, then tempfail, then score, then monitor; the first among equals); the look stops at
//! the first finding whose action is `reject`. Replies are `552 5.7.1 Message refused:
//! attachment type .exe not accepted`, `… executable attachment not accepted`, `… encrypted
//! archive not accepted`, `… attachment cannot be inspected` (`452 4.7.1` for `tempfail`);
//! they never echo a file name (the log has it).
//!
//! Not looked into: other archive formats (rar, 7z, tar, gz, cab — block them by extension if
//! wanted), zip entries compressed with other methods than stored and deflate (checked by name
//! only; a nested `.zip` so compressed is unscannable), TNEF (`winmail.dat`), uuencoded
//! bodies, documents' embedded objects.

use std::borrow::Cow;
use std::io::{Cursor, Read};
use std::ops::ControlFlow;
use std::sync::Arc;

use mail_parser::parsers::MessageStream;
use mail_parser::{Encoding, HeaderName, Message, MessagePart, MimeHeaders, PartType};
use serde::{Deserialize, Serialize};

use super::content::{INLINE_LIMIT, MessageView, SharedMessage, WalkEnd, walk};
use super::helo::optional_action;
use super::{BoxFuture, Category, Check, CheckAction, CheckError, Context, Refusal, Stage, Verdict};
use crate::config::bytesize;
use crate::smtp::codec::Reply;

/// Default `blocked_extensions`: executables, scripts, installers, shortcuts and disk images
/// that run (or mount and run) on a double click — Gmail's blocked list plus the usual
/// gateway additions (`reg`, `url`, `vhdx`, `wsh`, `settingcontent-ms`, …).
pub const DEFAULT_BLOCKED_EXTENSIONS: &[&str] = &[
    "ade",
    "adp",
    "apk",
    "app",
    "appref-ms",
    "appx",
    "appxbundle",
    "application",
    "bas",
    "bat",
    "cab",
    "chm",
    "cmd",
    "com",
    "cpl",
    "diagcab",
    "dll",
    "dmg",
    "exe",
    "gadget",
    "hta",
    "img",
    "inf",
    "ins",
    "iso",
    "isp",
    "jar",
    "jnlp",
    "js",
    "jse",
    "lib",
    "lnk",
    "mde",
    "mjs",
    "msc",
    "msi",
    "msix",
    "msixbundle",
    "msp",
    "mst",
    "nsh",
    "pif",
    "ps1",
    "psm1",
    "reg",
    "scf",
    "scr",
    "sct",
    "settingcontent-ms",
    "shb",
    "sys",
    "url",
    "vb",
    "vbe",
    "vbs",
    "vhd",
    "vhdx",
    "vxd",
    "wsc",
    "wsf",
    "wsh",
    "xll",
];

/// Default `blocked_mime_types`: the types senders declare for Windows executables,
/// installers, HTML applications and shortcuts.
pub const DEFAULT_BLOCKED_MIME_TYPES: &[&str] = &[
    "application/x-msdownload",
    "application/x-msdos-program",
    "application/x-dosexec",
    "application/x-executable",
    "application/vnd.microsoft.portable-executable",
    "application/x-ms-installer",
    "application/x-msi",
    "application/hta",
    "application/x-ms-shortcut",
];

/// Extensions that name executable content: a sniffed executable whose name ends with one of
/// these passes when that extension is in `allowed_extensions`.
pub const EXECUTABLE_EXTENSIONS: &[&str] = &[
    "exe", "dll", "scr", "com", "cpl", "sys", "ocx", "drv", "efi", "pif", "mui", "ax", "so", "elf", "bin",
    "out", "run", "appimage", "ko", "o", "dylib", "bundle", "macho", "class", "lnk",
];

/// Bytes inflated from the start of each archive entry to sniff it.
pub const HEAD_BYTES: usize = 4096;
/// Entries per archive whose start is inflated; later ones are checked by name only.
pub const MAX_SNIFFED_ENTRIES: usize = 1000;
/// Entries per archive; an archive with more is unscannable (its directory alone would cost
/// hundreds of bytes of memory per entry).
pub const MAX_ZIP_ENTRIES: usize = 10_000;

/// `[checks.attachments]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttachmentsConfig {
    /// Run the check at all. Default true.
    pub enabled: bool,
    /// File name extensions refused (case-insensitive, without the dot; `tar.gz` style
    /// entries match the end of the name). Default [`DEFAULT_BLOCKED_EXTENSIONS`].
    pub blocked_extensions: Vec<String>,
    /// Extensions never refused for the name, even when blocked (e.g. `["iso"]` to accept
    /// disk images). Default none.
    pub allowed_extensions: Vec<String>,
    /// Declared types refused: `type/subtype` or `type/*`, case-insensitive. Default
    /// [`DEFAULT_BLOCKED_MIME_TYPES`].
    pub blocked_mime_types: Vec<String>,
    /// Recognise executables by their first bytes, whatever their name or type. Default true.
    pub sniff: bool,
    /// Look inside zip archives. Default true.
    pub scan_archives: bool,
    /// Archive levels opened: 1 = names in attached archives only, 2 = also in archives inside
    /// them, … (at most 8). Default 2.
    pub max_archive_depth: usize,
    /// Largest nested archive inflated to be opened. Default "10MiB".
    #[serde(with = "bytesize")]
    pub max_nested_size: u64,
    /// Largest declared compression ratio (inflated / compressed) of a nested archive that is
    /// inflated; a higher one is a zip bomb. Default 100.
    pub max_ratio: u64,
    /// Bytes inflated per message, all archives together. Default "32MiB".
    #[serde(with = "bytesize")]
    pub max_total_inflated: u64,
    /// Encrypted (password-protected) archives: `reject` (default), `tempfail`, `score:N`,
    /// `monitor` or `off`. Their names are still checked. Rejected by default because malware
    /// ships in them with the password in the message text, precisely so that gateways cannot
    /// look; sites that exchange encrypted archives set `off` or `score:N`.
    #[serde(with = "optional_action")]
    pub encrypted_archives: Option<CheckAction>,
    /// Archives or messages that could not be fully inspected (corrupt, over a limit, nested
    /// too deep, zip bombs): `reject` (default: what cannot be inspected could hide anything
    /// above; real mail almost never hits the limits), `tempfail`, `score:N`, `monitor` or
    /// `off`.
    #[serde(with = "optional_action")]
    pub unscannable: Option<CheckAction>,
    /// Look into attached messages (`message/rfc822`, `message/global`). Default true.
    pub message_rfc822: bool,
    /// Attached messages opened inside each other (at most 8). Default 3.
    pub max_message_depth: usize,
    /// MIME parts looked at per message, attached messages included. Default 1000.
    pub max_parts: usize,
    /// What a blocked name, type or executable does: `reject` (default), `tempfail`,
    /// `score:N` or `monitor`.
    pub action: CheckAction,
}

impl Default for AttachmentsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            blocked_extensions: DEFAULT_BLOCKED_EXTENSIONS.iter().map(|s| s.to_string()).collect(),
            allowed_extensions: Vec::new(),
            blocked_mime_types: DEFAULT_BLOCKED_MIME_TYPES.iter().map(|s| s.to_string()).collect(),
            sniff: true,
            scan_archives: true,
            max_archive_depth: 2,
            max_nested_size: 10 << 20,
            max_ratio: 100,
            max_total_inflated: 32 << 20,
            encrypted_archives: Some(CheckAction::Reject),
            unscannable: Some(CheckAction::Reject),
            message_rfc822: true,
            max_message_depth: 3,
            max_parts: 1000,
            action: CheckAction::Reject,
        }
    }
}

impl AttachmentsConfig {
    /// Every error, keyed (`checks.attachments.blocked_extensions[2]: …`).
    pub fn validate(&self) -> Vec<String> {
        AttachmentsCheck::build(self).err().unwrap_or_default()
    }
}

/// What was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A name ending with a blocked extension (as configured, lower case).
    Extension {
        extension: String,
        /// A part's name as normalised (see the module documentation); an archive entry's
        /// name as stored, with its path.
        name: String,
        /// The archive path it was found in (`outer.zip/inner.zip`), if any.
        archive: Option<String>,
    },
    /// A blocked declared type (the configured entry that matched).
    MimeType { mime_type: String, name: Option<String> },
    /// Executable content.
    Executable {
        kind: &'static str,
        name: Option<String>,
        archive: Option<String>,
    },
    /// A password-protected archive.
    Encrypted { archive: String },
    /// Something that could not be fully inspected.
    Unscannable { reason: String, name: Option<String> },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inside = |a: &Option<String>| a.as_ref().map(|a| format!(" in {a:?}")).unwrap_or_default();
        match self {
            Self::Extension {
                extension,
                name,
                archive,
            } => write!(f, "blocked extension .{extension}: {name:?}{}", inside(archive)),
            Self::MimeType { mime_type, name } => write!(f, "blocked type {mime_type}: {name:?}"),
            Self::Executable { kind, name, archive } => {
                write!(f, "{kind} executable: {name:?}{}", inside(archive))
            }
            Self::Encrypted { archive } => write!(f, "encrypted archive {archive:?}"),
            Self::Unscannable { reason, name } => write!(f, "cannot inspect {name:?}: {reason}"),
        }
    }
}

impl Finding {
    fn reply_text(&self) -> String {
        match self {
            Self::Extension { extension, .. } => {
                format!("Message refused: attachment type .{extension} not accepted")
            }
            Self::MimeType { mime_type, .. } => {
                format!("Message refused: attachment type {mime_type} not accepted")
            }
            Self::Executable { .. } => "Message refused: executable attachment not accepted".into(),
            Self::Encrypted { .. } => "Message refused: encrypted archive not accepted".into(),
            Self::Unscannable { .. } => "Message refused: attachment cannot be inspected".into(),
        }
    }
}

/// What the check found in one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// In the order found; the look stops after the first one whose action is `reject`.
    pub findings: Vec<Finding>,
    pub verdict: Verdict,
}

/// The compiled attachment policy.
#[derive(Debug)]
pub struct AttachmentsCheck {
    /// Shared with inspections running on the blocking pool.
    policy: Arc<Policy>,
}

#[derive(Debug)]
struct Policy {
    config: AttachmentsConfig,
    /// Lower case, with the leading dot: `.exe`.
    blocked: Vec<String>,
    allowed: Vec<String>,
    /// Lower case; `type/` for `type/*`.
    mime_types: Vec<String>,
}

fn normalize_extension(text: &str) -> Result<String, String> {
    let e = text.trim().trim_start_matches('.').to_lowercase();
    if e.is_empty()
        || e.len() > 32
        || e.starts_with('.')
        || e.ends_with('.')
        || !e
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "{text:?} is not an extension (letters, digits, '-', '_', such as \"exe\" or \"tar.gz\")"
        ));
    }
    Ok(e)
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
}

impl AttachmentsCheck {
    /// Validates and compiles the policy.
    ///
    /// # Errors
    /// Every bad entry, keyed (`checks.attachments.blocked_extensions[2]: …`).
    pub fn build(config: &AttachmentsConfig) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let extensions = |list: &[String], key: &str, errors: &mut Vec<String>| -> Vec<String> {
            list.iter()
                .enumerate()
                .filter_map(|(i, e)| match normalize_extension(e) {
                    Ok(e) => Some(format!(".{e}")),
                    Err(m) => {
                        errors.push(format!("checks.attachments.{key}[{i}]: {m}"));
                        None
                    }
                })
                .collect()
        };
        let blocked = extensions(&config.blocked_extensions, "blocked_extensions", &mut errors);
        let allowed = extensions(&config.allowed_extensions, "allowed_extensions", &mut errors);
        let mut mime_types = Vec::new();
        for (i, m) in config.blocked_mime_types.iter().enumerate() {
            let t = m.trim().to_ascii_lowercase();
            match t.split_once('/') {
                Some((ty, "*")) if is_token(ty) => mime_types.push(format!("{ty}/")),
                Some((ty, sub)) if is_token(ty) && is_token(sub) => mime_types.push(t),
                _ => errors.push(format!(
                    "checks.attachments.blocked_mime_types[{i}]: {m:?} is not a MIME type (type/subtype or type/*)"
                )),
            }
        }
        if !(1..=8).contains(&config.max_archive_depth) {
            errors.push("checks.attachments.max_archive_depth: must be between 1 and 8".into());
        }
        if config.max_message_depth > 8 {
            errors.push("checks.attachments.max_message_depth: must be at most 8".into());
        }
        if config.max_parts == 0 {
            errors.push("checks.attachments.max_parts: must be at least 1".into());
        }
        if config.max_ratio == 0 {
            errors.push("checks.attachments.max_ratio: must be at least 1".into());
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            policy: Arc::new(Policy {
                config: config.clone(),
                blocked,
                allowed,
                mime_types,
            }),
        })
    }

    /// Inspects one message (the unstuffed DATA). Synchronous; [`Check::check`] runs it on the
    /// blocking pool for big messages.
    pub fn inspect(&self, message: &[u8]) -> Outcome {
        self.policy.inspect(&SharedMessage::new(message))
    }
}

impl Policy {
    fn inspect(&self, message: &dyn MessageView) -> Outcome {
        let mut scan = Scan {
            check: self,
            findings: Vec::new(),
            stop: false,
            inflated: 0,
        };
        scan.message(message);
        let verdict = self.verdict(&scan.findings);
        Outcome {
            findings: scan.findings,
            verdict,
        }
    }

    fn action_for(&self, finding: &Finding) -> Option<CheckAction> {
        match finding {
            Finding::Encrypted { .. } => self.config.encrypted_archives,
            Finding::Unscannable { .. } => self.config.unscannable,
            _ => Some(self.config.action),
        }
    }

    fn verdict(&self, findings: &[Finding]) -> Verdict {
        let rank = |a: CheckAction| match a {
            CheckAction::Reject => 3,
            CheckAction::TempFail => 2,
            CheckAction::Score(_) => 1,
            CheckAction::Monitor => 0,
        };
        let mut best: Option<(CheckAction, &Finding)> = None;
        for f in findings {
            if let Some(a) = self.action_for(f)
                && best.is_none_or(|(b, _)| rank(a) > rank(b))
            {
                best = Some((a, f));
            }
        }
        match best {
            Some((action, finding)) => action.verdict(Refusal {
                reply: Reply::build(552, "5.7.1", finding.reply_text()),
                category: Category::Attachment,
            }),
            None => Verdict::Pass,
        }
    }

    /// The blocked extension a (normalised) name ends with, unless an allowed one matches.
    fn blocked_extension(&self, name: &str) -> Option<&str> {
        if self.allowed.iter().any(|a| name.ends_with(a.as_str())) {
            return None;
        }
        self.blocked
            .iter()
            .find(|b| name.ends_with(b.as_str()) && name.len() > b.len())
            .map(|b| &b[1..])
    }

    /// True when a sniffed executable named `name` is let through by the allow-list.
    fn executable_allowed(&self, names: &[String]) -> bool {
        names.iter().any(|n| {
            self.allowed
                .iter()
                .any(|a| n.ends_with(a.as_str()) && EXECUTABLE_EXTENSIONS.iter().any(|e| a[1..] == **e))
        })
    }
}

/// The state of one message's inspection.
struct Scan<'c> {
    check: &'c Policy,
    findings: Vec<Finding>,
    /// A finding whose action is `reject` was made: nothing can change the verdict.
    stop: bool,
    /// Bytes inflated so far (heads and nested archives).
    inflated: u64,
}

impl Scan<'_> {
    fn found(&mut self, finding: Finding) {
        if self.check.action_for(&finding).is_none() {
            return;
        }
        if self.check.action_for(&finding) == Some(CheckAction::Reject) {
            self.stop = true;
        }
        self.findings.push(finding);
    }

    fn unscannable(&mut self, reason: impl Into<String>, name: Option<String>) {
        self.found(Finding::Unscannable {
            reason: reason.into(),
            name,
        });
    }

    fn message(&mut self, view: &dyn MessageView) {
        let config = &self.check.config;
        if !view.fits(config.max_parts) {
            self.unscannable("too many MIME parts, header lines or attached messages", None);
            return;
        }
        let Some(parsed) = view.parsed() else {
            return;
        };
        let depth = if config.message_rfc822 {
            config.max_message_depth
        } else {
            0
        };
        let end = walk(parsed, depth, config.max_parts, |msg, part, _| {
            self.part(msg, part);
            if self.stop {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        match end {
            WalkEnd::TooDeep if config.message_rfc822 => {
                self.unscannable("attached messages nested too deep", None);
            }
            WalkEnd::TooManyParts => self.unscannable("too many MIME parts", None),
            _ => {}
        }
    }

    fn part(&mut self, msg: &Message<'_>, part: &MessagePart<'_>) {
        if matches!(part.body, PartType::Multipart(_)) {
            return;
        }
        let names = part_names(part);
        let shown = names.first().cloned();
        for name in &names {
            if let Some(ext) = self.check.blocked_extension(name) {
                self.found(Finding::Extension {
                    extension: ext.to_string(),
                    name: name.clone(),
                    archive: None,
                });
                return;
            }
        }
        let declared = part.content_type().map(|ct| {
            format!(
                "{}/{}",
                ct.ctype().to_ascii_lowercase(),
                ct.subtype().unwrap_or("").to_ascii_lowercase()
            )
        });
        if let Some(t) = &declared
            && let Some(m) = self.check.mime_types.iter().find(|m| {
                if m.ends_with('/') {
                    t.starts_with(m.as_str())
                } else {
                    t == *m
                }
            })
        {
            self.found(Finding::MimeType {
                mime_type: m.trim_end_matches('/').to_string() + if m.ends_with('/') { "/*" } else { "" },
                name: shown,
            });
            return;
        }
        if let PartType::Message(_) = part.body {
            return;
        }
        if self.check.config.message_rfc822
            && declared
                .as_deref()
                .is_some_and(|t| t == "message/rfc822" || t == "message/global")
            && matches!(part.body, PartType::Binary(_) | PartType::InlineBinary(_))
        {
            // mail-parser opens at most three levels of base64/QP-encoded messages and leaves a
            // deeper one as bytes: what it did not open was not inspected. (One without any
            // header comes out as text and is sniffed like any part.)
            self.unscannable("attached message could not be parsed", shown);
            return;
        }
        if !(self.check.config.sniff || self.check.config.scan_archives) {
            return;
        }
        let Some(head) = part_bytes(msg, part, Some(HEAD_BYTES)) else {
            return;
        };
        if self.check.config.sniff
            && let Some(kind) = sniff(&head)
            && !self.check.executable_allowed(&names)
        {
            self.found(Finding::Executable {
                kind,
                name: shown,
                archive: None,
            });
            return;
        }
        let zip_named = names.iter().any(|n| n.ends_with(".zip"));
        if self.check.config.scan_archives && (is_zip(&head) || zip_named) {
            let label = shown.clone().unwrap_or_else(|| "(unnamed archive)".into());
            if let Some(data) = part_bytes(msg, part, None) {
                self.zip(&data, 1, &label);
            }
        }
    }

    /// Looks into one zip archive at `depth` (1 = attached directly).
    fn zip(&mut self, data: &[u8], depth: usize, path: &str) {
        let config = &self.check.config;
        if count(data, b"PK\x01\x02") > MAX_ZIP_ENTRIES {
            self.unscannable(
                format!("more than {MAX_ZIP_ENTRIES} archive entries"),
                Some(path.into()),
            );
            return;
        }
        let mut archive = match zip::ZipArchive::new(Cursor::new(data)) {
            Ok(a) => a,
            Err(e) => {
                self.unscannable(format!("not a readable zip archive: {e}"), Some(path.into()));
                return;
            }
        };
        let mut encrypted = false;
        for i in 0..archive.len() {
            if self.stop {
                return;
            }
            let (name, is_dir, entry_encrypted, size, compressed) = match archive.by_index_data(i) {
                Ok(e) => (
                    e.name()
                        .map(|n| n.into_owned())
                        .unwrap_or_else(|_| String::from_utf8_lossy(e.name_raw()).into_owned()),
                    e.is_dir(),
                    e.encrypted(),
                    e.size(),
                    e.compressed_size(),
                ),
                Err(_) => continue,
            };
            if entry_encrypted && !encrypted {
                encrypted = true;
                self.found(Finding::Encrypted {
                    archive: path.to_string(),
                });
            }
            if is_dir {
                continue;
            }
            let names = normalize_name(&name);
            if let Some(ext) = names.iter().find_map(|n| self.check.blocked_extension(n)) {
                self.found(Finding::Extension {
                    extension: ext.to_string(),
                    name: name.clone(),
                    archive: Some(path.to_string()),
                });
                continue;
            }
            if entry_encrypted || i >= MAX_SNIFFED_ENTRIES || self.inflated >= config.max_total_inflated {
                continue;
            }
            let head_len = (HEAD_BYTES as u64).min(config.max_total_inflated - self.inflated);
            let Ok(head) = read_entry(&mut archive, i, head_len) else {
                // Compressed with a method we do not inflate (bzip2, lzma, …): a nested archive
                // stays unopened, anything else keeps its name check only.
                if names.iter().any(|n| n.ends_with(".zip")) {
                    self.unscannable("nested archive cannot be read", Some(format!("{path}/{name}")));
                }
                continue;
            };
            self.inflated += head.len() as u64;
            if config.sniff
                && let Some(kind) = sniff(&head)
                && !self.check.executable_allowed(&names)
            {
                self.found(Finding::Executable {
                    kind,
                    name: Some(name.clone()),
                    archive: Some(path.to_string()),
                });
                continue;
            }
            if !(is_zip(&head) || names.iter().any(|n| n.ends_with(".zip"))) {
                continue;
            }
            let inner = format!("{path}/{name}");
            if depth >= config.max_archive_depth {
                self.unscannable("archive nested too deep", Some(inner));
            } else if size > config.max_nested_size {
                self.unscannable("nested archive too large", Some(inner));
            } else if size / compressed.max(1) > config.max_ratio {
                self.unscannable("nested archive compressed too well (zip bomb)", Some(inner));
            } else if self.inflated + size > config.max_total_inflated {
                self.unscannable("too much to inflate", Some(inner));
            } else {
                // Read one byte more than declared: an entry that inflates past its declared
                // size lies about it (a bomb) and is not opened.
                match read_entry(&mut archive, i, size + 1) {
                    Ok(bytes) if bytes.len() as u64 <= size => {
                        self.inflated += bytes.len() as u64;
                        self.zip(&bytes, depth + 1, &inner);
                    }
                    Ok(_) => self.unscannable("nested archive larger than declared", Some(inner)),
                    Err(_) => self.unscannable("nested archive cannot be read", Some(inner)),
                }
            }
        }
    }
}

/// Inflates at most `limit` bytes of entry `i`.
fn read_entry(
    archive: &mut zip::ZipArchive<Cursor<&[u8]>>,
    i: usize,
    limit: u64,
) -> std::io::Result<Vec<u8>> {
    let file = archive.by_index(i).map_err(std::io::Error::other)?;
    let mut out = Vec::with_capacity(usize::try_from(limit.min(1 << 20)).unwrap_or(0));
    file.take(limit).read_to_end(&mut out)?;
    Ok(out)
}

/// Non-overlapping occurrences of `needle` in `hay`.
fn count(hay: &[u8], needle: &[u8]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while let Some(p) = hay
        .get(i..)
        .and_then(|h| h.windows(needle.len()).position(|w| w == needle))
    {
        n += 1;
        i += p + needle.len();
    }
    n
}

fn is_zip(head: &[u8]) -> bool {
    head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") || head.starts_with(b"PK\x07\x08")
}

/// The kind of executable `head` (the start of a file) is, if it is one.
pub fn sniff(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"MZ") {
        // `e_lfanew` at 0x3c points to the new header; plain text that happens to start with
        // "MZ" has none. Beyond what was read, assume the worst.
        let Some(off) = head
            .get(0x3c..0x40)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        else {
            return Some("Windows");
        };
        return match head.get(off..off + 2) {
            Some(b"PE" | b"NE" | b"LE" | b"LX") => Some("Windows"),
            Some(_) => None,
            None if off < (1 << 20) && head.len() >= HEAD_BYTES => Some("Windows"),
            None => None,
        };
    }
    if head.starts_with(b"\x7fELF") {
        return Some("ELF");
    }
    const MACHO: [&[u8]; 5] = [
        b"\xfe\xed\xfa\xce",
        b"\xfe\xed\xfa\xcf",
        b"\xce\xfa\xed\xfe",
        b"\xcf\xfa\xed\xfe",
        b"\xca\xfe\xba\xbe",
    ];
    if MACHO.iter().any(|m| head.starts_with(m)) {
        return Some("Mach-O");
    }
    if head.starts_with(b"\x4c\x00\x00\x00\x01\x14\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46") {
        return Some("Windows shortcut");
    }
    None
}

/// Every name the part is given, normalised (see the module documentation).
fn part_names(part: &MessagePart<'_>) -> Vec<String> {
    let mut names = Vec::new();
    for h in &part.headers {
        if !matches!(h.name, HeaderName::ContentType | HeaderName::ContentDisposition) {
            continue;
        }
        let Some(attributes) = h.value.as_content_type().and_then(|ct| ct.attributes()) else {
            continue;
        };
        for a in attributes {
            // RFC 2231 names arrive merged as `filename`/`name`; a stray `filename*` or
            // `filename*0` form is taken too.
            let key = a.name.to_ascii_lowercase();
            let base = key.split('*').next().unwrap_or("");
            if base == "filename" || base == "name" {
                for n in normalize_name(&a.value) {
                    if !names.contains(&n) {
                        names.push(n);
                    }
                }
            }
        }
    }
    names
}

/// The forms of a file name to check: as Windows would save it, and cut at a NUL.
pub fn normalize_name(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut one = |n: &str| {
        let n = n.rsplit(['/', '\\']).next().unwrap_or(n);
        let n = n.trim_end_matches(|c: char| c == '.' || c.is_whitespace() || c.is_control());
        let n = n.trim_start_matches(|c: char| c.is_whitespace() || c.is_control());
        if !n.is_empty() {
            let n = n.to_lowercase();
            if !out.contains(&n) {
                out.push(n);
            }
        }
    };
    one(name);
    if let Some((cut, _)) = name.split_once('\0') {
        one(cut);
    }
    out
}

/// The decoded bytes of a leaf part, at most about `limit` of them. Binary parts are decoded by
/// the parser already; text parts were converted to UTF-8, so they are decoded again from the
/// raw message (a binary declared as text must be seen as bytes).
fn part_bytes<'a>(
    msg: &'a Message<'_>,
    part: &'a MessagePart<'_>,
    limit: Option<usize>,
) -> Option<Cow<'a, [u8]>> {
    match &part.body {
        PartType::Binary(b) | PartType::InlineBinary(b) => {
            let b: &[u8] = b.as_ref();
            Some(Cow::Borrowed(&b[..limit.unwrap_or(b.len()).min(b.len())]))
        }
        PartType::Text(_) | PartType::Html(_) => {
            let raw = msg.raw_message.as_ref();
            let start = (part.offset_body as usize).min(raw.len());
            let end = (part.offset_end as usize).clamp(start, raw.len());
            // Enough encoded text for `limit` decoded bytes: base64 takes 4 for 3 plus line
            // breaks, quoted-printable at most 3 for 1.
            let end = limit.map_or(end, |l| end.min(start.saturating_add(l.saturating_mul(3) + 128)));
            let slice = &raw[start..end];
            let decoded: Cow<'a, [u8]> = match part.encoding {
                Encoding::Base64 => match MessageStream::new(slice).decode_base64_mime(b"") {
                    (usize::MAX, _) => return None,
                    (_, bytes) => Cow::Owned(bytes.into_owned()),
                },
                Encoding::QuotedPrintable => {
                    match MessageStream::new(slice).decode_quoted_printable_mime(b"") {
                        (usize::MAX, _) => return None,
                        (_, bytes) => Cow::Owned(bytes.into_owned()),
                    }
                }
                Encoding::None => Cow::Borrowed(slice),
            };
            Some(match (decoded, limit) {
                (Cow::Borrowed(b), Some(l)) => Cow::Borrowed(&b[..l.min(b.len())]),
                (Cow::Owned(mut v), Some(l)) => {
                    v.truncate(l);
                    Cow::Owned(v)
                }
                (d, None) => d,
            })
        }
        PartType::Message(_) | PartType::Multipart(_) => None,
    }
}

impl Check for AttachmentsCheck {
    fn name(&self) -> &'static str {
        "attachments"
    }

    fn stages(&self) -> &'static [Stage] {
        &[Stage::Data]
    }

    fn check<'a>(&'a self, cx: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>> {
        Box::pin(async move {
            // Authenticated senders are our own users: not filtered (DESIGN.md).
            let Some(message) = cx
                .message
                .filter(|_| self.policy.config.enabled && cx.session.authenticated.is_none())
            else {
                return Ok(Verdict::Skip);
            };
            let outcome = if message.raw().len() <= INLINE_LIMIT {
                self.policy.inspect(message)
            } else {
                // Parsing and inflating a big message takes milliseconds: off the runtime
                // worker, with a copy of the message.
                let policy = Arc::clone(&self.policy);
                let bytes = message.raw().to_vec();
                tokio::task::spawn_blocking(move || policy.inspect(&SharedMessage::new(&bytes)))
                    .await
                    .map_err(|e| CheckError(format!("attachment inspection failed: {e}")))?
            };
            for f in &outcome.findings {
                tracing::info!(session = %cx.session.id, finding = %f, "Attachment finding.");
            }
            Ok(outcome.verdict)
        })
    }
}
