//! QEMU version and machine-type differences, and the wire constants.
//!
//! Everything that differs between the QEMU releases the helper talks to (10.0 and 7.2) is
//! decided here, so that the codecs and the state machine ask one place.

pub mod wire;

use std::fmt;
use std::str::FromStr;

/// A QEMU release, `MAJOR.MINOR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
}

impl QemuVersion {
    pub const V7_2: QemuVersion = QemuVersion { major: 7, minor: 2 };
    pub const V10_0: QemuVersion = QemuVersion {
        major: 10,
        minor: 0,
    };
    /// The versions the helper is tested against.
    pub const SUPPORTED: [QemuVersion; 2] = [Self::V7_2, Self::V10_0];

    /// Whether a stream that must be readable by this version may carry
    /// `SWITCHOVER_START`: 7.2 rejects the command as unknown.
    pub fn accepts_switchover_start(self) -> bool {
        self >= QemuVersion { major: 9, minor: 1 }
    }

    /// Whether the VM description carries a `configuration` key (10.0 does, 7.2 not).
    pub fn vmdesc_has_configuration(self) -> bool {
        self >= QemuVersion { major: 8, minor: 2 }
    }

    /// Multifd: whether every RAM section ends with a sync of the channels (and no
    /// `MULTIFD_FLUSH` record is sent), as QEMU 8.0 and older do (`hw_compat_8_0`:
    /// `multifd-flush-after-each-section=on`); newer ones sync once per dirty-scan round.
    pub fn multifd_flush_after_each_section(self) -> bool {
        self <= QemuVersion { major: 8, minor: 0 }
    }

    /// The `zero-page-detection` default: `legacy` (zero pages as ZERO records on the main
    /// channel) up to 8.2 (`hw_compat_8_2`), `multifd` (in the packets) since 9.0.
    pub fn default_zero_page_detection(self) -> ZeroPageDetection {
        if self <= (QemuVersion { major: 8, minor: 2 }) {
            ZeroPageDetection::Legacy
        } else {
            ZeroPageDetection::Multifd
        }
    }

    /// Multifd under TLS: whether the destination requires each channel's TLS session to end
    /// with close_notify (`multifd-clean-tls-termination`, on since 10.0; `hw_compat_9_2`
    /// turns it off), so that a cut mid-stream is not taken for the end.
    pub fn multifd_clean_tls_termination(self) -> bool {
        self >= Self::V10_0
    }

    /// Whether multifd and postcopy-ram may be on together: QEMU 10.1 stops the multifd
    /// channels when postcopy starts; 10.0 refuses the combination.
    pub fn multifd_with_postcopy(self) -> bool {
        self >= QemuVersion {
            major: 10,
            minor: 1,
        }
    }
}

/// QEMU's `zero-page-detection` parameter: who finds zero pages, and where they go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ZeroPageDetection {
    /// No detection: every page is sent with its data.
    None,
    /// The migration thread checks each page and sends a zero page as a ZERO record on the
    /// main channel (QEMU 8.2 and older, and every non-multifd migration).
    Legacy,
    /// The multifd sender checks the pages of a packet and lists the zero ones in it.
    Multifd,
}

impl ZeroPageDetection {
    pub const NAMES: [&'static str; 3] = ["none", "legacy", "multifd"];

    pub fn as_str(self) -> &'static str {
        match self {
            ZeroPageDetection::None => "none",
            ZeroPageDetection::Legacy => "legacy",
            ZeroPageDetection::Multifd => "multifd",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "none" => ZeroPageDetection::None,
            "legacy" => ZeroPageDetection::Legacy,
            "multifd" => ZeroPageDetection::Multifd,
            _ => return None,
        })
    }
}

/// The QEMU version of a versioned machine type (`pc-q35-8.0` -> 8.0); None for `none` and
/// unversioned aliases (`pc`, `q35`: the newest).
pub fn machine_version(machine: &str) -> Option<QemuVersion> {
    let (_, v) = machine.rsplit_once('-')?;
    let (a, b) = v.split_once('.')?;
    Some(QemuVersion {
        major: a.parse().ok()?,
        minor: b.parse().ok()?,
    })
}

