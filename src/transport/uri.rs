//! Migration URIs: `fd:NAME`, `unix:PATH`, `tcp:HOST:PORT` and `file:PATH`.

use std::path::PathBuf;
use std::str::FromStr;

use super::TransportError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Uri {
    Fd(String),
    Unix(PathBuf),
    Tcp(String),
    File(PathBuf),
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
            crate::sandbox::note_path(std::path::Path::new(rest));
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
            // QEMU accepts file:PATH,offset=N; the helper writes and reads from offset 0 only.
            "file" if !rest.contains(",offset=") => Uri::File(PathBuf::from(rest)),
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
            Uri::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}
