//! QEMU's NBD URI syntax: `nbd://HOST[:PORT]/EXPORT`, `nbd+tcp://…` (the same) and
//! `nbd+unix:///EXPORT?socket=PATH`.
//!
//! The rules are QEMU's (`block/nbd.c`, `nbd_parse_uri`): the export name is the path without
//! its leading `/` (empty: the server's default export); tcp needs a host, takes no query and
//! defaults to port 10809; unix takes no host or port and exactly one query parameter,
//! `socket`. `%XX` escapes are decoded in the export name and the socket path.
//!
//! Parsed by hand: the grammar is this small, and a general URL crate would accept forms
//! (user info, fragments, several query parameters) that QEMU refuses.

use std::fmt;
use std::path::PathBuf;

/// The default NBD port (IANA).
pub const NBD_DEFAULT_PORT: u16 = 10809;

/// Where the NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// A TCP server.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket.
    Unix(PathBuf),
}

/// A parsed NBD URI: a server address and an export name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// The server.
    pub addr: NbdAddr,
    /// The export name ("" for the server's default export).
    pub export: String,
}

/// Why a string is not a valid NBD URI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid NBD URI '{uri}': {reason} (expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)")]
pub struct UriError {
    /// The URI as given.
    pub uri: String,
    /// What is wrong with it.
    pub reason: String,
}

impl NbdUri {
    /// Whether `s` names an NBD export rather than a host file (it starts with an NBD scheme).
    pub fn is_nbd(s: &str) -> bool {
        ["nbd://", "nbd+tcp://", "nbd+unix://", "nbd+rdma://"]
            .iter()
            .any(|p| s.starts_with(p))
    }

    /// Parses a URI with QEMU's rules.
    ///
    /// # Errors
    /// [`UriError`] naming what is wrong.
    pub fn parse(s: &str) -> Result<Self, UriError> {
        let bad = |reason: &str| UriError {
            uri: s.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let unix = match scheme {
            "nbd" | "nbd+tcp" => false,
            "nbd+unix" => true,
            "nbd+rdma" => return Err(bad("rdma transport is not supported")),
            _ => return Err(bad("unknown scheme")),
        };
        if rest.contains('#') {
            return Err(bad("fragments are not allowed"));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = decode(path).ok_or_else(|| bad("bad %-escape in the export name"))?;
        if authority.contains('@') {
            return Err(bad("user information is not allowed"));
        }
        let addr = if unix {
            if !authority.is_empty() {
                return Err(bad("nbd+unix takes no host or port"));
            }
            let q = query.ok_or_else(|| bad("nbd+unix needs ?socket=PATH"))?;
            let value = q
                .strip_prefix("socket=")
                .filter(|v| !v.contains('&'))
                .ok_or_else(|| bad("the only query parameter must be socket=PATH"))?;
            let path = decode(value).ok_or_else(|| bad("bad %-escape in the socket path"))?;
            if path.is_empty() {
                return Err(bad("empty socket path"));
            }
            NbdAddr::Unix(PathBuf::from(path))
        } else {
            if query.is_some() {
                return Err(bad("nbd:// takes no query parameters"));
            }
            let (host, port) = split_host_port(authority).ok_or_else(|| bad("bad host or port"))?;
            if host.is_empty() {
                return Err(bad("no host"));
            }
            NbdAddr::Tcp {
                host: host.to_string(),
                port: port.unwrap_or(NBD_DEFAULT_PORT),
            }
        };
        Ok(Self { addr, export })
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn split_host_port(a: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(r) = a.strip_prefix('[') {
        let (h, after) = r.split_once(']')?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':')?)),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return None,
            None => (a, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok().filter(|&p| p != 0)?),
        None => None,
    };
    Some((host, port))
}

/// Decodes `%XX` escapes; `None` on a malformed escape or a result that is not UTF-8.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.addr {
            NbdAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            NbdAddr::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            NbdAddr::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            addr: NbdAddr::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn accepts_qemu_forms() {
        assert_eq!(NbdUri::parse("nbd://h/e").unwrap(), tcp("h", 10809, "e"));
        assert_eq!(NbdUri::parse("nbd://h:1234/").unwrap(), tcp("h", 1234, ""));
        assert_eq!(NbdUri::parse("nbd+tcp://h:1").unwrap(), tcp("h", 1, ""));
        assert_eq!(
            NbdUri::parse("nbd://[::1]:99/a%20b").unwrap(),
            tcp("::1", 99, "a b")
        );
        let u = NbdUri::parse("nbd+unix:///disk?socket=/run/s%2B.sock").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/run/s+.sock".into()));
        assert_eq!(u.export, "disk");
        assert_eq!(u.to_string(), "nbd+unix:///disk?socket=/run/s+.sock");
    }

    #[test]
    fn refuses_what_qemu_refuses() {
        for bad in [
            "nbd:///e",
            "nbd://h/e?socket=/s",
            "nbd+unix:///e",
            "nbd+unix://h/e?socket=/s",
            "nbd+unix:///e?socket=/s&x=1",
            "nbd+unix:///e?path=/s",
            "nbd+rdma://h/e",
            "nbd://h:0/e",
            "nbd://h:99999/e",
            "nbd://u@h/e",
            "nbd://h/e%zz",
        ] {
            let e = NbdUri::parse(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert!(NbdUri::is_nbd("nbd+unix:///x?socket=/s"));
        assert!(!NbdUri::is_nbd("nbd.qcow2"));
    }
}
