//! Typed helpers, one per command of the protocol.

use std::os::fd::AsFd;

use serde_json::{json, Value};

use super::{ClientError, HelperClient, RamBlockSpec};
use crate::control::protocol::{Command, MigrationStatus};

impl HelperClient {
    /// Runs one of the protocol's commands (see [`HelperClient::execute`]).
    fn command(&mut self, cmd: Command, args: Value) -> Result<Value, ClientError> {
        self.execute(cmd.as_str(), args)
    }

    // ---------------------------------------------------------------- fds

    /// `getfd {"fdname": name}` with `fd` attached. The caller keeps its own `fd`.
    pub fn getfd(&mut self, name: &str, fd: impl AsFd) -> Result<(), ClientError> {
        self.execute_with_fd(Command::Getfd.as_str(), json!({"fdname": name}), fd.as_fd())
            .map(drop)
    }

    /// `closefd {"fdname": name}`.
    pub fn closefd(&mut self, name: &str) -> Result<(), ClientError> {
        self.command(Command::Closefd, json!({"fdname": name}))
            .map(drop)
    }

    /// `add-fd` with `fd` attached, into set `fdset_id` (None: the first free one);
    /// returns `(fdset-id, fd)`. The file is then `file:/dev/fdset/ID` in a URI.
    pub fn add_fd(
        &mut self,
        fd: impl AsFd,
        fdset_id: Option<u64>,
        opaque: Option<&str>,
    ) -> Result<(u64, i64), ClientError> {
        let mut args = json!({});
        if let Some(id) = fdset_id {
            args["fdset-id"] = json!(id);
        }
        if let Some(o) = opaque {
            args["opaque"] = json!(o);
        }
        let r = self.execute_with_fd(Command::AddFd.as_str(), args, fd.as_fd())?;
        match (r["fdset-id"].as_u64(), r["fd"].as_i64()) {
            (Some(id), Some(fd)) => Ok((id, fd)),
            _ => Err(ClientError::Protocol(format!("add-fd replied {r}"))),
        }
    }

    /// `remove-fd`: one fd of a set, or (`fd` None) the whole set.
    pub fn remove_fd(&mut self, fdset_id: u64, fd: Option<i64>) -> Result<(), ClientError> {
        let mut args = json!({"fdset-id": fdset_id});
        if let Some(fd) = fd {
            args["fd"] = json!(fd);
        }
        self.command(Command::RemoveFd, args).map(drop)
    }

    /// `query-fdsets`.
    pub fn query_fdsets(&mut self) -> Result<Value, ClientError> {
        self.command(Command::QueryFdsets, Value::Null)
    }

    // ---------------------------------------------------------------- typed commands

    /// `ram-block-add` (the fd and the dirty bitmap must have been passed with `getfd`).
    pub fn ram_block_add(&mut self, spec: &RamBlockSpec) -> Result<(), ClientError> {
        let args = serde_json::to_value(spec)
            .map_err(|e| ClientError::Protocol(format!("cannot encode ram-block-add: {e}")))?;
        self.command(Command::RamBlockAdd, args).map(drop)
    }

    /// `query-ram-blocks`.
    pub fn query_ram_blocks(&mut self) -> Result<Value, ClientError> {
        self.command(Command::QueryRamBlocks, Value::Null)
    }

    /// `userfaultfd-set {"fdname": name}` (the userfaultfd passed with `getfd`).
    pub fn userfaultfd_set(&mut self, fdname: &str) -> Result<(), ClientError> {
        self.command(Command::UserfaultfdSet, json!({"fdname": fdname}))
            .map(drop)
    }

    /// `migrate-set-capabilities` with `(capability, state)` pairs.
    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), ClientError> {
        let caps: Vec<Value> = caps
            .iter()
            .map(|(name, state)| json!({"capability": name, "state": state}))
            .collect();
        self.command(
            Command::MigrateSetCapabilities,
            json!({ "capabilities": caps }),
        )
        .map(drop)
    }

    /// `query-migrate-capabilities`.
    pub fn query_capabilities(&mut self) -> Result<Value, ClientError> {
        self.command(Command::QueryMigrateCapabilities, Value::Null)
    }

    /// `migrate-set-parameters` with `params` as the arguments object, e.g.
    /// `json!({"max-bandwidth": 1e9 as u64, "compat-version": "7.2"})`.
    pub fn set_parameters(&mut self, params: Value) -> Result<(), ClientError> {
        self.command(Command::MigrateSetParameters, params)
            .map(drop)
    }

    /// `query-migrate-parameters`.
    pub fn query_parameters(&mut self) -> Result<Value, ClientError> {
        self.command(Command::QueryMigrateParameters, Value::Null)
    }

    /// `migrate {"uri": uri}` (outgoing migration; `fd:NAME`, `unix:`, `tcp:`, `file:`).
    pub fn migrate(&mut self, uri: &str) -> Result<(), ClientError> {
        self.command(Command::Migrate, json!({"uri": uri}))
            .map(drop)
    }

    /// `migrate {"uri": uri, "resume": true}` (resume a paused postcopy on the source).
    pub fn migrate_resume(&mut self, uri: &str) -> Result<(), ClientError> {
        self.command(Command::Migrate, json!({"uri": uri, "resume": true}))
            .map(drop)
    }

    /// `migrate-incoming {"uri": uri}` (destination).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), ClientError> {
        self.command(Command::MigrateIncoming, json!({"uri": uri}))
            .map(drop)
    }

    /// `migrate-recover {"uri": uri}` (a paused postcopy on the destination).
    pub fn migrate_recover(&mut self, uri: &str) -> Result<(), ClientError> {
        self.command(Command::MigrateRecover, json!({"uri": uri}))
            .map(drop)
    }

    /// `migrate_cancel`.
    pub fn migrate_cancel(&mut self) -> Result<(), ClientError> {
        self.command(Command::MigrateCancel, Value::Null).map(drop)
    }

    /// `migrate-continue {"state": "pre-switchover"}`.
    pub fn migrate_continue(&mut self) -> Result<(), ClientError> {
        self.command(
            Command::MigrateContinue,
            json!({"state": MigrationStatus::PreSwitchover.as_str()}),
        )
        .map(drop)
    }

    /// `migrate-start-postcopy`.
    pub fn migrate_start_postcopy(&mut self) -> Result<(), ClientError> {
        self.command(Command::MigrateStartPostcopy, Value::Null)
            .map(drop)
    }

    /// `migrate-pause`.
    pub fn migrate_pause(&mut self) -> Result<(), ClientError> {
        self.command(Command::MigratePause, Value::Null).map(drop)
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<Value, ClientError> {
        self.command(Command::QueryMigrate, Value::Null)
    }

    /// `query-device-state` (destination: the device sections received, in order).
    pub fn query_device_state(&mut self) -> Result<Value, ClientError> {
        self.command(Command::QueryDeviceState, Value::Null)
    }

    /// `device-state-set {"sections": sections}` (source: the device sections to send at
    /// switchover; `sections` is the JSON array described in the protocol).
    pub fn device_state_set(&mut self, sections: Value) -> Result<(), ClientError> {
        self.command(Command::DeviceStateSet, json!({ "sections": sections }))
            .map(drop)
    }

    /// `quit`. Succeeds also if the helper closes the connection instead of replying.
    pub fn quit(&mut self) -> Result<(), ClientError> {
        match self.command(Command::Quit, Value::Null) {
            Ok(_) => Ok(()),
            Err(_) if self.closed => Ok(()),
            Err(e) => Err(e),
        }
    }
}