/// The version whose compat properties apply: the older of `compat-version` and the
/// machine type's version (QEMU takes them from the machine type).
pub fn effective_version(compat: QemuVersion, machine: &str) -> QemuVersion {
    machine_version(machine).map_or(compat, |m| m.min(compat))
}

impl Default for QemuVersion {
    fn default() -> Self {
        Self::V10_0
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A `compat-version` string that is not `MAJOR.MINOR` of a supported release.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("compat-version {0:?} is not MAJOR.MINOR of a supported QEMU (7.2 or 10.0)")]
pub struct BadVersion(pub String);

impl FromStr for QemuVersion {
    type Err = BadVersion;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadVersion(s.to_string());
        let (a, b) = s.split_once('.').ok_or_else(bad)?;
        let v = QemuVersion {
            major: a.parse().map_err(|_| bad())?,
            minor: b.parse().map_err(|_| bad())?,
        };
        if v < Self::V7_2 || v.major > 10 {
            return Err(bad());
        }
        Ok(v)
    }
}

/// Whether a machine type sends `SWITCHOVER_START` in QEMU 10.0: only machine types of
/// 10.0 and later, and `none` (which has no versioned compat properties).
pub fn machine_sends_switchover_start(machine: &str) -> bool {
    if machine == "none" {
        return true;
    }
    // pc-i440fx-10.0, pc-q35-9.2, ...: the version is the last dash-separated part.
    match machine
        .rsplit_once('-')
        .map(|(_, v)| v.parse::<QemuVersion>())
    {
        Some(Ok(v)) => v >= QemuVersion::V10_0,
        // Unversioned aliases (pc, q35) resolve to the newest machine.
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_versions() {
        assert_eq!("10.0".parse::<QemuVersion>(), Ok(QemuVersion::V10_0));
        assert_eq!("7.2".parse::<QemuVersion>(), Ok(QemuVersion::V7_2));
        assert!("7".parse::<QemuVersion>().is_err());
        assert!("6.2".parse::<QemuVersion>().is_err());
        assert!("x.y".parse::<QemuVersion>().is_err());
        assert!(!QemuVersion::V7_2.accepts_switchover_start());
        assert!(QemuVersion::V10_0.accepts_switchover_start());
    }

    #[test]
    fn multifd_compat() {
        assert!(QemuVersion::V7_2.multifd_flush_after_each_section());
        assert!(!QemuVersion::V10_0.multifd_flush_after_each_section());
        assert_eq!(
            QemuVersion::V7_2.default_zero_page_detection(),
            ZeroPageDetection::Legacy
        );
        assert_eq!(
            QemuVersion::V10_0.default_zero_page_detection(),
            ZeroPageDetection::Multifd
        );
        assert!(!QemuVersion::V10_0.multifd_with_postcopy());
        assert!("10.1"
            .parse::<QemuVersion>()
            .expect("10.1")
            .multifd_with_postcopy());
        assert_eq!(
            effective_version(QemuVersion::V10_0, "pc-q35-8.0"),
            QemuVersion { major: 8, minor: 0 }
        );
        assert_eq!(
            effective_version(QemuVersion::V7_2, "q35"),
            QemuVersion::V7_2
        );
        assert_eq!(
            effective_version(QemuVersion::V10_0, "none"),
            QemuVersion::V10_0
        );
        for n in ZeroPageDetection::NAMES {
            assert_eq!(ZeroPageDetection::from_name(n).map(|z| z.as_str()), Some(n));
        }
    }

    #[test]
    fn switchover_start_by_machine() {
        assert!(machine_sends_switchover_start("none"));
        assert!(machine_sends_switchover_start("pc-q35-10.0"));
        assert!(!machine_sends_switchover_start("pc-i440fx-7.2"));
    }
}
