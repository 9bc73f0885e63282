//! Capabilities and parameters: `migrate-set-capabilities`, `migrate-set-parameters` and
//! their queries.

use serde_json::{json, Value};

use super::{lock, Args, CmdResult, Helper};
use crate::compat::QemuVersion;
use crate::compat::ZeroPageDetection;
use crate::control::protocol::PARAMETERS;
use crate::control::qmp::QmpError;
use crate::engine::migration::{parse_uuid, Capabilities, Parameters};

/// Compression methods QEMU knows for `multifd-compression`; the helper only does `none`.
const QEMU_COMPRESSIONS: [&str; 5] = ["zlib", "zstd", "qpl", "uadk", "qatzip"];

/// QEMU 10.0 refuses multifd with postcopy-ram; 10.1 stops the multifd channels when postcopy
/// starts. Checked when either capability is set and again when a migration starts (since
/// `compat-version` may have changed in between).
pub(super) fn check_multifd_postcopy(caps: &Capabilities, p: &Parameters) -> Result<(), QmpError> {
    if caps.multifd && caps.postcopy_ram && !p.compat_version.multifd_with_postcopy() {
        return Err(QmpError::generic(
            "Postcopy is not yet compatible with multifd",
        ));
    }
    Ok(())
}

/// What a migration with the current settings would break, checked at `migrate` and
/// `migrate-incoming`.
pub(super) fn check_start(caps: &Capabilities, p: &Parameters) -> Result<(), QmpError> {
    check_multifd_postcopy(caps, p)?;
    let v = p.effective_version();
    // Before 9.0 a multifd receiver ignores the zero pages a packet lists, so the pages
    // would be left stale on such a peer (QEMU's hw_compat_8_2 makes it `legacy`).
    // Without multifd the setting means legacy detection, as in QEMU: harmless.
    if caps.multifd
        && p.zero_page_detection() == ZeroPageDetection::Multifd
        && v.default_zero_page_detection() != ZeroPageDetection::Multifd
    {
        return Err(QmpError::generic(format!(
            "zero-page-detection 'multifd' needs a peer of QEMU 9.0 or later (the effective \
             compat version is {v}): use 'legacy' or 'none'"
        )));
    }
    Ok(())
}

/// auto-converge's parameters, checked together with what is already set as QEMU checks
/// them (`max-cpu-throttle` against `cpu-throttle-initial`).
fn set_throttle_parameters(a: &Args<'_>, p: &mut Parameters) -> Result<(), QmpError> {
    let mut t = p.throttle;
    for (name, field) in [
        ("throttle-trigger-threshold", &mut t.trigger_threshold),
        ("cpu-throttle-initial", &mut t.initial),
        ("cpu-throttle-increment", &mut t.increment),
        ("max-cpu-throttle", &mut t.max),
    ] {
        if let Some(v) = a.opt_u64(name)? {
            *field = u8::try_from(v)
                .map_err(|_| QmpError::generic(format!("Parameter '{name}' expects uint8")))?;
        }
    }
    if let Some(v) = a.opt_bool("cpu-throttle-tailslow")? {
        t.tailslow = v;
    }
    crate::engine::throttle::check(&t).map_err(QmpError::generic)?;
    p.throttle = t;
    Ok(())
}

/// Longest `tls-creds`/`tls-hostname`/`tls-authz` taken (ids and host names are short).
const MAX_TLS_PARAMETER: usize = 255;

/// `tls-creds`, `tls-hostname`, `tls-authz`: QEMU's `StrOrNull` (null means ""), read when
/// a migration or a recovery starts, so they may change at any time; "" turns TLS off
/// (`tls-creds`), as libvirt does.
fn set_tls_parameters(a: &Args<'_>, p: &mut Parameters) -> Result<(), QmpError> {
    for (name, field) in [
        ("tls-creds", &mut p.tls_creds),
        ("tls-hostname", &mut p.tls_hostname),
        ("tls-authz", &mut p.tls_authz),
    ] {
        let v = match a.0.get(name) {
            None => continue,
            Some(Value::Null) => "",
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for '{name}', expected: string or null"
                )))
            }
        };
        if v.len() > MAX_TLS_PARAMETER {
            return Err(QmpError::generic(format!(
                "{name} must be at most {MAX_TLS_PARAMETER} bytes"
            )));
        }
        *field = v.to_string();
    }
    Ok(())
}

