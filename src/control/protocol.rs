//! The control protocol's vocabulary and messages, shared by the helper's server and by
//! [`crate::client`]: command, status, event and error-class names, the arguments of
//! `ram-block-add`, and the JSON shape of replies and events. Always compiled (no `helper`
//! feature needed), so a VMM gets the same definitions the helper uses.
//!
//! The protocol is a QMP dialect on one `AF_UNIX` stream socket: a greeting, then
//! `qmp_capabilities`, then commands answered by replies with the command's `id`, and
//! events interleaved with replies (see the man page, CONTROL PROTOCOL).

use serde::Serialize;
use serde_json::{json, Value};

/// The QEMU version whose QMP dialect the helper speaks (sent in the greeting and by
/// `query-version`).
pub const QEMU_VERSION: (u64, u64, u64) = (10, 0, 2);

/// The greeting the helper sends when a client connects.
pub fn greeting() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({"QMP": {
        "version": {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": format!("qemu-migration-helper {}", env!("CARGO_PKG_VERSION")),
        },
        "capabilities": ["oob"],
    }})
}

/// Declares an enum of names the protocol uses, each variant with its name on the wire, in
/// order: the enum, `ALL`, `NAMES`, `as_str`, `from_name` and `Display`.
macro_rules! wire_names {
    (
        $(#[$enum_doc:meta])*
        $enum:ident {
            $($(#[$doc:meta])* $variant:ident => $name:literal,)*
        }
    ) => {
        $(#[$enum_doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $enum {
            $($(#[$doc])* $variant,)*
        }

        impl $enum {
            /// Every value, in the order listed.
            pub const ALL: &'static [$enum] = &[$($enum::$variant,)*];

            /// The names of [`Self::ALL`], in the same order.
            pub const NAMES: &'static [&'static str] = &[$($name,)*];

            /// The name on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($enum::$variant => $name,)*
                }
            }

            /// The value named `name`, if there is one.
            pub fn from_name(name: &str) -> Option<$enum> {
                match name {
                    $($name => Some($enum::$variant),)*
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $enum {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_names! {
    /// A command the helper knows, in the order `query-commands` lists them.
    Command {
        /// The handshake (answered by the connection itself).
        QmpCapabilities => "qmp_capabilities",
        QueryVersion => "query-version",
        QueryCommands => "query-commands",
        /// Takes the one fd sent with it (SCM_RIGHTS) under a name.
        Getfd => "getfd",
        Closefd => "closefd",
        /// Takes the one fd sent with it into an fd set (`file:/dev/fdset/N`), as QEMU.
        AddFd => "add-fd",
        RemoveFd => "remove-fd",
        QueryFdsets => "query-fdsets",
        RamBlockAdd => "ram-block-add",
        RamBlockDel => "ram-block-del",
        QueryRamBlocks => "query-ram-blocks",
        MigrateSetCapabilities => "migrate-set-capabilities",
        QueryMigrateCapabilities => "query-migrate-capabilities",
        MigrateSetParameters => "migrate-set-parameters",
        QueryMigrateParameters => "query-migrate-parameters",
        Migrate => "migrate",
        MigrateIncoming => "migrate-incoming",
        MigrateCancel => "migrate_cancel",
        MigrateContinue => "migrate-continue",
        MigrateStartPostcopy => "migrate-start-postcopy",
        MigratePause => "migrate-pause",
        MigrateRecover => "migrate-recover",
        UserfaultfdSet => "userfaultfd-set",
        QueryMigrate => "query-migrate",
        DeviceStateSet => "device-state-set",
        QueryDeviceState => "query-device-state",
        /// TLS credentials (`tls-creds-x509`, `tls-creds-psk`) and `authz-simple`, as QEMU.
        ObjectAdd => "object-add",
        ObjectDel => "object-del",
        Quit => "quit",
    }
}

/// The names of [`Command::ALL`], for `query-commands` and the man page.
pub const COMMANDS: &[&str] = Command::NAMES;

impl Command {
    /// Whether QEMU's schema lets it run with `exec-oob` (`allow-oob`).
    pub fn allows_oob(self) -> bool {
        matches!(self, Command::MigrateRecover | Command::MigratePause)
    }
}

wire_names! {
    /// QEMU's `MigrationStatus`, as `query-migrate` and the `MIGRATION` event name it.
    MigrationStatus {
        None => "none",
        Setup => "setup",
        Cancelling => "cancelling",
        Cancelled => "cancelled",
        Active => "active",
        PostcopyActive => "postcopy-active",
        PostcopyPaused => "postcopy-paused",
        PostcopyRecoverSetup => "postcopy-recover-setup",
        PostcopyRecover => "postcopy-recover",
        Completed => "completed",
        Failed => "failed",
        PreSwitchover => "pre-switchover",
        Device => "device",
    }
}

impl MigrationStatus {
    /// A migration in one of these states is over; a new one may start.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MigrationStatus::None
                | MigrationStatus::Completed
                | MigrationStatus::Failed
                | MigrationStatus::Cancelled
        )
    }
}

/// The capabilities of `migrate-set-capabilities`, in the order
/// `query-migrate-capabilities` lists them.
pub const CAPABILITIES: &[&str] = &[
    "postcopy-ram",
    "return-path",
    "pause-before-switchover",
    "events",
    "postcopy-preempt",
    "multifd",
    "mapped-ram",
    "auto-converge",
];

/// The arguments of `migrate-set-parameters` (each optional), which are also the members of
/// `query-migrate-parameters`'s reply.
pub const PARAMETERS: &[&str] = &[
    "max-bandwidth",
    "downtime-limit",
    "max-postcopy-bandwidth",
    "machine-type",
    "compat-version",
    "link-timeout",
    "precopy-timeout",
    "orphan-timeout",
    "load-threads",
    "multifd-channels",
    "multifd-compression",
    "zero-page-detection",
    "vm-uuid",
    "tls-creds",
    "tls-hostname",
    "tls-authz",
    "direct-io",
    "throttle-trigger-threshold",
    "cpu-throttle-initial",
    "cpu-throttle-increment",
    "cpu-throttle-tailslow",
    "max-cpu-throttle",
];

/// Event names.
pub mod event {
    /// A status change: `{"status": <MigrationStatus>}`.
    pub const MIGRATION: &str = "MIGRATION";
    /// A source started another precopy pass: `{"pass": N}`.
    pub const MIGRATION_PASS: &str = "MIGRATION_PASS";
    /// auto-converge: the source asks the parent to keep each vCPU from running this share
    /// of its time: `{"percentage": N}` (0: no throttle; sent when the migration ends).
    pub const CPU_THROTTLE: &str = "CPU_THROTTLE";
}

/// QMP error classes the helper sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Everything but an unknown command (QEMU uses it for nearly every error).
    GenericError,
    /// An unknown command, or a command before/after the capabilities negotiation.
    CommandNotFound,
}

impl ErrorClass {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
        }
    }
}

/// The arguments of `ram-block-add`: one block of the parent's guest RAM, in an fd passed
/// with `getfd` (the helper maps it shared, so nothing is copied).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamBlockSpec {
    /// RAMBlock idstr sent on the wire (`ram` for QEMU's `-M none`, `pc.ram` for `-M pc`).
    pub id: String,
    /// Name (given to `getfd`) of the fd holding the block's memory.
    pub fdname: String,
    /// Offset of the block in that fd.
    pub offset: u64,
    /// Size of the block in bytes.
    pub size: u64,
    /// Page size; default: the fd's page size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// Address at which the parent mapped the block (postcopy on the destination).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_addr: Option<u64>,
    /// Name (given to `getfd`) of the block's dirty bitmap memfd (source with a running guest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_bitmap: Option<String>,
}

impl RamBlockSpec {
    /// The argument names, as the JSON object has them.
    pub const ARGS: &'static [&'static str] = &[
        "id",
        "fdname",
        "offset",
        "size",
        "page-size",
        "host-addr",
        "dirty-bitmap",
    ];
}

/// An asynchronous event from the helper, e.g. `MIGRATION {"status": "active"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event name (see [`event`]).
    pub name: String,
    /// The `data` member (`Value::Null` if the event had none).
    pub data: Value,
    /// `(seconds, microseconds)` since the Unix epoch, as sent by the helper.
    pub timestamp: (u64, u32),
}

