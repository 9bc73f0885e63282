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
    fn switchover_start_by_machine() {
        assert!(machine_sends_switchover_start("none"));
        assert!(machine_sends_switchover_start("pc-q35-10.0"));
        assert!(!machine_sends_switchover_start("pc-i440fx-7.2"));
    }
}