impl Helper {
    /// `migrate-set-capabilities`.
    pub(super) fn set_capabilities(&self, a: &Args<'_>) -> CmdResult {
        a.only(&["capabilities"])?;
        if self.busy() {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        let list =
            a.0.get("capabilities")
                .and_then(Value::as_array)
                .ok_or_else(|| QmpError::generic("Parameter 'capabilities' must be an array"))?;
        let mut caps = self.ctx.caps();
        for item in list {
            let o = item
                .as_object()
                .ok_or_else(|| QmpError::generic("each capability must be an object"))?;
            let ia = Args(o);
            ia.only(&["capability", "state"])?;
            let name = ia.str("capability")?;
            let on = ia
                .opt_bool("state")?
                .ok_or_else(|| QmpError::generic("Parameter 'state' is missing"))?;
            if !caps.set(name, on) {
                return Err(QmpError::generic(format!(
                    "Parameter 'capability' does not accept value '{name}'"
                )));
            }
        }
        check_multifd_postcopy(&caps, &self.ctx.params())?;
        *lock(&self.ctx.caps) = caps;
        Ok(json!({}))
    }

    /// `query-migrate-capabilities`.
    pub(super) fn query_capabilities(&self, a: &Args<'_>) -> CmdResult {
        a.only(&[])?;
        let caps = self.ctx.caps();
        Ok(Value::Array(
            Capabilities::NAMES
                .iter()
                .map(|n| json!({"capability": n, "state": caps.get(n).unwrap_or(false)}))
                .collect(),
        ))
    }

    /// `migrate-set-parameters`.
    pub(super) fn set_parameters(&self, a: &Args<'_>) -> CmdResult {
        a.only(PARAMETERS)?;
        let mut p = self.ctx.params();
        if let Some(v) = a.opt_u64("max-bandwidth")? {
            p.max_bandwidth = v;
        }
        if let Some(v) = a.opt_u64("downtime-limit")? {
            // QEMU's limit: 2000 s.
            if v > 2_000_000 {
                return Err(QmpError::generic("Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 milliseconds"));
            }
            p.downtime_limit = v;
        }
        if let Some(v) = a.opt_u64("max-postcopy-bandwidth")? {
            p.max_postcopy_bandwidth = v;
        }
        if let Some(v) = a.opt_u64("link-timeout")? {
            if v != 0 && v < 100 {
                return Err(QmpError::generic(
                    "link-timeout is 0 (off) or at least 100 ms",
                ));
            }
            p.link_timeout = v;
        }
        if let Some(v) = a.opt_u64("precopy-timeout")? {
            if v != 0 && v < 100 {
                return Err(QmpError::generic(
                    "precopy-timeout is 0 (off) or at least 100 ms",
                ));
            }
            p.precopy_timeout = v;
        }
        if let Some(v) = a.opt_u64("orphan-timeout")? {
            // At most a day: the helper must exit in bounded time after its parent.
            if v > 86_400_000 {
                return Err(QmpError::generic("orphan-timeout is 0 to 86400000 ms"));
            }
            p.orphan_timeout = v;
        }
        if let Some(v) = a.opt_u64("load-threads")? {
            let max = crate::memory::page_writer::MAX_THREADS;
            if v == 0 || v > max as u64 {
                return Err(QmpError::generic(format!(
                    "load-threads must be 1 to {max}"
                )));
            }
            // Read when a migration starts: a running one keeps its threads.
            p.load_threads = v as usize;
        }
        let running = self.busy();
        if let Some(m) = a.opt_str("machine-type")? {
            if running {
                return Err(QmpError::generic(
                    "machine-type cannot change while a migration is running",
                ));
            }
            if m.is_empty() || m.len() > 255 {
                return Err(QmpError::generic("machine-type must be 1 to 255 bytes"));
            }
            p.machine_type = m.to_string();
        }
        if let Some(v) = a.opt_str("compat-version")? {
            if running {
                return Err(QmpError::generic(
                    "compat-version cannot change while a migration is running",
                ));
            }
            p.compat_version = v
                .parse::<QemuVersion>()
                .map_err(|e| QmpError::generic(e.to_string()))?;
        }
        self.set_multifd_parameters(a, &mut p, running)?;
        set_tls_parameters(a, &mut p)?;
        // Read at each bitmap sync: a running migration follows a change.
        set_throttle_parameters(a, &mut p)?;
        // Read when the files are opened: a running migration keeps its fds.
        if let Some(v) = a.opt_bool("direct-io")? {
            p.direct_io = v;
        }
        *lock(&self.ctx.params) = p;
        Ok(json!({}))
    }

    /// `query-migrate-parameters`.
    pub(super) fn query_parameters(&self, a: &Args<'_>) -> CmdResult {
        a.only(&[])?;
        let p = self.ctx.params();
        Ok(json!({
            "max-bandwidth": p.max_bandwidth,
            "downtime-limit": p.downtime_limit,
            "max-postcopy-bandwidth": p.max_postcopy_bandwidth,
            "machine-type": p.machine_type,
            "compat-version": p.compat_version.to_string(),
            "link-timeout": p.link_timeout,
            "precopy-timeout": p.precopy_timeout,
            "orphan-timeout": p.orphan_timeout,
            "load-threads": p.load_threads,
            "multifd-channels": p.multifd_channels,
            "multifd-compression": "none",
            "zero-page-detection": p.zero_page_detection().as_str(),
            "vm-uuid": p.vm_uuid_string(),
            "tls-creds": p.tls_creds,
            "tls-hostname": p.tls_hostname,
            "tls-authz": p.tls_authz,
            "direct-io": p.direct_io,
            "throttle-trigger-threshold": p.throttle.trigger_threshold,
            "cpu-throttle-initial": p.throttle.initial,
            "cpu-throttle-increment": p.throttle.increment,
            "cpu-throttle-tailslow": p.throttle.tailslow,
            "max-cpu-throttle": p.throttle.max,
        }))
    }

    /// The multifd parameters of `migrate-set-parameters`, into `p`.
    fn set_multifd_parameters(
        &self,
        a: &Args<'_>,
        p: &mut Parameters,
        running: bool,
    ) -> Result<(), QmpError> {
        let refuse_running = |name: &str| {
            QmpError::generic(format!("{name} cannot change while a migration is running"))
        };
        if let Some(v) = a.opt_u64("multifd-channels")? {
            let n = u8::try_from(v).ok().filter(|&n| n >= 1).ok_or_else(|| {
                QmpError::generic("Parameter 'multifd_channels' expects a value between 1 and 255")
            })?;
            if running {
                return Err(refuse_running("multifd-channels"));
            }
            p.multifd_channels = n;
        }
        if let Some(v) = a.opt_str("multifd-compression")? {
            if QEMU_COMPRESSIONS.contains(&v) {
                return Err(QmpError::generic(format!(
                    "multifd-compression '{v}' is not supported by the helper (only 'none')"
                )));
            }
            if v != "none" {
                return Err(QmpError::generic(format!(
                    "Parameter 'multifd-compression' does not accept value '{v}'"
                )));
            }
        }
        if let Some(v) = a.opt_str("zero-page-detection")? {
            let z = ZeroPageDetection::from_name(v).ok_or_else(|| {
                QmpError::generic(format!(
                    "Parameter 'zero-page-detection' does not accept value '{v}'"
                ))
            })?;
            if running {
                return Err(refuse_running("zero-page-detection"));
            }
            p.zero_page_detection = Some(z);
        }
        if let Some(v) = a.opt_str("vm-uuid")? {
            let u = parse_uuid(v).ok_or_else(|| {
                QmpError::generic(format!(
                    "Parameter 'vm-uuid' expects a UUID of 8-4-4-4-12 hex digits, not '{v}'"
                ))
            })?;
            if running {
                return Err(refuse_running("vm-uuid"));
            }
            p.vm_uuid = u;
        }
        Ok(())
    }
}