impl Event {
    /// The event as a line of the protocol.
    pub fn to_json(&self) -> Value {
        json!({
            "event": self.name,
            "data": self.data,
            "timestamp": {"seconds": self.timestamp.0, "microseconds": self.timestamp.1},
        })
    }
}

/// An error reply's `error` member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    /// QMP error class (see [`ErrorClass`]; a client keeps classes it does not know).
    pub class: String,
    /// Human-readable description.
    pub desc: String,
}

/// A successful reply: `{"return": ret, "id": id}` (no `id` member if the command had none).
pub fn reply_ok(ret: Value, id: &Option<Value>) -> Value {
    let mut v = json!({ "return": ret });
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

/// An error reply: `{"error": {"class": class, "desc": desc}, "id": id}`.
pub fn reply_err(class: &str, desc: &str, id: &Option<Value>) -> Value {
    let mut v = json!({ "error": { "class": class, "desc": desc } });
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

/// One message from the helper after the greeting.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// An event.
    Event(Event),
    /// A reply, to the command whose id it carries (an error reply has none when the
    /// helper could not read the command's id).
    Reply {
        /// The command's `id`.
        id: Option<Value>,
        /// `return`, or `error`.
        result: Result<Value, ErrorReply>,
    },
}

/// Why a line from the helper is not a [`Message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("not JSON")]
    NotJson,
    #[error("not a JSON object")]
    NotObject,
    #[error("event name is not a string")]
    EventName,
    #[error("event without timestamp")]
    NoTimestamp,
    #[error("bad event timestamp")]
    BadTimestamp,
    #[error("malformed error reply")]
    BadError,
    #[error("unexpected second greeting")]
    Greeting,
    #[error("neither a reply nor an event")]
    Unknown,
}

