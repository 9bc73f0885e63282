//! Migration URIs: `fd:NAME`, `unix:PATH`, `tcp:HOST:PORT` and `file:PATH[,offset=N]`
//! (PATH may be `/dev/fdset/N`, a set of fds given with `add-fd`).

use std::path::PathBuf;
use std::str::FromStr;

use super::TransportError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Uri {
    Fd(String),
    Unix(PathBuf),
    Tcp(String),
    File(FileUri),
}

/// `file:PATH[,offset=N]`: the stream starts N bytes into the file (libvirt writes its own
/// header before it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileUri {
    pub(crate) path: PathBuf,
    pub(crate) offset: u64,
}

/// QEMU's `/dev/fdset/` prefix: the file is one of the fds of that set (`add-fd`).
const FDSET_PREFIX: &str = "/dev/fdset/";

impl FileUri {
    pub(crate) fn new(path: impl Into<PathBuf>) -> Self {
        FileUri {
            path: path.into(),
            offset: 0,
        }
    }

    /// The fdset id when PATH is `/dev/fdset/N`.
    pub(crate) fn fdset(&self) -> Option<u64> {
        self.path
            .to_str()?
            .strip_prefix(FDSET_PREFIX)?
            .parse::<u64>()
            .ok()
    }
}

/// QEMU's `qemu_strtosz`, as `file:` offsets take it: a decimal number with an optional
/// binary suffix (B, K, M, G, T, P, E), or a hexadecimal one (0x...) without.
fn parse_size(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).ok();
    }
    let (num, shift) = match s.as_bytes().last()? {
        c if c.is_ascii_digit() => (s, 0),
        c => {
            let shift = match c.to_ascii_uppercase() {
                b'B' => 0,
                b'K' => 10,
                b'M' => 20,
                b'G' => 30,
                b'T' => 40,
                b'P' => 50,
                b'E' => 60,
                _ => return None,
            };
            (&s[..s.len() - 1], shift)
        }
    };
    num.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

impl FromStr for Uri {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TransportError::BadUri(s.to_string());
        let (scheme, rest) = s.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        if scheme == "file" || scheme == "unix" {
            let path = rest.split(",offset=").next().unwrap_or(rest);
            crate::sandbox::note_path(std::path::Path::new(path));
        }
        Ok(match scheme {
            "fd" => Uri::Fd(rest.to_string()),
            "unix" => Uri::Unix(PathBuf::from(rest)),
            "tcp" => {
                // HOST:PORT with a numeric port; [v6]:PORT too.
                let (_, port) = rest.rsplit_once(':').ok_or_else(bad)?;
                port.parse::<u16>().map_err(|_| bad())?;
                Uri::Tcp(rest.to_string())
            }
            "file" => match rest.split_once(",offset=") {
                None => Uri::File(FileUri::new(rest)),
                Some((path, off)) if !path.is_empty() => Uri::File(FileUri {
                    path: PathBuf::from(path),
                    offset: parse_size(off).ok_or_else(|| {
                        TransportError::BadUri(format!("{s} (file URI has bad offset {off})"))
                    })?,
                }),
                Some(_) => return Err(bad()),
            },
            _ => return Err(bad()),
        })
    }
}

impl std::fmt::Display for Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Uri::Fd(n) => write!(f, "fd:{n}"),
            Uri::Unix(p) => write!(f, "unix:{}", p.display()),
            Uri::Tcp(a) => write!(f, "tcp:{a}"),
            Uri::File(FileUri { path, offset: 0 }) => write!(f, "file:{}", path.display()),
            Uri::File(FileUri { path, offset }) => {
                write!(f, "file:{},offset={offset}", path.display())
            }
        }
    }
}
