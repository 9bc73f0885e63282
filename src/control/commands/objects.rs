//! `object-add` and `object-del` for the objects a TLS migration needs (`tls-creds-x509`,
//! `tls-creds-psk`, `authz-simple`), and resolving `tls-creds`/`tls-authz` into the
//! [`TlsSetup`] a migration's channels use (owner: control/creds).

use super::{CmdResult, Helper, Role};
use crate::control::qmp::QmpError;
use crate::transport::tls::TlsSetup;

impl Helper {
    /// The TLS setup for a migration in `role` from `tls-creds`, `tls-hostname` and
    /// `tls-authz` as they are now; None when `tls-creds` is empty.
    pub(super) fn tls_setup(&self, _role: Role) -> Result<Option<TlsSetup>, QmpError> {
        if self.ctx.params().tls_creds.is_empty() {
            return Ok(None);
        }
        Err(QmpError::generic("TLS is not implemented yet"))
    }

    #[allow(dead_code)]
    fn object_stub(&self) -> CmdResult {
        Err(QmpError::generic("not implemented yet"))
    }
}