impl Message {
    /// Parses one line (not blank) from the helper.
    pub fn parse(line: &[u8]) -> Result<Message, MessageError> {
        let value: Value = serde_json::from_slice(line).map_err(|_| MessageError::NotJson)?;
        let Value::Object(mut obj) = value else {
            return Err(MessageError::NotObject);
        };
        if let Some(name) = obj.get("event") {
            let name = name.as_str().ok_or(MessageError::EventName)?.to_owned();
            let ts = obj.get("timestamp").ok_or(MessageError::NoTimestamp)?;
            let seconds = ts.get("seconds").and_then(Value::as_u64);
            let micros = ts
                .get("microseconds")
                .and_then(Value::as_u64)
                .and_then(|u| u32::try_from(u).ok());
            let (Some(seconds), Some(micros)) = (seconds, micros) else {
                return Err(MessageError::BadTimestamp);
            };
            let data = obj.remove("data").unwrap_or(Value::Null);
            return Ok(Message::Event(Event {
                name,
                data,
                timestamp: (seconds, micros),
            }));
        }
        let id = obj.remove("id");
        if let Some(ret) = obj.remove("return") {
            return Ok(Message::Reply {
                id,
                result: Ok(ret),
            });
        }
        if let Some(err) = obj.get("error") {
            let class = err.get("class").and_then(Value::as_str);
            let desc = err.get("desc").and_then(Value::as_str);
            let (Some(class), Some(desc)) = (class, desc) else {
                return Err(MessageError::BadError);
            };
            return Ok(Message::Reply {
                id,
                result: Err(ErrorReply {
                    class: class.to_owned(),
                    desc: desc.to_owned(),
                }),
            });
        }
        if obj.contains_key("QMP") {
            return Err(MessageError::Greeting);
        }
        Err(MessageError::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(Command::ALL.len(), COMMANDS.len());
        for (c, n) in Command::ALL.iter().zip(COMMANDS) {
            assert_eq!(c.as_str(), *n);
            assert_eq!(Command::from_name(n), Some(*c));
        }
        assert_eq!(Command::from_name("nope"), None);
        for s in MigrationStatus::ALL {
            assert_eq!(MigrationStatus::from_name(s.as_str()), Some(*s));
        }
    }

    /// The engine's capability table and the protocol's list must name the same things.
    #[cfg(feature = "helper")]
    #[test]
    fn capabilities_as_the_engine_has_them() {
        assert_eq!(
            CAPABILITIES,
            crate::engine::migration::Capabilities::NAMES.as_slice()
        );
    }

    #[test]
    fn replies_and_events_as_the_server_writes_them() {
        let ok = reply_ok(json!({"status": "none"}), &Some(json!(3)));
        assert_eq!(ok.to_string(), r#"{"return":{"status":"none"},"id":3}"#);
        let err = reply_err("GenericError", "no", &None);
        assert_eq!(
            err.to_string(),
            r#"{"error":{"class":"GenericError","desc":"no"}}"#
        );
        let ev = Event {
            name: event::MIGRATION.into(),
            data: json!({"status": "setup"}),
            timestamp: (5, 6),
        };
        let line = ev.to_json().to_string();
        assert_eq!(
            line,
            r#"{"event":"MIGRATION","data":{"status":"setup"},"timestamp":{"seconds":5,"microseconds":6}}"#
        );
        assert_eq!(Message::parse(line.as_bytes()), Ok(Message::Event(ev)));
        assert_eq!(
            Message::parse(err.to_string().as_bytes()),
            Ok(Message::Reply {
                id: None,
                result: Err(ErrorReply {
                    class: "GenericError".into(),
                    desc: "no".into()
                })
            })
        );
    }
}
